"""Masked cross-entropy and fused linear + cross-entropy (Triton).

Public ops (see shared/DESIGN.md for the API):

- ``cross_entropy(logits, labels, ...)``: one Triton program per row streams the
  vocabulary in blocks with an online max / sum-of-exp in fp32 (any vocab size,
  int64 row offsets). Forward writes the per-row loss and row statistics; backward
  re-reads the logits once and writes the gradient, scaled by the upstream
  gradient (scalar for "mean"/"sum", per row for "none") read from device
  memory, so nothing waits on the host.
- ``linear_cross_entropy(hidden, weight, labels, ...)``: never builds the full
  (tokens x vocab) logits. Token chunks: logits_chunk = hidden_chunk @ W^T (cuBLAS),
  the same Triton kernel turns it into loss + dlogits in place, then
  grad_hidden_chunk = dlogits @ W and grad_W += dlogits^T @ hidden_chunk. For
  "mean"/"sum" the gradients are computed in the forward pass (no second matmul
  over the logits) and scaled by grad_output in backward; for "none" the
  upstream gradient is per token, so backward recomputes the chunks.
  Weight-gradient accumulation: cuBLAS ``addmm_`` into a grad_W of the weight's
  dtype, fp32 math inside each chunk's GEMM and one rounding per chunk (chunks are
  large, so a handful of roundings). An fp32 accumulator would cost 4*V*H bytes
  (2 GiB at 128k x 4096, over the 5% extra-memory target) and torch has no
  in-place bf16 x bf16 -> fp32 addmm; fp32 weights (and fp32 master weights under
  autocast, whose bf16 gradient is upcast) accumulate in their own dtype.
  grad_bias accumulates in fp32.

Inputs are rows: logits (N, V) / hidden (N, H) with labels (N,). Leading batch
dimensions, e.g. (B, T, V) with labels (B, T), are flattened for the caller;
``reduction="none"`` returns the loss in the labels' shape.

Numerics: fp32 inside; masked logits (-inf, finfo.min, e.g. a -inf bias on padded
vocabulary rows) give finite losses and gradients; the softcap's tanh is libdevice's
on the GPU and a series/exp formula accurate near 0 under the interpreter.

No host sync: the ops never read a device value back. Labels are not range-checked
here: a label outside [0, V) other than ``ignore_index`` is never read and gives a
NaN loss and gradient for its row, so the error cannot pass silently. Validate
labels on the host, once per batch, with ``check_labels`` (ValueError), as the
trainer's data pipeline does.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import reference
from ._library import NAMESPACE, nothing, reference_vjp
from ._triton_utils import check_float, check_same_device, empty, next_power_of_2, use_triton

_REDUCTIONS = ("mean", "sum", "none")
# Chunk logits of linear_cross_entropy (unless chunk_size is given): at most 1/8 of the full
# logits in the input dtype (1/40 of the fp32-upcast approach's peak), clamped to [64, 512] MiB:
# few enough chunks that the GEMMs stay large (M >= 128 rows) and grad_W is rounded rarely.
_CHUNK_BUDGET_BYTES = 512 * 2**20
_CHUNK_MIN_BYTES = 64 * 2**20
_CHUNK_FRACTION = 8
_MIN_CHUNK_ROWS = 128


# =============================================================================== Triton kernels
_LOG2E = tl.constexpr(1.4426950408889634)
# tanh(x) = x * P(x^2) for |x| < _TANH_SERIES_MAX (Taylor terms up to x^15: under 3 ulp
# there), 1 - 2 / (exp(2|x|) + 1) above, where that difference no longer cancels.
_TANH_SERIES_MAX = tl.constexpr(0.55)


@triton.jit
def _tanh_portable(x):
    """tanh accurate to a few ulp everywhere, near 0 included (2 * sigmoid(2x) - 1 is
    not: it cancels to 0 for tiny x). Used where libdevice is unavailable (interpreter)."""
    a = tl.abs(x)
    s = tl.minimum(a, _TANH_SERIES_MAX)  # keeps the unused series finite for large |x|
    s2 = s * s
    p = -0.00014558343870513183 * s2 + 0.000590027440945586
    p = p * s2 - 0.0014558343870513183
    p = p * s2 + 0.003592128036572481
    p = p * s2 - 0.008863235529902197
    p = p * s2 + 0.021869488536155203
    p = p * s2 - 0.05396825396825397
    p = p * s2 + 0.13333333333333333
    p = p * s2 - 0.3333333333333333
    series = s + s * s2 * p
    tail = 1.0 - 2.0 / (tl.exp2(a * (2.0 * _LOG2E)) + 1.0)
    t = tl.where(a < _TANH_SERIES_MAX, series, tail)
    return tl.where(x < 0, -t, t)


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(x)  # the GPU's tanhf (CUDA __nv_tanhf / ROCm ocml)
    else:
        return _tanh_portable(x)


@triton.jit
def _load_logits(row_ptr, offs, mask, softcap, HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr):
    """A block of (optionally soft-capped) logits in fp32; -inf outside the row."""
    x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap, LIBDEVICE)
    return tl.where(mask, x, float("-inf"))


@triton.jit
def _ce_rows_kernel(
    logits_ptr, logits_row_stride,
    labels_ptr,
    loss_ptr,                 # fp32 (N,): per-row loss, written when WRITE_LOSS
    stats_ptr,                # fp32 (N, 2): row max m and log(sum exp(x - m)); read when STATS_GIVEN
    grad_ptr, grad_row_stride,  # d loss / d logits, written when WRITE_GRAD (may alias logits)
    scale_ptr, scale_stride,  # fp32 upstream-gradient factor: stride 0 scalar or 1 per row
    n_cols, ignore_index,
    label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: loss and/or d loss / d logits.

    lse = m + log_d is kept as that unevaluated sum: x - lse is computed as (x - m) - log_d,
    both steps nearly exact, so p = exp2((x - lse) * log2e) stays as accurate as torch's
    even for logits in the hundreds (one fp32 lse would round away ~|lse| * 6e-8).
    Masked logits (-inf, finfo.min) give p = 0 and never a NaN: the running max is
    replaced by 0 while it is still -inf, and terms with a zero weight are skipped.
    """
    tl.static_assert(not (STATS_GIVEN and WRITE_LOSS), "the loss needs pass 1 (sum of logits)")
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK)
    label = tl.load(labels_ptr + row).to(tl.int64)

    if label == ignore_index:
        if WRITE_LOSS:
            tl.store(loss_ptr + row, 0.0)
            tl.store(stats_ptr + 2 * row, 0.0)
            tl.store(stats_ptr + 2 * row + 1, 0.0)
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                zeros = tl.zeros([BLOCK], dtype=tl.float32)
                tl.store(grad_row_ptr + offs, zeros.to(grad_ptr.dtype.element_ty), mask=offs < n_cols)
        return

    # A label outside [0, V) is never read: its row's loss and gradient are NaN (no host
    # check here; the data pipeline validates labels, see check_labels).
    label_ok = (label >= 0) & (label < n_cols)

    # pass 1: online max and sum of exp(x - m), exp taken as exp2 (the native instruction)
    mean_x = 0.0
    if STATS_GIVEN:
        m = tl.load(stats_ptr + 2 * row)
        log_d = tl.load(stats_ptr + 2 * row + 1)
    else:
        m = float("-inf")
        d = 0.0
        inv_n = 1.0 / n_cols
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = _load_logits(row_ptr, offs, mask, softcap, HAS_SOFTCAP, LIBDEVICE)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp2(-inf) = 0
            d = d * tl.exp2((m - m_ref) * _LOG2E) + tl.sum(tl.exp2((x - m_ref) * _LOG2E), axis=0)
            m = m_new
            if WRITE_LOSS:
                # the mean as a sum of x / V: stays finite for finfo.min logits
                mean_x += tl.sum(tl.where(mask, x * inv_n, 0.0), axis=0)
        log_d = tl.log(d)
    lse = m + log_d

    if WRITE_LOSS:
        x_label = tl.load(row_ptr + tl.where(label_ok, label, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            x_label = softcap * _tanh(x_label / softcap, LIBDEVICE)
        # (m - x) + log_d: the same split as the gradient, exact for x near the max
        nll = (m - x_label) + log_d
        loss = tl.where(label_smoothing < 1.0, (1.0 - label_smoothing) * nll, 0.0)
        smooth = (m - mean_x) + log_d
        loss += tl.where(label_smoothing > 0.0, label_smoothing * smooth, 0.0)
        loss += tl.where(z_loss > 0.0, z_loss * lse * lse, 0.0)
        loss = tl.where(label_ok, loss, float("nan"))
        tl.store(loss_ptr + row, loss)
        if not STATS_GIVEN:
            tl.store(stats_ptr + 2 * row, m)
            tl.store(stats_ptr + 2 * row + 1, log_d)

    if WRITE_GRAD:
        # d loss / d x_j = p_j (1 + 2 z lse) - (1 - s) [j == y] - s / V, then the
        # softcap chain rule 1 - tanh^2; all times the upstream factor.
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        uniform = scale * label_smoothing / n_cols
        target = scale * (1.0 - label_smoothing)
        bad = tl.where(label_ok, 0.0, float("nan"))  # a NaN gradient row for a bad label
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = _load_logits(row_ptr, offs, mask, softcap, HAS_SOFTCAP, LIBDEVICE)
            p = tl.exp2(((x - m) - log_d) * _LOG2E)
            g = p * p_scale - uniform
            g = tl.where(offs == label, g - target, g) + bad
            if HAS_SOFTCAP:
                t = tl.where(mask, x / softcap, 0.0)  # x is -inf outside the row
                g = g * (1.0 - t * t)
            tl.store(grad_row_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _count_trained_kernel(labels_ptr, n_rows, ignore_index, count_ptr, BLOCK: tl.constexpr):
    """count[0] = number of labels that are not ignore_index (the "mean" divisor).

    One program: the labels are tiny next to the logits, and a single pass needs
    neither atomics nor a zeroed output.
    """
    offs0 = tl.arange(0, BLOCK)
    n_trained = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_rows, BLOCK):
        offs = start + offs0
        mask = offs < n_rows
        y = tl.load(labels_ptr + offs, mask=mask, other=ignore_index).to(tl.int64)
        n_trained += (mask & (y != ignore_index)).to(tl.int32)
    tl.store(count_ptr, tl.sum(n_trained, axis=0))


@triton.jit
def _scale_inplace_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """x *= scale (a device scalar), computed in fp32 so half tensors round once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(scale_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x * s).to(x_ptr.dtype.element_ty), mask=mask)


# =============================================================================== launchers
def _row_block(n_cols: int) -> tuple[int, int]:
    """Vocab block and warps: big blocks amortise the per-block reductions."""
    block = min(next_power_of_2(n_cols), 8192)
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def _use_libdevice() -> bool:
    """libdevice's tanh on GPU builds; the interpreter has no extern functions."""
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(_ce_rows_kernel, InterpretedFunction)


def _launch_ce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: Optional[torch.Tensor],
    stats: torch.Tensor,
    stats_given: bool,
    grad: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> None:
    """stats: fp32 (N, 2) row max and log-sum-exp offset, written in forward, read in backward."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    if logits.stride(1) != 1 or (grad is not None and grad.stride(1) != 1):
        raise ValueError("cross-entropy kernel: logits and grad rows must have unit stride")
    block, num_warps = _row_block(n_cols)
    write_grad = grad is not None
    if write_grad:
        scale_stride = 0 if scale.dim() == 0 else 1
    _ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0),
        labels,
        loss if loss is not None else stats, stats,
        grad if write_grad else logits, grad.stride(0) if write_grad else 0,
        scale if write_grad else stats, scale_stride if write_grad else 0,
        n_cols, int(ignore_index),
        float(label_smoothing), float(z_loss), float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        WRITE_LOSS=loss is not None,
        STATS_GIVEN=stats_given,
        WRITE_GRAD=write_grad,
        LIBDEVICE=_use_libdevice(),
        BLOCK=block,
        num_warps=num_warps,
    )


def _scale_inplace(x: torch.Tensor, scale: torch.Tensor) -> None:
    n = x.numel()
    if n == 0:
        return
    block = 4096
    _scale_inplace_kernel[(triton.cdiv(n, block),)](x, scale, n, BLOCK=block, num_warps=8)


def _trained_count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Device int32 scalar: the number of labels that are not ignore_index. No host sync."""
    count = empty(1, dtype=torch.int32, device=labels.device)
    _count_trained_kernel[(1,)](labels, labels.numel(), int(ignore_index), count, BLOCK=1024, num_warps=4)
    return count[0]


def out_of_range_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> torch.Tensor:
    """Bool mask of the labels the loss kernels would turn into NaN rows: trained, outside [0, V)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise ValueError unless every label is ignore_index or in [0, vocab_size).

    The ops themselves never check (a check on the GPU would cost a host sync per
    call); a bad label gives a NaN loss and gradient for its row. Call this where the
    labels are still on the host, e.g. once per batch in the data pipeline: on CPU
    tensors it costs no device sync (a CUDA tensor costs one).
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    flat = labels.reshape(-1)
    positions = torch.nonzero(out_of_range_labels(flat, vocab_size, ignore_index)).reshape(-1)
    if positions.numel():
        first = int(positions[0])
        raise ValueError(f"labels: {positions.numel()} label(s) outside [0, {vocab_size}) that are not "
                         f"ignore_index={ignore_index} (first: {int(flat[first])} at flat index {first})")


def _upstream_scale(grad_output: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    """fp32 factor the kernels multiply into d loss_row / d logits: 0-dim or (N,)."""
    g = grad_output.detach().to(torch.float32)
    if reduction == "none":
        return g.reshape(-1).contiguous()
    if reduction == "mean":
        g = g / divisor
    return g.reshape(()).contiguous()


def _unit_scale(reduction: str, divisor, device) -> torch.Tensor:
    """d reduced loss / d loss_row for an upstream gradient of 1: 1 / divisor ("mean") or 1 ("sum")."""
    return _upstream_scale(torch.ones((), dtype=torch.float32, device=device), reduction, divisor)


def _reduce(loss_rows: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / divisor if reduction == "mean" else total


# =============================================================================== input checks
def _check_options(reduction, ignore_index, num_items, z_loss, softcap, label_smoothing=0.0):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}")
            if num_items.is_complex():
                raise ValueError("num_items must be real")
        elif isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
            raise ValueError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
        elif num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if float(z_loss) < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def _check_labels_tensor(labels, rows_shape, what: str):
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels has dtype {str(labels.dtype).replace('torch.', '')}; expected an integer dtype (int64)")
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {tuple(rows_shape)} "
                         f"(the leading dimensions of {what})")


# =============================================================================== cross_entropy
def _num_items_args(num_items):
    """num_items as the operators take it: (tensor or None, number or None)."""
    if isinstance(num_items, torch.Tensor):
        return num_items, None
    return None, (float(num_items) if num_items is not None else None)


def _divisor_tensor(reduction, num_items_t, num_items_f, labels, ignore_index, count_fn) -> torch.Tensor:
    """The "mean" divisor (>= 1) as a 0-dim fp32 device tensor; 1 for "sum"/"none". No host sync."""
    device = labels.device
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    if num_items_t is not None:
        return num_items_t.detach().to(device=device, dtype=torch.float32).reshape(()).clamp(min=1.0)
    if num_items_f is not None:
        return torch.full((), max(num_items_f, 1.0), dtype=torch.float32, device=device)
    return count_fn(labels, ignore_index).to(torch.float32).clamp(min=1.0)


def _reference_count(labels, ignore_index):
    return (labels != ignore_index).sum()


def _reference_stats(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) fp32 row max and log-sum-exp offset of (softcapped) logits, as the kernel keeps them."""
    x = x.to(torch.float32)
    m = x.amax(dim=-1)
    finite = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.stack((m, torch.logsumexp(x - finite[:, None], dim=-1)), dim=-1)


def _softcapped(logits, softcap):
    x = logits.to(torch.float32)
    return softcap * torch.tanh(x / softcap) if softcap is not None else x


@torch.library.custom_op(f"{NAMESPACE}::cross_entropy", mutates_args=())
def cross_entropy_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str,
                     num_items_tensor: Optional[torch.Tensor], num_items_value: Optional[float],
                     label_smoothing: float, z_loss: float,
                     softcap: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats (N, 2) fp32, divisor 0-dim fp32) of logits rows (N, V) with labels (N,)."""
    if not use_triton(logits):
        divisor = _divisor_tensor(reduction, num_items_tensor, num_items_value, labels, ignore_index,
                                  _reference_count)
        rows = reference.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        return _reduce(rows.to(torch.float32), reduction, divisor), _reference_stats(_softcapped(logits, softcap)), divisor
    divisor = _divisor_tensor(reduction, num_items_tensor, num_items_value, labels, ignore_index, _trained_count)
    n_rows = logits.shape[0]
    loss_rows = empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    _launch_ce_rows(logits, labels, loss=loss_rows, stats=stats, stats_given=False, grad=None, scale=None,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return _reduce(loss_rows, reduction, divisor), stats, divisor


def _loss_like(rows_of: torch.Tensor, reduction: str) -> torch.Tensor:
    shape = (rows_of.shape[0],) if reduction == "none" else ()
    return rows_of.new_empty(shape, dtype=torch.float32)


@cross_entropy_op.register_fake
def _(logits, labels, ignore_index, reduction, num_items_tensor, num_items_value, label_smoothing, z_loss, softcap):
    n = logits.shape[0]
    return (_loss_like(logits, reduction), logits.new_empty(n, 2, dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op(f"{NAMESPACE}::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad_output: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                              stats: torch.Tensor, divisor: torch.Tensor, ignore_index: int, reduction: str,
                              label_smoothing: float, z_loss: float, softcap: Optional[float]) -> torch.Tensor:
    """d loss / d logits (logits' shape and dtype), scaled by the upstream gradient."""
    scale = _upstream_scale(grad_output, reduction, divisor)
    if not use_triton(logits):
        def rows_loss(x):
            return reference.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none",
                                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        cot = scale.expand(logits.shape[0]) if scale.dim() == 0 else scale
        (grad,) = reference_vjp(rows_loss, (logits,), (True,), (cot,))
        return grad.to(logits.dtype).contiguous()
    grad = empty(*logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_ce_rows(logits, labels, loss=None, stats=stats, stats_given=True, grad=grad, scale=scale,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return grad


@cross_entropy_backward_op.register_fake
def _(grad_output, logits, labels, stats, divisor, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return logits.new_empty(logits.shape)


def _ce_setup(ctx, inputs, output):
    logits, labels, ignore_index, reduction, _, _, label_smoothing, z_loss, softcap = inputs
    _, stats, divisor = output
    ctx.save_for_backward(logits, labels, stats, divisor)
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    ctx.mark_non_differentiable(stats, divisor)


def _ce_backward(ctx, grad_output, _dstats, _ddivisor):
    logits, labels, stats, divisor = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = cross_entropy_backward_op(grad_output, logits, labels, stats, divisor, *ctx.options)
    return grad, None, None, None, None, None, None, None, None


cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Masked cross-entropy of logits (..., V) against labels (...); see reference.cross_entropy.

    Returns a float32 loss (0-dim for "mean"/"sum", labels' shape for "none").
    """
    check_float("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, V) or (..., V), got {tuple(logits.shape)}")
    _check_labels_tensor(labels, logits.shape[:-1], "logits")
    check_same_device(logits=logits, labels=labels)
    _check_options(reduction, ignore_index, num_items, z_loss, softcap, label_smoothing)
    n_cols = logits.shape[-1]
    if n_cols == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    rows = logits.reshape(-1, n_cols)
    flat_labels = labels.reshape(-1)

    if rows.stride(-1) != 1:
        rows = rows.contiguous()  # the kernel streams rows with unit stride
    flat_labels = flat_labels.contiguous()
    loss = cross_entropy_op(rows, flat_labels, ignore_index, reduction, *_num_items_args(num_items),
                            float(label_smoothing), float(z_loss), float(softcap) if softcap is not None else None)[0]
    return loss.reshape(labels.shape) if reduction == "none" else loss


# =============================================================================== linear_cross_entropy
def _auto_chunk_rows(n_rows: int, n_vocab: int, element_size: int) -> int:
    """Token rows per chunk (a multiple of 128 unless one chunk holds every row); see _CHUNK_*."""
    row_bytes = max(1, n_vocab * element_size)
    budget = min(_CHUNK_BUDGET_BYTES, max(_CHUNK_MIN_BYTES, n_rows * row_bytes // _CHUNK_FRACTION))
    rows = budget // row_bytes
    rows = max(_MIN_CHUNK_ROWS, rows // _MIN_CHUNK_ROWS * _MIN_CHUNK_ROWS)
    return max(1, min(n_rows, rows))


def _chunk_logits(hidden_chunk, weight, bias, out):
    if bias is None:
        return torch.mm(hidden_chunk, weight.t(), out=out)
    return torch.addmm(bias, hidden_chunk, weight.t(), out=out)


def _backprop_chunk(dlogits, hidden_chunk, weight, grad_hidden_chunk, grad_weight, grad_bias, first: bool):
    """grad_hidden_chunk = dlogits @ W; grad_W (+)= dlogits^T @ h; grad_bias (+)= sum(dlogits)."""
    if grad_hidden_chunk is not None:
        torch.mm(dlogits, weight, out=grad_hidden_chunk)
    if grad_weight is not None:
        if first:
            torch.mm(dlogits.t(), hidden_chunk, out=grad_weight)
        else:
            grad_weight.addmm_(dlogits.t(), hidden_chunk)
    if grad_bias is not None:
        if first:
            torch.sum(dlogits, dim=0, dtype=torch.float32, out=grad_bias)
        else:
            grad_bias.add_(dlogits.sum(dim=0, dtype=torch.float32))


def _run_chunks(hidden, weight, bias, labels, *, chunk_rows, loss_rows, stats, stats_given,
                scale, grads, options):
    """Stream token chunks through matmul -> CE kernel (in place) -> gradient matmuls."""
    ignore_index, label_smoothing, z_loss, softcap = options
    grad_hidden, grad_weight, grad_bias = grads
    write_grad = scale is not None
    n_rows = hidden.shape[0]
    n_vocab = weight.shape[0]
    if n_rows == 0:  # no chunk runs: the accumulated gradients are zero
        for g in (grad_weight, grad_bias):
            if g is not None:
                g.zero_()
        return
    buf = empty(min(chunk_rows, n_rows), n_vocab, dtype=hidden.dtype, device=hidden.device)
    for index, start in enumerate(range(0, n_rows, chunk_rows)):
        end = min(start + chunk_rows, n_rows)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias, buf[: end - start])
        chunk_scale = None
        if write_grad:
            chunk_scale = scale if scale.dim() == 0 else scale[start:end]
        _launch_ce_rows(
            logits, labels[start:end],
            loss=None if stats_given else loss_rows[start:end],
            stats=stats[start:end], stats_given=stats_given,
            grad=logits if write_grad else None, scale=chunk_scale,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        )
        if write_grad:
            _backprop_chunk(logits, h, weight,
                            grad_hidden[start:end] if grad_hidden is not None else None,
                            grad_weight, grad_bias, first=index == 0)


def _reference_lce_rows(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, softcap):
    return reference.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                          reduction="none", softcap=softcap, z_loss=z_loss,
                                          label_smoothing=label_smoothing)


def _reference_lce_grads(hidden, weight, bias, labels, scale, needs, options):
    """Gradients of the reference loss rows, each row scaled by ``scale`` (0-dim or (N,))."""
    ignore_index, label_smoothing, z_loss, softcap = options
    cot = scale.expand(hidden.shape[0]) if scale.dim() == 0 else scale
    primals = (hidden, weight, bias) if bias is not None else (hidden, weight)
    grads = reference_vjp(
        lambda h, w, *b: _reference_lce_rows(h, w, b[0] if b else None, labels, ignore_index, label_smoothing,
                                             z_loss, softcap),
        primals, needs[:len(primals)], (cot,))
    grads = list(grads) + [None] * (3 - len(grads))
    gh, gw, gb = grads
    return (gh.to(hidden.dtype).contiguous() if gh is not None else None,
            gw.to(weight.dtype).contiguous() if gw is not None else None,
            gb.to(torch.float32) if gb is not None else None)


def _or_nothing(t, like):
    return t if t is not None else nothing(like)


@torch.library.custom_op(f"{NAMESPACE}::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ignore_index: int, reduction: str, num_items_tensor: Optional[torch.Tensor], num_items_value: Optional[float],
    softcap: Optional[float], z_loss: float, label_smoothing: float, chunk_rows: int,
    needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias (fp32), stats (N, 2) fp32, divisor 0-dim fp32).

    For "mean"/"sum" with some gradient wanted, the gradients are computed here, for an
    upstream gradient of 1 of the reduced loss (the 1 / divisor of "mean" is applied to
    d loss / d logits in fp32, before the matmuls round to the inputs' dtype: one rounding, as
    autograd through the unfused loss has), and multiplied by the upstream gradient in the
    backward operator; otherwise they
    come back empty and the backward recomputes the chunks. Never builds N x V logits
    (on the Triton path; the reference path does)."""
    needs = (needs_hidden, needs_weight, needs_bias and bias is not None)
    precompute = any(needs) and reduction != "none"
    options = (ignore_index, label_smoothing, z_loss, softcap)
    device = hidden.device
    if not use_triton(hidden):
        divisor = _divisor_tensor(reduction, num_items_tensor, num_items_value, labels, ignore_index,
                                  _reference_count)
        rows = _reference_lce_rows(hidden, weight, bias, labels, *options).to(torch.float32)
        logits = torch.nn.functional.linear(hidden, weight, bias)
        stats = _reference_stats(_softcapped(logits, softcap))
        grads = (None, None, None)
        if precompute:
            grads = _reference_lce_grads(hidden, weight, bias, labels, _unit_scale(reduction, divisor, device),
                                         needs, options)
        return (_reduce(rows, reduction, divisor), *(_or_nothing(g, hidden) for g in grads), stats, divisor)
    divisor = _divisor_tensor(reduction, num_items_tensor, num_items_value, labels, ignore_index, _trained_count)
    n_rows = hidden.shape[0]
    grads = _allocate_grads(hidden, weight, bias, needs) if precompute else (None, None, None)
    loss_rows = empty(n_rows, dtype=torch.float32, device=device)
    stats = empty(n_rows, 2, dtype=torch.float32, device=device)
    unit = _unit_scale(reduction, divisor, device) if precompute else None
    with torch.autocast(device.type, enabled=False):  # inputs are already cast; keep out= matmuls exact
        _run_chunks(hidden, weight, bias, labels, chunk_rows=chunk_rows, loss_rows=loss_rows, stats=stats,
                    stats_given=False, scale=unit, grads=grads, options=options)
    return (_reduce(loss_rows, reduction, divisor), *(_or_nothing(g, hidden) for g in grads), stats, divisor)


def _fake_grads(hidden, weight, bias, needs):
    return (hidden.new_empty(hidden.shape) if needs[0] else nothing(hidden),
            weight.new_empty(weight.shape) if needs[1] else nothing(hidden),
            bias.new_empty(bias.shape, dtype=torch.float32) if needs[2] else nothing(hidden))


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, num_items_tensor, num_items_value, softcap, z_loss,
      label_smoothing, chunk_rows, needs_hidden, needs_weight, needs_bias):
    needs = (needs_hidden, needs_weight, needs_bias and bias is not None)
    precompute = any(needs) and reduction != "none"
    n_rows = hidden.shape[0]
    grads = _fake_grads(hidden, weight, bias, needs) if precompute else tuple(nothing(hidden) for _ in range(3))
    return (_loss_like(hidden, reduction), *grads, hidden.new_empty(n_rows, 2, dtype=torch.float32),
            hidden.new_empty((), dtype=torch.float32))


@torch.library.custom_op(f"{NAMESPACE}::linear_cross_entropy_scale_grads", mutates_args=())
def linear_cross_entropy_scale_grads(grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor,
                                     grad_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of "mean"/"sum": the forward's gradients (those of the reduced loss) times the
    upstream scalar (1 in training: an exact multiply).

    Out of place: an operator cannot update its forward's outputs in place and stay
    functional (torch.compile, AOT autograd and opcheck require it), so this costs one
    transient of the gradients' size at the loss backward (the forward's copies are freed
    when the backward returns) and makes retain_graph work."""
    scale = grad_output.detach().to(torch.float32).reshape(()).contiguous()
    out = []
    for g in (grad_hidden, grad_weight, grad_bias):
        if use_triton(g):
            g = g.clone()
            _scale_inplace(g, scale)  # fp32 multiply, one rounding, as before
        else:
            g = (g.to(torch.float32) * scale).to(g.dtype)
        out.append(g)
    return tuple(out)


@linear_cross_entropy_scale_grads.register_fake
def _(grad_hidden, grad_weight, grad_bias, grad_output):
    return tuple(g.new_empty(g.shape) for g in (grad_hidden, grad_weight, grad_bias))


@torch.library.custom_op(f"{NAMESPACE}::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_output: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, stats: torch.Tensor, divisor: torch.Tensor, ignore_index: int, reduction: str,
    softcap: Optional[float], z_loss: float, label_smoothing: float, chunk_rows: int,
    needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward that recomputes the chunks ("none", or gradients not computed in forward)."""
    needs = (needs_hidden, needs_weight, needs_bias and bias is not None)
    options = (ignore_index, label_smoothing, z_loss, softcap)
    scale = _upstream_scale(grad_output, reduction, divisor)
    if not use_triton(hidden):
        grads = _reference_lce_grads(hidden, weight, bias, labels, scale, needs, options)
        return tuple(_or_nothing(g, hidden) for g in grads)
    grads = _allocate_grads(hidden, weight, bias, needs)
    with torch.autocast(hidden.device.type, enabled=False):
        _run_chunks(hidden, weight, bias, labels, chunk_rows=chunk_rows, loss_rows=None, stats=stats,
                    stats_given=True, scale=scale, grads=grads, options=options)
    return tuple(_or_nothing(g, hidden) for g in grads)


@linear_cross_entropy_backward_op.register_fake
def _(grad_output, hidden, weight, bias, labels, stats, divisor, ignore_index, reduction, softcap, z_loss,
      label_smoothing, chunk_rows, needs_hidden, needs_weight, needs_bias):
    grads = _fake_grads(hidden, weight, bias, (needs_hidden, needs_weight, needs_bias and bias is not None))
    return grads


def _lce_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, reduction, _, _, softcap, z_loss, label_smoothing, chunk_rows,
     needs_hidden, needs_weight, needs_bias) = inputs
    _, grad_hidden, grad_weight, grad_bias, stats, divisor = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias, stats, divisor)
    needs = (needs_hidden, needs_weight, needs_bias and bias is not None)
    ctx.precompute = any(needs) and reduction != "none"
    ctx.flags = needs
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.options = (ignore_index, reduction, softcap, z_loss, label_smoothing, chunk_rows)
    if ctx.precompute:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, stats, divisor)


def _lce_backward(ctx, grad_output, *_unused):
    needs = ctx.flags
    if ctx.precompute:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = linear_cross_entropy_scale_grads(
            grad_hidden, grad_weight, grad_bias, grad_output)
    else:
        hidden, weight, bias, labels, stats, divisor = ctx.saved_tensors
        ignore_index, reduction, softcap, z_loss, label_smoothing, chunk_rows = ctx.options
        grad_hidden, grad_weight, grad_bias = linear_cross_entropy_backward_op(
            grad_output, hidden, weight, bias, labels, stats, divisor, ignore_index, reduction, softcap, z_loss,
            label_smoothing, chunk_rows, *needs)
    grads = [g if n and ctx.needs_input_grad[i] else None
             for i, (g, n) in enumerate(zip((grad_hidden, grad_weight, grad_bias), needs))]
    if grads[2] is not None:
        grads[2] = grads[2].to(ctx.bias_dtype)  # accumulated in fp32
    return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)


linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup)


