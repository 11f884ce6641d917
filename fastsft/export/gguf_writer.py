"""GGUF export of a merged model with the gguf package (GGUFWriter, tensor-name maps, quantizers).

Families and their specifics: fastsft.export.gguf_families; the tokenizer: fastsft.export.gguf_tokenizer.
The file is written under a temporary name and renamed at the end: a failed export leaves nothing under the
output name, and an existing file is kept unless --overwrite.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from fastsft.errors import ConfigError

# every type the gguf package can quantize in Python that llama.cpp runs on any model (its ternary TQ types
# are for BitNet weights only, and its K-quants have no Python quantizer)
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# 4/5-bit files keep the embedding and output projection at q8_0 (llama.cpp's quantize keeps output higher too)
_HIGH_PRECISION = ("token_embd.weight", "output.weight")
log = logging.getLogger("fastsft.export")


def check_request(out_path: str, qtype: str, overwrite: bool) -> None:
    """The checks that need no model: run before any merge."""
    if qtype not in TYPES:
        raise ConfigError(f"--type {qtype!r} is not one of {', '.join(TYPES)}")
    if os.path.exists(out_path) and not overwrite:
        raise ConfigError(f"{out_path!r} exists: pass --overwrite")
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--output {out_path!r}: folder {parent!r} does not exist")


def _state(model_dir: str) -> dict:
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(model_dir, name)))
    if not state:
        raise ConfigError(f"{model_dir!r} holds no .safetensors weights")
    return state


def export_gguf(model_dir: str, out_path: str, qtype: str = "f16", overwrite: bool = False) -> str:
    import gguf
    from transformers import AutoConfig

    from fastsft.export import gguf_families as families
    from fastsft.export.gguf_tokenizer import add_tokenizer

    check_request(out_path, qtype, overwrite)
    config = AutoConfig.from_pretrained(model_dir)
    family = families.family_of(config)
    state = _state(model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if "lm_head.weight" not in state and not tied:
        raise ConfigError(f"{model_dir!r} has no lm_head.weight and its embeddings are not tied")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        # never the bare family name: transformers' loader re-reads a llama file named exactly "mistral" as
        # Mistral, which gguf's tensor maps do not know
        writer.add_name(f"{os.path.basename(os.path.abspath(model_dir))} (fastsft export)")
        families.write_hparams(writer, config, family)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "f32"
                             else getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}"))
        add_tokenizer(writer, model_dir, config.vocab_size)
        kept_f16 = []
        for hf_name, tensor in state.items():
            if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
                continue  # a tied model has no output.weight: llama.cpp (and the loader) reuse token_embd
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConfigError(f"GGUF export: no GGUF name for tensor {hf_name!r} ({config.model_type})")
            data = families.transform(hf_name, tensor.float().numpy(), config, family)
            if not _add_tensor(writer, gguf, name, data, qtype):
                kept_f16.append(name)
        if kept_f16:
            log.info("GGUF %s: %d tensor(s) with rows not a multiple of 32 kept in f16 (%s)", qtype, len(kept_f16),
                     ", ".join(kept_f16[:3]) + (", ..." if len(kept_f16) > 3 else ""))
        for name, data in families.extra_tensors(config).items():
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def _add_tensor(writer, gguf, name: str, data: np.ndarray, qtype: str) -> bool:
    """Add one tensor in `qtype`; False when a block type had to keep it in f16 instead."""
    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == "f32":  # norms and biases stay f32, as llama.cpp's converter keeps them
        writer.add_tensor(name, data.astype(np.float32))
        return True
    if qtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
        return True
    kind = getattr(T, qtype.upper())
    if qtype.startswith(("q4", "q5")) and name in _HIGH_PRECISION:
        kind = T.Q8_0
    if kind != T.BF16 and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        writer.add_tensor(name, data.astype(np.float16))  # a row not divisible into 32-blocks
        return False
    writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    return True
