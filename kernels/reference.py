"""Pure-PyTorch definitions of every fastsft op.

These are the test oracle (run them in float64 for the parity tests) and the
CPU path of the public API. They favour clarity over speed and may build large
intermediates (full logits, full attention matrices). Arithmetic happens in
float32, or float64 when the inputs are float64; results are cast back the way
the fused kernels cast them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- loss
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
    """Masked cross-entropy over rows of ``logits`` (N, V) with ``labels`` (N,).

    Per trained row: (1 - s) * (lse - x[y]) + s * (lse - mean(x)) + z_loss * lse**2,
    where x are the (optionally tanh-softcapped) logits and s the label smoothing; a
    term whose weight is 0 is left out (so -inf logits give no 0 * inf). Ignored rows
    contribute 0; a trained label outside [0, V) gives NaN for its row (never an
    index error: the fused kernels behave the same). "mean" divides the sum by
    ``num_items`` when given, else by the number of trained rows (an all-ignored
    input gives 0, not NaN).
    """
    x = logits.to(_compute_dtype(logits))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    n_vocab = x.shape[-1]
    mask = labels != ignore_index
    in_range = (labels >= 0) & (labels < n_vocab)
    safe_labels = torch.where(mask & in_range, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.zeros_like(lse)
    if label_smoothing < 1.0:
        nll = lse - x.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        loss = loss + (1.0 - label_smoothing) * nll
    if label_smoothing > 0.0:
        smooth = lse - (x / n_vocab).sum(dim=-1)  # a sum of x / V: finite for finfo.min logits
        loss = loss + label_smoothing * smooth
    if z_loss:
        loss = loss + z_loss * lse.square()
    # a product, so that the row's gradient is NaN too (a factor 1 on ignored rows,
    # whose zero gradient must stay 0 rather than 0 * NaN)
    loss = loss * torch.where(in_range | ~mask, 1.0, float("nan")).to(loss.dtype)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_items is None:
        divisor = mask.sum().clamp(min=1).to(total.dtype)
    else:
        divisor = torch.as_tensor(num_items, dtype=total.dtype, device=total.device).clamp(min=1)
    return total / divisor


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
    """cross_entropy(hidden @ weight.T + bias, labels), building the full logits.

    ``chunk_size`` only shapes the fused kernel's schedule; it does not change the result.
    """
    del chunk_size
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction=reduction,
        num_items=num_items, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )


# --------------------------------------------------------------------------- norm / rope / swiglu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm with statistics in float32: y = x / rms(x) * (offset + weight).

    offset=0 follows Llama's casting (normalise in fp32, cast to x's dtype, then
    multiply by the weight); offset!=0 follows Gemma's (multiply by (offset + weight)
    in fp32, then cast).
    """
    dt = _compute_dtype(x)
    xf = x.to(dt)
    normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.to(dt))).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding (Hugging Face's rotate-half convention) of q and k.

    q: (batch, n_heads, seq, head_dim), k: (batch, n_kv_heads, seq, head_dim);
    cos/sin: (batch, seq, rot_dim) or (seq, rot_dim) as the model computed them
    (so restarting positions in packed rows are honoured). When rot_dim < head_dim
    only the first rot_dim features rotate (partial rotary); the rest pass through.
    """
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    rot = cos.shape[-1]

    def apply(t: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(t)
        t_rot, t_pass = t[..., :rot].to(dt), t[..., rot:]
        out = t_rot * cos.to(dt) + rotate_half(t_rot) * sin.to(dt)
        return torch.cat((out.to(t.dtype), t_pass), dim=-1)

    return apply(q), apply(k)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 and cast back."""
    dt = _compute_dtype(gate)
    return (F.silu(gate.to(dt)) * up.to(dt)).to(gate.dtype)


# --------------------------------------------------------------------------- attention
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention within each packed document, one document at a time.

    q (T, H, D), k/v (T, H_kv, D), cu_seqlens (n_docs + 1,) int32. Query i of a
    document attends key j of the same document when j <= i (causal) and, with
    ``window``, i - j < window (the query itself counts: Mistral / Gemma-2 sliding
    window). ``softcap`` applies c * tanh(s / c) to the scaled scores.
    """
    del max_seqlen
    total, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    dt = _compute_dtype(q)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].to(dt).transpose(0, 1)  # (H, L, D)
        kd = k[start:end].to(dt).transpose(0, 1).repeat_interleave(group, dim=0)
        vd = v[start:end].to(dt).transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (qd @ kd.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        length = end - start
        i = torch.arange(length, device=q.device).unsqueeze(1)
        j = torch.arange(length, device=q.device).unsqueeze(0)
        allowed = torch.ones(length, length, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= (i - j < window) if causal else ((i - j).abs() < window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = (probs @ vd).transpose(0, 1).to(q.dtype)
    return out


# --------------------------------------------------------------------------- LoRA (4-bit base)
# The 16 values of bitsandbytes' NF4 and FP4 codes, indexed by the 4-bit pattern.
FOUR_BIT_CODES = {
    "nf4": [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    "fp4": [v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                               -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)],
}


def dequantize_4bit(packed: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense (out, in) weight from bitsandbytes 4-bit data (NF4/FP4, optionally double-quantized).

    Flat element i of the row-major weight is the high nibble of byte i // 2 when i
    is even, the low nibble when odd; its value is code[nibble] * absmax[i // blocksize]
    in float32, cast to ``dtype`` (default ``quant_state.dtype``). Nested absmax:
    code2[q[j]] * absmax2[j // blocksize2] + offset.
    """
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    shape = tuple(int(s) for s in quant_state.shape)
    numel = shape[0] * shape[1]
    code = quant_state.code if getattr(quant_state, "code", None) is not None else \
        torch.tensor(FOUR_BIT_CODES[quant_state.quant_type])
    code = code.to(device=data.device, dtype=torch.float32)
    absmax = quant_state.absmax.reshape(-1)
    if getattr(quant_state, "nested", False) and quant_state.state2 is not None:
        state2 = quant_state.state2
        idx = torch.arange(absmax.numel(), device=data.device) // int(state2.blocksize)
        absmax = state2.code.to(torch.float32)[absmax.long()] * state2.absmax.reshape(-1).to(torch.float32)[idx]
        absmax = absmax + torch.as_tensor(quant_state.offset, dtype=torch.float32, device=data.device)
    absmax = absmax.to(torch.float32)
    nibbles = torch.stack((data >> 4, data & 15), dim=-1).reshape(-1)[:numel].long()
    block = torch.arange(numel, device=data.device) // int(quant_state.blocksize)
    values = code[nibbles] * absmax[block]
    return values.reshape(shape).to(dtype or quant_state.dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: Optional[torch.Tensor] = None,
    quant_state=None,
) -> torch.Tensor:
    """y = x W^T + scaling * (x A^T) B^T (+ bias), computed in float32 (float64 for float64 x).

    ``weight`` is dense (out, in), or bitsandbytes packed 4-bit data with ``quant_state``
    (dequantized here to the compute dtype). lora_a (r, in), lora_b (out, r). The
    result has x's dtype; gradients flow to x, lora_a, lora_b, bias and a dense weight.
    """
    dt = _compute_dtype(x)
    w = dequantize_4bit(weight, quant_state, dtype=dt) if quant_state is not None else weight.to(dt)
    xf = x.to(dt)
    y = xf @ w.t() + scaling * ((xf @ lora_a.to(dt).t()) @ lora_b.to(dt).t())
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)