def _allocate_grads(hidden, weight, bias, needs):
    """Gradient buffers. grad_W accumulates in the weight's dtype through cuBLAS (fp32 math
    inside every chunk's GEMM); grad_bias accumulates in fp32 (it is tiny)."""
    grad_hidden = empty(*hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None
    grad_weight = empty(*weight.shape, dtype=weight.dtype, device=weight.device) if needs[1] else None
    grad_bias = None
    if bias is not None and needs[2]:
        grad_bias = empty(*bias.shape, dtype=torch.float32, device=bias.device)
    return grad_hidden, grad_weight, grad_bias


def _autocast_inputs(hidden, weight, bias):
    """Under torch.autocast, cast like F.linear would (e.g. fp32 master weights, bf16 math)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in (torch.float16, torch.bfloat16):
        return hidden, weight, bias
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in (hidden, weight, bias)]
    return tuple(cast)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, labels) without the full logits.

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...). ``chunk_size`` is
    the number of token rows per chunk (default: adapted to V so the chunk logits stay
    within ~512 MiB). ``label_smoothing``, ``z_loss`` and ``softcap`` are those of
    cross_entropy (label_smoothing comes last, after DESIGN.md's arguments). Returns a
    float32 loss.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (N, H) or (..., H), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden has {hidden.shape[-1]} "
                         f"features; expected weight (V, {hidden.shape[-1]})")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    _check_labels_tensor(labels, hidden.shape[:-1], "hidden")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    _check_options(reduction, ignore_index, num_items, z_loss, softcap, label_smoothing)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    rows = rows.contiguous()
    weight_c = weight.contiguous()
    chunk_rows = chunk_size or _auto_chunk_rows(rows.shape[0], weight.shape[0], rows.element_size())
    bias_c = bias.contiguous() if bias is not None else None
    # Which gradients to compute is decided here, from grad mode and requires_grad: the
    # forward computes them for "mean"/"sum" (evaluation under no_grad pays for none).
    grad_on = torch.is_grad_enabled()
    loss = linear_cross_entropy_op(
        rows, weight_c, bias_c, flat_labels.contiguous(), ignore_index, reduction, *_num_items_args(num_items),
        float(softcap) if softcap is not None else None, float(z_loss), float(label_smoothing), int(chunk_rows),
        grad_on and rows.requires_grad, grad_on and weight_c.requires_grad,
        grad_on and bias_c is not None and bias_c.requires_grad)[0]
    return loss.reshape(labels.shape) if reduction == "none" else loss
