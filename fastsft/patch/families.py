"""The Hugging Face classes fastsft knows how to patch, and the instance-forward helpers.

Modules are matched by exact class identity (``type(module) is cls``), never by
name alone: a subclass or a remote-code look-alike may compute something else,
so it is left alone (and reported). The classes below were checked against
transformers 5.x: their norms, MLPs and rotary calls are the standard forms the
kernels reproduce.
"""
from __future__ import annotations

import importlib
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch

# model family -> modeling module (transformers.models.<family>.modeling_<family>)
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")

# RMSNorm class -> (offset, name of the eps attribute)
_NORMS: Dict[str, Tuple[float, str]] = {
    "LlamaRMSNorm": (0.0, "variance_epsilon"),
    "MistralRMSNorm": (0.0, "variance_epsilon"),
    "Qwen2RMSNorm": (0.0, "variance_epsilon"),
    "Qwen3RMSNorm": (0.0, "variance_epsilon"),
    "Phi3RMSNorm": (0.0, "variance_epsilon"),
    "GemmaRMSNorm": (1.0, "eps"),
    "Gemma2RMSNorm": (1.0, "eps"),
    "Gemma3RMSNorm": (1.0, "eps"),
}
# MLP class -> layout: "split" = down(act(gate(x)) * up(x)); "fused" = Phi-3's gate_up_proj + chunk
_MLPS: Dict[str, str] = {
    "LlamaMLP": "split", "MistralMLP": "split", "Qwen2MLP": "split", "Qwen3MLP": "split",
    "GemmaMLP": "split", "Gemma2MLP": "split", "Gemma3MLP": "split",
    "Phi3MLP": "fused",
}
# attention classes whose forward calls the module-level rotate-half apply_rotary_pos_emb
_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
               "GemmaAttention", "Gemma2Attention", "Gemma3Attention", "Phi3Attention")

_CACHE: Dict[str, Dict[type, object]] = {}


def _known(kind: str) -> Dict[type, object]:
    """{class: info} for the classes of one kind that exist in the installed transformers."""
    if kind in _CACHE:
        return _CACHE[kind]
    table = {"norm": _NORMS, "mlp": _MLPS, "attention": {n: None for n in _ATTENTIONS}}[kind]
    found: Dict[type, object] = {}
    for family in _FAMILIES:
        try:
            mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except Exception:  # family absent from this transformers version
            continue
        for name, info in table.items():
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and cls.__module__ == mod.__name__:
                found[cls] = info
    _CACHE[kind] = found
    return found


def norm_info(module: torch.nn.Module) -> Optional[Tuple[float, str]]:
    return _known("norm").get(type(module))


def mlp_layout(module: torch.nn.Module) -> Optional[str]:
    return _known("mlp").get(type(module))


def is_known_attention(module: torch.nn.Module) -> bool:
    return type(module) in _known("attention")


def is_rms_norm_like(module: torch.nn.Module) -> bool:
    """Unknown classes named like an RMSNorm: reported as not patched."""
    return type(module).__name__.lower().endswith("rmsnorm") and norm_info(module) is None


# ---------------------------------------------------------------- instance forwards
# A patched module gets an instance attribute `forward` (bound to it) that
# shadows the class's forward; reverting deletes it. When accelerate has hooked
# the module (device_map / offloading: `_hf_hook` + `_old_forward`), the hook
# stays outermost and the patch replaces `_old_forward` instead.
_SAVED = "_fastsft_saved_forward"
_MISSING = object()


def _forward_slot(module: torch.nn.Module) -> str:
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def is_patched(module: torch.nn.Module, tag: str) -> bool:
    return getattr(module, _SAVED, {}).get("tag") == tag


def set_forward(module: torch.nn.Module, fn: Callable, tag: str) -> None:
    """Bind fn(module, ...) as module's forward (idempotent per tag)."""
    if is_patched(module, tag):
        return
    if hasattr(module, _SAVED):
        raise RuntimeError(f"{type(module).__name__} is already patched by fastsft component "
                           f"{getattr(module, _SAVED)['tag']!r}; cannot patch it for {tag!r} too")
    slot = _forward_slot(module)
    saved = {"tag": tag, "slot": slot, "value": module.__dict__.get(slot, _MISSING)}
    object.__setattr__(module, _SAVED, saved)
    object.__setattr__(module, slot, types.MethodType(fn, module))


def restore_forward(module: torch.nn.Module, tag: str) -> bool:
    """Undo set_forward for this tag; True when something was restored."""
    saved = getattr(module, _SAVED, None)
    if not saved or saved["tag"] != tag:
        return False
    if saved["value"] is _MISSING:
        if saved["slot"] in module.__dict__:
            object.__delattr__(module, saved["slot"])
    else:
        object.__setattr__(module, saved["slot"], saved["value"])
    object.__delattr__(module, _SAVED)
    return True


def original_forward(module: torch.nn.Module) -> Callable:
    """The forward the module had before fastsft patched it (bound)."""
    saved = getattr(module, _SAVED, None)
    if saved and saved["value"] is not _MISSING:
        return saved["value"]
    # the descriptor protocol, not types.MethodType(...): torch.compile traces this one
    return type(module).forward.__get__(module, type(module))


def modules_of(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    return list(model.named_modules())
