"""The compute dtype each patched kernel call receives.

torch.autocast only recasts the ops on its lists (matmuls, linear); the fastsft
kernels are not on them, so the patches apply autocast's policy themselves: under
autocast to bf16/fp16, a kernel gets its activations and its small weights in the
autocast dtype (as F.linear would), and does its arithmetic in fp32 inside. Full
fine-tuning keeps fp32 master weights and an fp32 residual stream (as plain AMP
does); every kernel still sees the autocast dtype, except RMSNorm, which reads that
fp32 residual in fp32 as transformers' norm does (rounding it and its gradient at
every norm compounds down the layers; issue 27). Without autocast nothing is cast.
"""
from __future__ import annotations

from typing import Optional

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """autocast's bf16/fp16 dtype when autocast is on for t's device, else None."""
    device_type = t.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in LOW_PRECISION else None


def to_autocast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """t in the autocast dtype (no copy when it already is, or when dtype is None)."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


class ConstantCasts:
    """Recent casts of tensors that carry no gradient (RoPE's cos and sin, shared by
    every layer of one forward): each is cast once and reused while it comes back."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries = []  # (source, version, result); the strong reference keeps identity sound

    def __call__(self, t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        if dtype is None or t.dtype == dtype or t.requires_grad:
            return to_autocast(t, dtype)
        for source, version, result in self.entries:
            if source is t and version == t._version and result.dtype == dtype:
                return result
        result = t.to(dtype)
        self.entries.insert(0, (t, t._version, result))
        del self.entries[self.size:]
        return result


class _CastWithGrad(torch.autograd.Function):
    """Returns a cached low-precision copy of a weight; the gradient goes back to the weight in its dtype."""

    @staticmethod
    def forward(ctx, weight, cached):
        ctx.dtype = weight.dtype
        return cached.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


_WEIGHT_CASTS = "_fastsft_cast_cache"


def cached_weight_cast(module: torch.nn.Module, weight: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """weight in ``dtype``, cast once per weight version (an optimizer step bumps it).

    For an fp32 lm_head under autocast: the copy is made on the first loss call after
    each update, not on every micro-batch. A weight already in ``dtype`` is returned as is.
    """
    if dtype is None or weight.dtype == dtype:
        return weight
    entry = module.__dict__.get(_WEIGHT_CASTS)
    key = (weight.data_ptr(), weight._version, dtype, tuple(weight.shape))
    if entry is None or entry[0] != key or entry[1] is not weight:
        with torch.no_grad():
            entry = (key, weight, weight.detach().to(dtype))
        module.__dict__[_WEIGHT_CASTS] = entry
    cached = entry[2]
    if weight.requires_grad and torch.is_grad_enabled():
        return _CastWithGrad.apply(weight, cached)
    return cached


def drop_weight_cast(module: torch.nn.Module) -> None:
    module.__dict__.pop(_WEIGHT_CASTS, None)
