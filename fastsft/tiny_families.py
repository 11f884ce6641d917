"""Tiny models of every family `patch_model` supports, with the tokenizer kind each family really ships:
byte-level BPE (Llama-3 / Qwen style, fastsft.tiny) or a SentencePiece-style BPE with byte fallback (Llama-2 /
Mistral, Gemma and Phi-3 shapes). Built locally, nothing downloaded; used by the GGUF export tests."""
import torch

TEXTS = [
    "What is 2 + 3? It is 5.", "The capital of France is Paris.", "Keep a regular bedtime and a cool room.",
    "Translate 'good morning' into French: bonjour.", "A spider has eight legs; an insect has six.",
    "def add(a, b):\n    return a + b\n", "Numbers: 17 + 25 = 42, 3.14159, 2026.", "Ünïcödé café naïve — ok",
] * 4
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "And  6 × 7?"},
        {"role": "assistant", "content": "42, café."}]
SPM_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# family -> (config overrides, tokenizer kind). Values the GGUF loader of transformers cannot read back
# (Qwen3's and Gemma's head_dim, Gemma-2's soft-caps) are the families' real ones, which it assumes.
FAMILIES = {
    "llama": ({}, "bpe"),
    "mistral": ({"sliding_window": None}, "llama2"),
    "qwen2": ({}, "bpe"),
    "qwen3": ({"head_dim": 128}, "bpe"),
    "gemma2": ({"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8}, "gemma"),
    "gemma3_text": ({"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8}, "gemma"),
    "phi3": ({}, "phi3"),
}


def _train_spm_pieces(specials, vocab_size=400):
    """vocab and merges of a BPE over '▁'-words with the 256 <0xNN> byte tokens (SentencePiece's byte fallback)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token=specials[0] if "<unk>" in specials[0] else None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    backend.train_from_iterator(TEXTS, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in model["merges"]]


def build_tokenizer(kind: str):
    """"bpe" (fastsft.tiny), "llama2" (Llama-2 / Mistral), "gemma" or "phi3"-shaped SentencePiece-style BPE."""
    from tokenizers import normalizers
    from transformers import GemmaTokenizer, LlamaTokenizer

    from fastsft.tiny import build_tokenizer as build_bpe

    if kind == "bpe":
        return build_bpe(TEXTS, vocab_size=300)
    if kind == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        vocab, merges = _train_spm_pieces(specials)
        tok = GemmaTokenizer(vocab=vocab, merges=merges, eos_token="<end_of_turn>",
                             additional_special_tokens=["<start_of_turn>"])
        tok.chat_template = GEMMA_TEMPLATE
        return tok
    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab, merges = _train_spm_pieces(specials)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, eos_token="<|end|>", pad_token="<unk>",
                         additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
                         add_bos_token=kind == "llama2")  # Llama-2 / Mistral start with <s>; Phi-3's template does not
    if kind == "phi3":  # Phi-3's tokenizer.json: the prefix space from a normalizer, no pre-tokenizer
        tok.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.backend_tokenizer.pre_tokenizer = None
    tok.chat_template = SPM_TEMPLATE
    return tok


GAIN = 1.0  # weights ~ N(0, GAIN^2 / fan_in): activations keep their scale through the layers, as in a trained model


def build_model(family: str, tokenizer, seed: int = 0, **extra):
    """A 2-layer model with weights far from their init (norms too: the Gemma +1 offset must show)."""
    import transformers

    overrides, _ = FAMILIES[family]
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tokenizer) + 3, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5)
    fields.update(overrides)
    fields.update(extra)
    config = transformers.AutoConfig.for_model(family, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.3)
            else:
                param.normal_(0.0, GAIN / param.shape[-1] ** 0.5)
    return model
