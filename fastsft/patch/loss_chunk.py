"""Token rows per chunk of the fused loss (linear_cross_entropy's ``chunk_size``), set per model.

The loss patch streams the tokens through (rows x vocab) logits chunks. Without a setting the
kernel picks its own size (at most 512 MiB of logits); at long context the trainer sets it
from the free memory (``loss_chunk_tokens`` or ``long_context``), as Unsloth's chunked loss
does: larger chunks where memory allows (fewer, larger GEMMs), smaller ones where it is short.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import base_model_of

_ATTR = "_fastsft_loss_chunk_tokens"
_FRACTION = 8  # one logits chunk takes at most 1/8 of the free memory ...
_MAX_BYTES = 512 * 2**20  # the kernel's own budget: above it, its own choice stands
_MULTIPLE = 128  # GEMM-friendly row counts
_MIN_ROWS = 128


def set_chunk_tokens(model: torch.nn.Module, rows: Optional[int]) -> None:
    """Rows per loss chunk for ``model`` (None: the kernel's own choice)."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0):
        raise ValueError(f"loss chunk rows must be a positive int, got {rows!r}")
    base = base_model_of(model)
    if rows is None:
        base.__dict__.pop(_ATTR, None)
    else:
        base.__dict__[_ATTR] = rows


def chunk_tokens_of(model: torch.nn.Module) -> Optional[int]:
    return model.__dict__.get(_ATTR)


def default_chunk_tokens(vocab_size: int, element_size: int, free_bytes: int) -> Optional[int]:
    """Rows whose logits chunk (rows x vocab in the compute dtype) fits in 1/8 of the free memory, when
    that is under the kernel's own 512 MiB budget; None (the kernel's own choice) when memory is plentiful."""
    if free_bytes // _FRACTION >= _MAX_BYTES:
        return None
    rows = free_bytes // _FRACTION // max(1, vocab_size * element_size)
    return max(_MIN_ROWS, rows // _MULTIPLE * _MULTIPLE)


__all__ = ["set_chunk_tokens", "chunk_tokens_of", "default_chunk_tokens"]
