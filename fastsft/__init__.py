"""fastsft: supervised fine-tuning of causal LMs with fused Triton kernels.

    import fastsft
    model = fastsft.patch_model(model)   # swap fastsft_kernels into a HF / peft model

The trainer lives in fastsft.train and the `fastsft` command (fastsft.cli).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"patch_model": "fastsft.patch", "unpatch_model": "fastsft.patch"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastsft' has no attribute {name!r}")
