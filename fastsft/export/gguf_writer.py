"""GGUF export of a merged Llama-family model with the gguf package (GGUFWriter, tensor-name map, quantizers).

Only the Llama architecture is written so far; other families are refused in one line."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from fastsft.errors import ConfigError

TYPES = ("f32", "f16", "bf16", "q8_0")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's rope pairs (i, i + d/2) of HF become adjacent pairs (2i, 2i+1) in GGUF
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(model_dir: str, out_path: str, qtype: str = "f16", overwrite: bool = False) -> str:
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    if qtype not in TYPES:
        raise ConfigError(f"--type {qtype!r} is not one of {', '.join(TYPES)}")
    if os.path.exists(out_path) and not overwrite:
        raise ConfigError(f"{out_path!r} exists: pass --overwrite")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ConfigError(f"GGUF export of model_type {config.model_type!r} is not supported yet (llama only)")
    state = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(model_dir, name)))
    if "lm_head.weight" not in state and not config.tie_word_embeddings:
        raise ConfigError(f"{model_dir!r} has no lm_head.weight")
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tmp = out_path + ".tmp"
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope))
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_file_type(file_type)
    _add_tokenizer(writer, model_dir, config)
    for hf_name, tensor in state.items():
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: no GGUF name for tensor {hf_name!r}")
        data = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        _add_tensor(writer, gguf, name, data, qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def _add_tensor(writer, gguf, name: str, data: np.ndarray, qtype: str) -> None:
    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == "f32":  # norms stay f32, as llama.cpp's converter keeps them
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        kind = T.BF16 if qtype == "bf16" else T.Q8_0
        if kind == T.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
            writer.add_tensor(name, data.astype(np.float16))  # a row not divisible into 32-blocks
            return
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)


def _add_tokenizer(writer, model_dir: str, config) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as handle:
        spec = json.load(handle)
    if spec["model"]["type"] != "BPE":
        raise ConfigError(f"GGUF export: tokenizer model {spec['model']['type']!r} is not supported yet (BPE only)")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(config.vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(3 if i in special else (5 if i not in by_id else 1))  # control / unused / normal
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr)
        if value is not None:
            add(value)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
