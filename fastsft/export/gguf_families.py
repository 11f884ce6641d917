"""What each model family needs in a GGUF file: the gguf architecture, the metadata llama.cpp reads, and the
tensor transforms its converter applies (studied in llama.cpp's convert_hf_to_gguf.py, written here anew).

Families: those `patch_model` supports (Llama, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3 text, Phi-3). A setting
llama.cpp would silently compute differently (YaRN or longrope scaling, a Gemma query scale other than its own,
a non-standard sliding-window layout, ...) is refused in one line instead of written wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from fastsft.errors import ConfigError


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's llama graph ropes adjacent pairs; HF rotates halves
    norm_plus_one: bool = False  # Gemma computes x * (1 + w); llama.cpp stores 1 + w
    key_length: bool = False  # head_dim is not hidden / heads in general: write it
    window_as_context: bool = False  # an all-layer sliding window the GGUF architecture cannot express
    extra: Optional[Callable] = None  # family metadata and checks: extra(writer, config)


def rope_settings(config, layer_type: str = "full_attention") -> dict:
    """rope_theta / rope_type / partial_rotary_factor, from transformers 5's rope_parameters (flat or per layer
    type) or the older top-level fields."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {"theta": float(theta if theta is not None else 10000.0),
            "type": params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default",
            "partial": float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))}


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return dict(params[layer_type]) if isinstance(params.get(layer_type), dict) else params


def extra_tensors(config) -> dict:
    """GGUF tensors with no HF counterpart. Llama-3.1-style rope ("llama3"): llama.cpp divides each rope
    frequency by the factor in `rope_freqs`; the factors are transformers' own default / llama3 frequencies."""
    if rope_settings(config)["type"] != "llama3":
        return {}
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_scaling = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    if attention_scaling != 1.0:
        raise ConfigError(f"GGUF export: llama3 rope with attention scaling {attention_scaling} is not supported")
    dim = scaled.shape[0] * 2
    default = 1.0 / (rope_settings(config)["theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return {"rope_freqs.weight": (default / scaled.float()).numpy().astype(np.float32)}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def context_length(config, family: Family) -> int:
    """max_position_embeddings; for Mistral, capped at its sliding window: llama.cpp's llama graph attends
    fully, which equals the window up to that length."""
    window = getattr(config, "sliding_window", None) if family.window_as_context else None
    return min(config.max_position_embeddings, window) if window else config.max_position_embeddings


# llama.cpp scales Gemma queries by 1/sqrt(head_dim), except for the 27B models, which it tells by their layer
# count and scales by 1/sqrt(hidden / heads) (their query_pre_attn_scalar)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _gemma_checks(config, name: str) -> None:
    head_dim = head_dim_of(config)
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if config.num_hidden_layers == _GEMMA_27B_LAYERS[name]:
        llama_cpp, rule = config.hidden_size // config.num_attention_heads, "hidden_size / heads (27B)"
    else:
        llama_cpp, rule = head_dim, "head_dim"
    if scalar != llama_cpp:
        raise ConfigError(f"GGUF export of {name}: query_pre_attn_scalar={scalar} is not {rule}={llama_cpp}, "
                          f"the scale llama.cpp uses for this shape; refused")


def _layer_types_must_be(config, expected: list, name: str, why: str) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and list(layer_types) != expected:
        raise ConfigError(f"GGUF export of {name}: layer_types {list(layer_types)} are not {why}, the only layout "
                          f"llama.cpp runs")


def _gemma2(writer, config) -> None:
    _gemma_checks(config, "gemma2")
    layers = config.num_hidden_layers
    _layer_types_must_be(config, ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                         "gemma2", "sliding / full alternating")
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    writer.add_sliding_window(int(config.sliding_window))


def _gemma3(writer, config) -> None:
    _gemma_checks(config, "gemma3_text")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        raise ConfigError("GGUF export of gemma3_text: logit soft-capping is set; llama.cpp's Gemma-3 graph has none")
    layers = config.num_hidden_layers
    _layer_types_must_be(config, ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
                         "gemma3_text", "five sliding layers then one full")
    local = rope_settings(config, "sliding_attention")
    if local["theta"] != 10000.0 or local["type"] != "default":
        raise ConfigError(f"GGUF export of gemma3_text: the sliding layers' rope ({local}) is not llama.cpp's fixed "
                          f"theta 10000")
    writer.add_sliding_window(int(config.sliding_window))


def _phi3(writer, config) -> None:
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


def _qwen2(writer, config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ConfigError("GGUF export of qwen2: use_sliding_window=true is not run by llama.cpp's Qwen2 graph")


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),
    # llama.cpp converts Mistral as the llama architecture
    "mistral": Family("LLAMA", permute_qk=True, window_as_context=True),
    "qwen2": Family("QWEN2", extra=_qwen2),
    "qwen3": Family("QWEN3", key_length=True),
    "gemma2": Family("GEMMA2", norm_plus_one=True, key_length=True, extra=_gemma2),
    "gemma3_text": Family("GEMMA3", norm_plus_one=True, key_length=True, extra=_gemma3),
    "phi3": Family("PHI3", extra=_phi3),
}


def family_of(config) -> Family:
    model_type = config.model_type
    if model_type not in FAMILIES:
        hint = " (a multimodal Gemma-3: save its language model alone)" if model_type == "gemma3" else ""
        raise ConfigError(f"GGUF export of model_type {model_type!r} is not supported{hint}; supported: "
                          f"{', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    rope = rope_settings(config)
    known = ("default", "linear", "llama3") if family.arch == "LLAMA" else ("default", "linear")
    if rope["type"] not in known:
        raise ConfigError(f"GGUF export of {model_type}: rope scaling {rope['type']!r} is not supported yet "
                          f"(supported: {', '.join(known)})")
    return family


def write_hparams(writer, config, family: Family) -> None:
    """The hyper-parameters llama.cpp reads for this architecture."""
    head_dim = head_dim_of(config)
    rope = rope_settings(config)
    writer.add_context_length(context_length(config, family))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["theta"])
    writer.add_rope_dimension_count(int(head_dim * rope["partial"]))
    writer.add_vocab_size(config.vocab_size)
    if rope["type"] == "linear":  # llama.cpp: freq_scale = 1 / factor, as transformers divides inv_freq
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
    if family.key_length:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family.extra is not None:
        family.extra(writer, config)


def permute_for_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotates pairs (i, i + d/2) of a head; llama.cpp's llama graph rotates adjacent pairs (2i, 2i+1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(hf_name: str, data: np.ndarray, config, family: Family) -> np.ndarray:
    """One HF tensor as llama.cpp stores it."""
    if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_for_rope(data, config.num_attention_heads)
    if family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_for_rope(data, config.num_key_value_heads)
    if family.norm_plus_one and hf_name.endswith("norm.weight"):
        return data + 1.0
    return data
