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


class _Weights:
    """The folder's safetensors, read one tensor at a time (an 8B model is never all in memory)."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self.files, self.where = [], {}
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                handle = safe_open(os.path.join(model_dir, name), framework="pt")
                self.files.append(handle)
                for key in handle.keys():
                    self.where[key] = handle
        if not self.where:
            raise ConfigError(f"{model_dir!r} holds no .safetensors weights")

    def shape(self, key: str) -> list:
        return list(self.where[key].get_slice(key).get_shape())

    def load(self, key: str) -> np.ndarray:
        return self.where[key].get_tensor(key).float().numpy()


def _storage(gguf, name: str, shape: list, qtype: str):
    """The ggml type a tensor is stored in; its rows must split into the type's blocks (else f16)."""
    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or qtype == "f32":  # norms and biases stay f32, as llama.cpp's converter keeps them
        return T.F32
    if qtype == "f16":
        return T.F16
    kind = T.Q8_0 if qtype.startswith(("q4", "q5")) and name in _HIGH_PRECISION else getattr(T, qtype.upper())
    if kind != T.BF16 and shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return T.F16
    return kind


def _encode(gguf, data: np.ndarray, kind) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    if kind == T.F32:
        return data.astype(np.float32)
    if kind == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, kind)


def _declare(writer, gguf, name: str, shape: list, kind) -> None:
    """Tensor info ahead of the data, so the data can be written one tensor at a time."""
    T = gguf.GGMLQuantizationType
    count = int(np.prod(shape))
    if kind in (T.F32, T.F16):
        dtype = np.float32 if kind == T.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), count * np.dtype(dtype).itemsize)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)


def export_gguf(model_dir: str, out_path: str, qtype: str = "f16", overwrite: bool = False) -> str:
    import gguf
    from transformers import AutoConfig

    from fastsft.export import gguf_families as families
    from fastsft.export.gguf_tokenizer import add_tokenizer

    check_request(out_path, qtype, overwrite)
    config = AutoConfig.from_pretrained(model_dir)
    family = families.family_of(config)
    weights = _Weights(model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if "lm_head.weight" not in weights.where and not tied:
        raise ConfigError(f"{model_dir!r} has no lm_head.weight and its embeddings are not tied")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    plan = []  # (GGUF name, HF name or the data itself, storage type), in file order
    for hf_name in weights.where:
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue  # a tied model has no output.weight: llama.cpp (and the loader) reuse token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: no GGUF name for tensor {hf_name!r} ({config.model_type})")
        plan.append((name, hf_name, _storage(gguf, name, weights.shape(hf_name), qtype)))
    for name, data in families.extra_tensors(config).items():
        plan.append((name, data, gguf.GGMLQuantizationType.F32))
    kept_f16 = [name for name, _, kind in plan if qtype not in ("f32", "f16") and kind == gguf.GGMLQuantizationType.F16]
    if kept_f16:
        log.info("GGUF %s: %d tensor(s) with rows not a multiple of the block size kept in f16 (%s)", qtype,
                 len(kept_f16), ", ".join(kept_f16[:3]) + (", ..." if len(kept_f16) > 3 else ""))

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
        for name, source, kind in plan:
            shape = list(source.shape) if isinstance(source, np.ndarray) else weights.shape(source)
            _declare(writer, gguf, name, shape, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, source, kind in plan:
            data = source if isinstance(source, np.ndarray) else \
                families.transform(source, weights.load(source), config, family)
            writer.write_tensor_data(_encode(gguf, data, kind))
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path
