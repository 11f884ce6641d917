"""On CPU tensors, where the ops run PyTorch's reference code, keep each patch only where it is faster.

On a CPU the public ops of fastsft_kernels run ``fastsft_kernels.reference`` (plain PyTorch), so a
patch buys no fusion there and can be slower than transformers' own code for the same op (issue 27
measured a SmolLM2 step at 3.56 s patched against 3.14 s unpatched). ``patch_model(...,
fastest_on_cpu=True)`` (the trainer's ``cpu_ops: fastest``) hooks the first forward with gradients:
the ops of that forward are recorded (their real inputs), each is timed forward + backward against
the code transformers runs for it (HF's RMSNorm, rotate-half RoPE, SiLU * up, SDPA with the
block-diagonal causal mask of the packed documents, F.linear + cross-entropy over full logits, peft's
two small matmuls), and the components whose patched op is slower are switched back, with one line
saying which ran faster where.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from .self_check import OP_COMPONENT, _run, record_ops, switch_back, switchable, with_fixed_dropout_masks

logger = logging.getLogger("fastsft.patch")
REPEATS = 2  # best of two: the first call of an op on CPU pays one-off allocations


def _rms_norm(x, weight, eps, *, offset=0.0):
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight + offset) * xf.to(dtype) if offset == 0.0 else (xf * (1.0 + weight.float())).to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q, k, cos, sin):
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    def one(t):
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        out = t_rot * cos + _rotate_half(t_rot) * sin
        return torch.cat((out, t_pass), dim=-1) if t_pass.shape[-1] else out
    return one(q), one(k)


def _swiglu(gate, up):
    return F.silu(gate) * up


def _attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, window=None, softcap=None):
    total = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=q.device),
                                  (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    i = torch.arange(total, device=q.device)
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= i[None, :] <= i[:, None]
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                         v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=softmax_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


def _linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                          num_items=None, softcap=None, **_):
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = num_items if num_items is not None else (labels != ignore_index).sum()
    return loss / count if reduction == "mean" else loss


def _lora_linear(x, weight, lora_a, lora_b, scaling, *, bias=None, quant_state=None, **_):
    if quant_state is not None:
        from fastsft_kernels import reference

        weight = reference.dequantize_4bit(weight, quant_state, dtype=x.dtype)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))


def _lora_linear_fused(x, weights, lora_as, lora_bs, scalings, *, biases=None, quant_states=None, **_):
    n = len(weights)
    biases, quant_states = biases or [None] * n, quant_states or [None] * n
    return [_lora_linear(x, w, a, b, s, bias=bb, quant_state=q)
            for w, a, b, s, bb, q in zip(weights, lora_as, lora_bs, scalings, biases, quant_states)]


def _lora_linear_ex(x, weight, lora_a, lora_b, scaling, *, bias=None, quant_state=None, magnitude=None,
                    dropout_p=0.0, dropout_mask=None, lora_bias=None, **_):
    """peft 0.21's LoRA layer with dropout, a LoRA bias or DoRA (its DoraLinearVariant's formulas)."""
    if quant_state is not None:
        from fastsft_kernels import reference

        weight = reference.dequantize_4bit(weight, quant_state, dtype=x.dtype)
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if dropout_mask is not None:
        x_d = x * dropout_mask / (1.0 - dropout_p)
    else:
        x_d = F.dropout(x, dropout_p) if dropout_p else x
    lora = F.linear(F.linear(x_d, a), b, None if lora_bias is None else lora_bias.to(x.dtype))
    if magnitude is None:
        return F.linear(x, weight, bias) + scaling * lora
    norm = (weight + scaling * (b @ a)).norm(p=2, dim=1).detach()  # peft: the norm is not differentiated
    c = (magnitude / norm).to(x.dtype)
    base = F.linear(x, weight)
    if x_d is x:
        out = c * (base + scaling * lora)
    else:  # peft recomputes the base product on the dropped x
        out = base + (c - 1) * F.linear(x_d, weight) + c * scaling * lora
    return out if bias is None else out + bias


def _lora_linear_ex_fused(x, weights, lora_as, lora_bs, scalings, *, biases=None, quant_states=None,
                          magnitudes=None, dropout_ps=None, dropout_masks=None, lora_biases=None, **_):
    n = len(weights)
    none = [None] * n
    return [_lora_linear_ex(x, w, a, b, s, bias=bb, quant_state=q, magnitude=m, dropout_p=p, dropout_mask=mask,
                            lora_bias=lb)
            for w, a, b, s, bb, q, m, p, mask, lb in zip(
                weights, lora_as, lora_bs, scalings, biases or none, quant_states or none, magnitudes or none,
                dropout_ps or [0.0] * n, dropout_masks or none, lora_biases or none)]


# what transformers (and peft) run for each op when it is not patched
TRANSFORMERS_EQUIVALENT: Dict[str, Callable] = {
    "rms_norm": _rms_norm, "rope": _rope, "swiglu": _swiglu, "varlen_attention": _attention,
    "linear_cross_entropy": _linear_cross_entropy, "lora_linear": _lora_linear,
    "lora_linear_fused": _lora_linear_fused, "lora_linear_ex": _lora_linear_ex,
    "lora_linear_ex_fused": _lora_linear_ex_fused,
}


def _time(fn, recorded) -> float:
    args, kwargs, flags, kwflags = recorded
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        _run(fn, args, kwargs, flags, kwflags, 0)
        best = min(best, time.perf_counter() - start)
    return best


def time_ops(calls: Dict[str, tuple]) -> List[Tuple[str, float, float]]:
    """(op, patched seconds, transformers' seconds) of each recorded op, forward + backward, best of REPEATS."""
    import fastsft_kernels as fk

    out = []
    for name, recorded in calls.items():
        if name in TRANSFORMERS_EQUIVALENT:
            recorded = with_fixed_dropout_masks(name, recorded)
            out.append((name, _time(getattr(fk, name), recorded), _time(TRANSFORMERS_EQUIVALENT[name], recorded)))
    return out


def _agree_across_ranks(timings: List[Tuple[str, float, float]]) -> List[Tuple[str, float, float]]:
    """Under torch.distributed every rank takes the same choice: the timings summed over the ranks
    (each rank timing on its own would let noise pick different code per rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return timings
    timings = sorted(timings)
    total = torch.tensor([[m, t] for _, m, t in timings], dtype=torch.float64)
    dist.all_reduce(total)
    return [(name, float(m), float(t)) for (name, _, _), (m, t) in zip(timings, total.tolist())]


def _rows_split_across_blocks(model) -> bool:
    """Whether some bitsandbytes 4-bit weight has rows (in_features) that are not a whole number of its
    quantization blocks. bitsandbytes 0.50's AVX-512 CPU dequantize indexes blocks per row and then
    decodes such weights wrong (a (64, 32) NF4 weight: 1.9 max error, 0.39 is NF4's own), so peft's
    Linear4bit forward on CPU would compute with a wrong base; fastsft's op follows the flat layout."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        shape = getattr(state, "shape", None)
        if state is not None and shape is not None and int(shape[-1]) % int(state.blocksize):
            return True
    return False


def choose(model, args: tuple, kwargs: dict) -> List[Tuple[str, float, float]]:
    """Time the ops of one forward of `model`; switch back the components whose patched op is slower."""
    from . import patch_state

    with record_ops() as calls, torch.enable_grad():
        out = model(*args, **kwargs)
    del out
    with torch.autocast("cpu", enabled=False):
        timings = _agree_across_ranks(time_ops(calls))
    per_component: Dict[str, List[Tuple[float, float]]] = {}
    for name, mine, theirs in timings:
        per_component.setdefault(OP_COMPONENT[name], []).append((mine, theirs))
    slower = sorted(c for c, pairs in per_component.items()
                    if sum(m for m, _ in pairs) > sum(t for _, t in pairs))
    slower = switchable(slower, "CPU ops")
    if "lora" in slower and _rows_split_across_blocks(model):
        slower.remove("lora")
        logger.info("CPU ops: LoRA stays fastsft's: a 4-bit base's rows are not a multiple of its block size, "
                    "which bitsandbytes' AVX-512 CPU dequantize reads wrong (bitsandbytes 0.50)")
    kept = sorted(c for c in per_component if c not in slower)
    untimed = sorted(set(patch_state(model)) - set(per_component))  # patched, but no op of it ran in this forward
    logger.info("CPU ops: PyTorch's reference runs on CPU tensors; patched where faster: %s; transformers' own "
                "where faster: %s (%s; cpu_ops: patched keeps every patch)%s", ", ".join(kept) or "none",
                ", ".join(slower) or "none", ", ".join(f"{n} {m * 1e3:.1f} vs {t * 1e3:.1f} ms" for n, m, t in timings),
                f"; not timed (no call in the first forward), kept: {', '.join(untimed)}" if untimed else "")
    if slower:
        switch_back(model, slower)
    return timings


__all__ = ["choose", "time_ops", "TRANSFORMERS_EQUIVALENT"]
