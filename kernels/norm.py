"""RMSNorm: y = x / rms(x) * (offset + weight), forward and backward (dx and dweight).

Casting follows the Hugging Face modules exactly (statistics always in fp32):
- offset == 0 (Llama, Mistral, Qwen2/3, Phi-3): normalise in fp32, round to x's
  dtype, then multiply by the weight; the output has the promoted dtype of x
  and weight (LlamaRMSNorm: ``weight * normed.to(input_dtype)``).
- offset != 0 (Gemma, Gemma-2/3: offset 1): multiply by (offset + weight) in
  fp32, then round once to x's dtype (``(normed * (1 + w.float())).type_as(x)``).

The forward saves the fp32 inverse rms per row (rows * 4 bytes) instead of
recomputing it. dweight is reduced deterministically: each backward program
sums its block of rows into an fp32 partial row, and the partials are summed
with torch afterwards (no atomics).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._library import NAMESPACE, reference_vjp
from ._triton_utils import check_float, check_same_device, empty, is_interpreter, next_power_of_2, use_triton

# the largest normalised dimension handled in one tile (a row lives in registers)
MAX_COLS = 65536
# elements per row-block tile (short rows are batched several per program)
TILE_ELEMENTS_GPU = 4096
TILE_ELEMENTS_INTERPRETER = 65536


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    n_rows, n_cols, x_row_stride, y_row_stride,
    eps, offset,
    LLAMA_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    normed = x * rstd[:, None]
    if LLAMA_CAST:
        # round to the input dtype first, then one multiply rounded to the output dtype
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        y = normed * w[None, :]
    else:
        y = normed * (offset + w[None, :])
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols, dy_row_stride, x_row_stride, dx_row_stride,
    rows_per_program, offset,
    LLAMA_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if LLAMA_CAST:
        scale = w
    else:
        scale = offset + w
    dw_acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)

    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        normed = x * rstd[:, None]
        if LLAMA_CAST:
            # the weight saw the rounded normalised value
            dw_acc += dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            dw_acc += dy * normed
        g = dy * scale[None, :]
        # d/dx [x * rstd] applied to g: rstd * (g - normed * mean(g * normed))
        dot = tl.sum(g * normed, axis=1) / n_cols
        dx = rstd[:, None] * (g - normed * dot[:, None])
        tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps): several short rows per program, one long row per program."""
    block_n = next_power_of_2(n_cols)
    if is_interpreter():  # the interpreter pays per program, not per element
        block_r = max(1, min(256, TILE_ELEMENTS_INTERPRETER // block_n))
    else:
        block_r = max(1, min(16, TILE_ELEMENTS_GPU // block_n))
    tile = block_n * block_r
    num_warps = 4 if tile <= 1024 else (8 if tile <= 8192 else 16)  # ~8-32 elements per thread
    return block_r, block_n, num_warps


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_float("x", x)
    check_float("weight", weight)
    check_same_device(x=x, weight=weight)
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be 1-D with x.shape[-1] elements; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.shape[-1] > MAX_COLS:
        raise ValueError(f"x.shape[-1] = {x.shape[-1]} exceeds the largest supported normalised size {MAX_COLS}")
    if not (eps >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps}")


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if offset == 0.0 else x.dtype


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    """Launch the forward kernel; returns (y, rstd) with rstd (rows,) fp32."""
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    n_rows = x2.shape[0]
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = empty(n_rows, n_cols, dtype=_out_dtype(x, weight, offset), device=x.device)
    rstd = empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block_r, block_n, num_warps = _tile(n_cols)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, w, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), float(eps), float(offset),
            LLAMA_CAST=offset == 0.0, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y.view(x.shape), rstd


def _n_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: few programs, each looping over many rows
        target = 4
    return max(1, min(n_rows, target))


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float):
    """Launch the backward kernel; returns (dx, dweight)."""
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    dy2 = _as_rows(dy, n_cols)
    n_rows = x2.shape[0]
    w = weight if weight.is_contiguous() else weight.contiguous()
    dx = empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    n_prog = _n_programs(n_rows, x.device) if n_rows > 0 else 1
    partial = empty(n_prog, n_cols, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        partial.zero_()
    else:
        block_r, block_n, num_warps = _tile(n_cols)
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_prog), block_r) * block_r
        n_prog = triton.cdiv(n_rows, rows_per_program)
        partial = partial[:n_prog]
        _rms_norm_bwd_kernel[(n_prog,)](
            dy2, x2, w, rstd, dx, partial, n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0),
            rows_per_program, float(offset),
            LLAMA_CAST=offset == 0.0, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
        )
    dweight = partial.sum(dim=0).to(weight.dtype)
    return dx.view(x.shape), dweight


# =============================================================================== operators
def _reference_forward(x, weight, eps, offset):
    y = reference.rms_norm(x, weight, eps, offset=offset).contiguous()
    xf = x.reshape(-1, x.shape[-1]).to(reference._compute_dtype(x))
    rstd = torch.rsqrt(xf.square().mean(dim=-1) + eps).to(torch.float32)
    return y, rstd


@torch.library.custom_op(f"{NAMESPACE}::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): rstd (rows,) fp32 is what the Triton backward reads."""
    if not use_triton(x):
        return _reference_forward(x, weight, eps, offset)
    return rms_norm_forward(x, weight, eps, offset)


@rms_norm_op.register_fake
def _(x, weight, eps, offset):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=_out_dtype(x, weight, offset)), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op(f"{NAMESPACE}::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                         eps: float, offset: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(x):
        dx, dw = reference_vjp(lambda a, b: reference.rms_norm(a, b, eps, offset=offset), (x, weight),
                               (True, True), (dy,))
        return dx.contiguous(), dw
    return rms_norm_backward(dy, x, weight, rstd, offset)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, eps, offset):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    x, weight, eps, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps, ctx.offset = eps, offset
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = rms_norm_backward_op(dy.contiguous(), x, weight, rstd, ctx.eps, ctx.offset)
    return (dx if ctx.needs_input_grad[0] else None, dweight if ctx.needs_input_grad[1] else None, None, None)


rms_norm_op.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` with a learnable ``weight`` (see module doc).

    x: (..., N) fp32/fp16/bf16; weight: (N,). Returns a tensor shaped like x whose dtype
    is promote(x, weight) when offset == 0 (Llama casting) and x's dtype otherwise (Gemma).
    Gradients flow to x and weight. Runs the operator ``torch.ops.fastsft.rms_norm``.
    """
    _check(x, weight, float(eps))
    return rms_norm_op(x, weight, float(eps), float(offset))[0]