def lora_linear_ex(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: Optional[torch.Tensor] = None,
    quant_state=None,
    magnitude: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    lora_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """peft 0.21's LoRA layer with DoRA, dropout and a LoRA bias, in float32 (float64 for float64 x).

    x_d = x * dropout_mask / (1 - dropout_p) (x when no mask). Plain LoRA:
    y = x W^T + s (x_d A^T) B^T + bias + s lora_bias. DoRA (``magnitude`` m):
    c = m / ||W + s B A||_row (detached); y = x W^T + bias + (c - 1) (x_d W^T) + c s (x_d A^T) B^T,
    which is c (x W^T + s (x A^T) B^T) + bias without dropout.
    """
    dt = _compute_dtype(x)
    w = dequantize_4bit(weight, quant_state, dtype=dt) if quant_state is not None else weight.to(dt)
    xf = x.to(dt)
    xd = xf if dropout_mask is None else xf * dropout_mask.to(dt) / (1.0 - dropout_p)
    a, b = lora_a.to(dt), lora_b.to(dt)
    lora = scaling * ((xd @ a.t()) @ b.t())
    if lora_bias is not None:
        lora = lora + scaling * lora_bias.to(dt)
    y = xf @ w.t()
    if magnitude is not None:
        norm = torch.linalg.norm(w.detach() + scaling * (b @ a).detach(), dim=1).detach()
        c = magnitude.to(dt) / norm
        base_d = y if dropout_mask is None else xd @ w.t()
        y = y + (c - 1) * base_d + c * lora
    else:
        y = y + lora
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)
