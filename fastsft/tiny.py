"""Tiny tokenizers and model configs built locally, for tests and the demo.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on
the given texts with the `tokenizers` library, and the config is a small Llama.
"""
from __future__ import annotations

from typing import Iterable

from fastsft.data.templates import DEFAULT_CHAT_TEMPLATE

DEFAULT = DEFAULT_CHAT_TEMPLATE

BOS, EOS, PAD = "<s>", "<|im_end|>", "<pad>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, chat_template: str | None = DEFAULT):
    """A byte-level BPE fast tokenizer trained on `texts`.

    Special tokens: pad `<pad>`, bos `<s>`, eos `<|im_end|>` (the ChatML end of
    turn, so the end of every assistant turn is EOS) and `<|im_start|>`. Byte-level
    means any text encodes without unknown tokens and offsets map back to the text.
    The tokenizer adds no BOS/EOS by itself; the chat template is ChatML unless
    `chat_template` says otherwise (None = no template).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    """A 2-layer Llama config (hidden 64, 4 heads, 2 kv heads), any field overridable."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)
