"""The tokenizer of a model folder as GGUF metadata, for llama.cpp and for transformers' GGUF loader.

Two kinds, told apart by the folder's tokenizer.json:
- byte-level BPE (GPT-2 style: Llama-3, Qwen, SmolLM2): tokenizer model "gpt2", the vocabulary in the byte
  alphabet, merges, and the pre-tokenizer's name (llama.cpp picks its split regex by that name);
- SentencePiece-style BPE with byte fallback (Llama-2, Mistral, Gemma, Phi-3): tokenizer model "llama",
  scores that rank merges (llama.cpp's SentencePiece tokenizer merges the best-scored pair first) and the
  `<0xNN>` byte tokens typed as bytes.
Merges, special token ids, add-BOS/EOS flags and the chat template go in through gguf's own SpecialVocab.
"""
from __future__ import annotations

import json
import os
import re

from fastsft.errors import ConfigError

# token types of llama.cpp (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, or a one-line refusal."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35"):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise ConfigError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one "
                      f"llama.cpp knows by name (GPT-2, SmolLM, Llama-3, Qwen2, Tekken, GPT-4o); not exported")


def _is_sentencepiece(spec: dict) -> bool:
    return bool(spec["model"].get("byte_fallback"))


def _adds_prefix_space(spec: dict) -> bool:
    def steps(part):
        part = spec.get(part) or {}
        return part.get("pretokenizers") or part.get("normalizers") or [part]

    for step in steps("pre_tokenizer"):
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            return True
    return any(step.get("type") == "Prepend" for step in steps("normalizer"))


def _adds(tokenizer) -> tuple:
    """(adds BOS, adds EOS) when encoding plain text."""
    ids = tokenizer("a b")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def add_tokenizer(writer, model_dir: str, vocab_size: int) -> str:
    """Write the tokenizer of `model_dir` into `writer`; returns the kind written ("gpt2" or "llama")."""
    import gguf
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise ConfigError(f"GGUF export: {model_dir!r} holds no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the tokenizer as loaded, not tokenizer.json: transformers' class for a family may set its own
    # pre-tokenizer (Qwen2's split regex) over the file's, and training used the loaded one
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ConfigError(f"GGUF export: tokenizer model {spec['model']['type']!r} is not supported (BPE only)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())}, beyond the model's "
                          f"vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    sentencepiece = _is_sentencepiece(spec)
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # rows the model was padded with
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(UNUSED)
            continue
        kind = (CONTROL if i in special else USER_DEFINED if i in added
                else BYTE if sentencepiece and _BYTE_TOKEN.match(token) else NORMAL)
        if i == tokenizer.unk_token_id:
            kind = UNKNOWN
        tokens.append(token)
        # SentencePiece-style: the earlier a merge made the token, the better its score (BPE rank order)
        scores.append(-float(i) if kind == NORMAL else 0.0)
        types.append(kind)
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_prefix_space(spec))
        writer.add_token_scores(scores)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # the ids the tokenizer itself uses win over config.json's
    for kind in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id")
        if value is not None:
            special_vocab.special_token_ids[kind] = value
    add_bos, add_eos = _adds(tokenizer)
    special_vocab.add_special_token.update(bos=add_bos, eos=add_eos)
    if tokenizer.chat_template and special_vocab.chat_template is None:
        special_vocab.chat_template = tokenizer.chat_template
    end_of_turn = _end_of_turn(model_dir, tokenizer)
    if end_of_turn is not None and "eot" not in special_vocab.special_token_ids:
        special_vocab.special_token_ids["eot"] = end_of_turn
    special_vocab.add_to_gguf(writer, quiet=True)
    return "llama" if sentencepiece else "gpt2"


def _end_of_turn(model_dir: str, tokenizer):
    """A generation_config listing several EOS ids (Llama-3: <|end_of_text|> and <|eot_id|>): the first that is
    not the tokenizer's EOS becomes llama.cpp's end-of-turn token, so chat mode stops on it too."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        eos = json.load(handle).get("eos_token_id")
    others = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None and i != tokenizer.eos_token_id]
    return int(others[0]) if others else None
