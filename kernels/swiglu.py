"""SwiGLU: h = silu(gate) * up, in fp32 with one rounding to the input dtype.

The backward recomputes sigmoid(gate) from the saved gate and up instead of
storing the activation (which would be one more (tokens x intermediate) tensor):
    d_gate = dh * up * s * (1 + gate * (1 - s)),   d_up = dh * gate * s,   s = sigmoid(gate).
gate and up may be row-strided views (Phi-3 splits one fused projection with
``chunk(2, dim=-1)``): the kernels take a row stride per tensor, so no copy is made.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._library import NAMESPACE, reference_vjp
from ._triton_utils import check_float, check_same_device, empty, is_interpreter, next_power_of_2, use_triton

# elements per program tile: GPU tiles stay register-sized; the interpreter pays per program, not per element
TILE_ELEMENTS_GPU = 4096
TILE_ELEMENTS_INTERPRETER = 65536
MAX_BLOCK_COLS = 1024


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, h_ptr, n_rows, n_cols, gate_row_stride, up_row_stride, h_row_stride,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64))[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows * h_row_stride + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_rows, n_cols,
    dh_row_stride, gate_row_stride, up_row_stride, dgate_row_stride, dup_row_stride,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64))[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    dh = tl.load(dh_ptr + rows * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    d_gate = dh * u * s * (1.0 + g * (1.0 - s))
    d_up = dh * silu
    tl.store(dgate_ptr + rows * dgate_row_stride + cols, d_gate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * dup_row_stride + cols, d_up.to(dup_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, cols) view with unit column stride (copies only when unavoidable)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _tile(n_rows: int, n_cols: int):
    """(grid, BLOCK_R, BLOCK_C): up to 1024 columns per tile, rows filling the rest of the budget."""
    block_c = min(next_power_of_2(n_cols), MAX_BLOCK_COLS)
    budget = TILE_ELEMENTS_INTERPRETER if is_interpreter() else TILE_ELEMENTS_GPU
    block_r = max(1, min(next_power_of_2(n_rows), budget // block_c))
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c)), block_r, block_c


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = _as_rows(gate), _as_rows(up)
    n_rows, n_cols = g2.shape
    h = empty(n_rows, n_cols, dtype=gate.dtype, device=gate.device)
    if h.numel() > 0:
        grid, block_r, block_c = _tile(n_rows, n_cols)
        _swiglu_fwd_kernel[grid](
            g2, u2, h, n_rows, n_cols, g2.stride(0), u2.stride(0), h.stride(0),
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_r * block_c <= 2048 else 8)
    return h.view(gate.shape)


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    d2, g2, u2 = _as_rows(dh), _as_rows(gate), _as_rows(up)
    n_rows, n_cols = g2.shape
    d_gate = empty(n_rows, n_cols, dtype=gate.dtype, device=gate.device)
    d_up = empty(n_rows, n_cols, dtype=up.dtype, device=up.device)
    if d_gate.numel() > 0:
        grid, block_r, block_c = _tile(n_rows, n_cols)
        _swiglu_bwd_kernel[grid](
            d2, g2, u2, d_gate, d_up, n_rows, n_cols,
            d2.stride(0), g2.stride(0), u2.stride(0), d_gate.stride(0), d_up.stride(0),
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_r * block_c <= 2048 else 8)
    return d_gate.view(gate.shape), d_up.view(up.shape)


# =============================================================================== operators
@torch.library.custom_op(f"{NAMESPACE}::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if not use_triton(gate):
        return reference.swiglu(gate, up).contiguous()
    return swiglu_forward(gate, up)


@swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op(f"{NAMESPACE}::swiglu_backward", mutates_args=())
def swiglu_backward_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(gate):
        d_gate, d_up = reference_vjp(reference.swiglu, (gate, up), (True, True), (dh,))
        return d_gate.contiguous(), d_up.contiguous()
    return swiglu_backward(dh, gate, up)


@swiglu_backward_op.register_fake
def _(dh, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    d_gate, d_up = swiglu_backward_op(dh, gate, up)
    return (d_gate if ctx.needs_input_grad[0] else None, d_up if ctx.needs_input_grad[1] else None)


swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate/up of one shape (..., intermediate) and one dtype.

    Returns a tensor of gate's shape and dtype; gradients flow to gate and up.
    """
    check_float("gate", gate)
    check_float("up", up)
    check_same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have one dtype; got {gate.dtype} and {up.dtype}")
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least one dimension")
    return swiglu_op(gate, up)
