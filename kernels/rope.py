"""Rotary position embedding of q and k in one kernel (Hugging Face's rotate-half form).

    out[..., :h]      = x1 * cos1 - x2 * sin1          (x1 = x[..., :h], x2 = x[..., h:2h],
    out[..., h:2h]    = x2 * cos2 + x1 * sin2           h = rot_dim // 2)
    out[..., rot_dim:] = x[..., rot_dim:]               (partial rotary: passed through)

cos/sin are whatever the model's rotary module computed for each (batch, position)
-- so packed rows whose positions restart per document are honoured -- and are
read per token, never re-derived from an index. The kernel takes q/k with any
strides (Hugging Face hands over ``view(...).transpose(1, 2)`` views) and writes
outputs with the same memory layout as the inputs, as PyTorch's elementwise ops
would. The backward is the same rotation with the sign of the sine flipped
(the transpose of the rotation), so nothing but cos/sin is saved.
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
TILE_ELEMENTS_GPU = 2048
TILE_ELEMENTS_INTERPRETER = 65536


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, cos1, cos2, sin1, sin2, b, s, tok_ok, n_heads, head_dim, half, rot_dim,
    x_sb, x_sh, x_ss, o_sb, o_sh, o_ss,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # tile [tokens, heads, features]; cos/sin tiles are [tokens, 1, features]
    heads = tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    mask = tok_ok[:, None, None] & (heads < n_heads)[None, :, None] & (d < half)[None, None, :]
    x_base = x_ptr + (b * x_sb + s * x_ss)[:, None, None] + heads[None, :, None] * x_sh
    o_base = o_ptr + (b * o_sb + s * o_ss)[:, None, None] + heads[None, :, None] * o_sh
    x1 = tl.load(x_base + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + half + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the rotation: dx1 = dy1*cos1 + dy2*sin2, dx2 = dy2*cos2 - dy1*sin1
        o1 = x1 * cos1 + x2 * sin2
        o2 = x2 * cos2 - x1 * sin1
    else:
        o1 = x1 * cos1 - x2 * sin1
        o2 = x2 * cos2 + x1 * sin2
    out_ty = o_ptr.dtype.element_ty
    tl.store(o_base + d[None, None, :], o1.to(out_ty), mask=mask)
    tl.store(o_base + half + d[None, None, :], o2.to(out_ty), mask=mask)

    if BLOCK_PASS > 0:  # partial rotary: copy the features past rot_dim unchanged
        p = tl.arange(0, BLOCK_PASS)
        p_mask = tok_ok[:, None, None] & (heads < n_heads)[None, :, None] & (p < head_dim - rot_dim)[None, None, :]
        xp = tl.load(x_base + rot_dim + p[None, None, :], mask=p_mask, other=0.0)
        tl.store(o_base + rot_dim + p[None, None, :], xp.to(out_ty), mask=p_mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    n_tokens, seq_len, n_q_heads, n_k_heads, head_dim, half, rot_dim,
    q_sb, q_sh, q_ss, k_sb, k_sh, k_ss,
    qo_sb, qo_sh, qo_ss, ko_sb, ko_sh, ko_ss,
    cos_sb, cos_ss, sin_sb, sin_ss,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # BLOCK_T tokens per program: their cos/sin are loaded once and serve every q and k head
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    tok_ok = token < n_tokens
    b = token // seq_len
    s = token % seq_len
    d = tl.arange(0, BLOCK_HALF)
    cs_mask = tok_ok[:, None] & (d < half)[None, :]
    cos_row = cos_ptr + (b * cos_sb + s * cos_ss)[:, None] + d[None, :]
    sin_row = sin_ptr + (b * sin_sb + s * sin_ss)[:, None] + d[None, :]
    cos1 = tl.load(cos_row, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    cos2 = tl.load(cos_row + half, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin1 = tl.load(sin_row, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin2 = tl.load(sin_row + half, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    _rotate_heads(q_ptr, qo_ptr, cos1, cos2, sin1, sin2, b, s, tok_ok, n_q_heads, head_dim, half, rot_dim,
                  q_sb, q_sh, q_ss, qo_sb, qo_sh, qo_ss,
                  BACKWARD, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(k_ptr, ko_ptr, cos1, cos2, sin1, sin2, b, s, tok_ok, n_k_heads, head_dim, half, rot_dim,
                  k_sb, k_sh, k_ss, ko_sb, ko_sh, ko_ss,
                  BACKWARD, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)


def _empty_same_layout(t: torch.Tensor) -> torch.Tensor:
    """An output buffer with t's shape and t's dimension order in memory (dense)."""
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), -i))
    buf = empty(*[t.shape[i] for i in order], dtype=t.dtype, device=t.device)
    inverse = [order.index(i) for i in range(t.dim())]
    return buf.permute(*inverse)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _broadcast_cos_sin(name: str, c: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    if c.dim() == 2:
        c = c.unsqueeze(0)
    if c.dim() != 3 or c.shape[0] not in (1, batch) or c.shape[1] != seq:
        raise ValueError(f"{name} must be (batch, seq, rot_dim) or (seq, rot_dim) with batch {batch} (or 1) "
                         f"and seq {seq}; got {tuple(c.shape)}")
    return _last_dim_unit(c.expand(batch, seq, c.shape[-1]))


def _check(q, k, cos, sin):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (batch, heads, seq, head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share batch, seq and head_dim; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape; got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rot = cos.shape[-1]
    if rot % 2 != 0 or rot > q.shape[-1] or rot == 0:
        raise ValueError(f"rot_dim (cos.shape[-1] = {rot}) must be even, positive and <= head_dim {q.shape[-1]}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope computes no gradient for cos/sin; pass them detached (the models compute them under no_grad)")


def _launch(q, k, cos, sin, backward: bool):
    batch, n_q, seq, head_dim = q.shape
    n_k = k.shape[1]
    rot = cos.shape[-1]
    q, k = _last_dim_unit(q), _last_dim_unit(k)
    cos = _broadcast_cos_sin("cos", cos, batch, seq)
    sin = _broadcast_cos_sin("sin", sin, batch, seq)
    q_out, k_out = _empty_same_layout(q), _empty_same_layout(k)
    n_tokens = batch * seq
    if n_tokens == 0 or q.numel() == 0:
        return q_out.zero_(), k_out.zero_()
    half = rot // 2
    block_pass = 0 if rot == head_dim else next_power_of_2(head_dim - rot)
    block_hq, block_hk = next_power_of_2(n_q), next_power_of_2(n_k)
    per_token = max(block_hq, block_hk) * next_power_of_2(max(half, head_dim - rot))
    # GPU: about one token per program (a 32 x 64 tile); the interpreter: many tokens per program
    budget = TILE_ELEMENTS_INTERPRETER if is_interpreter() else TILE_ELEMENTS_GPU
    block_t = max(1, min(next_power_of_2(n_tokens), budget // per_token))
    tile = block_t * per_token
    _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
        q, k, q_out, k_out, cos, sin,
        n_tokens, seq, n_q, n_k, head_dim, half, rot,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_HALF=next_power_of_2(half), BLOCK_PASS=block_pass,
        num_warps=4 if tile <= 2048 else 8,
    )
    return q_out, k_out


# =============================================================================== operators
def _output_like(t: torch.Tensor) -> torch.Tensor:
    """The buffer the kernel writes for input t: t's memory layout (after a unit last stride)."""
    return _empty_same_layout(t if t.stride(-1) == 1 else t.contiguous())


def _reference_rope(q, k, cos, sin, transpose: bool):
    if transpose:  # q, k are the output gradients: differentiate the reference rotation
        rq, rk = reference_vjp(lambda a, b: reference.rope(a, b, cos, sin), (q, k), (True, True), (q, k))
    else:
        rq, rk = reference.rope(q, k, cos, sin)
    return _output_like(q).copy_(rq), _output_like(k).copy_(rk)


@torch.library.custom_op(f"{NAMESPACE}::rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(q):
        return _reference_rope(q, k, cos, sin, transpose=False)
    return _launch(q, k, cos, sin, backward=False)


@torch.library.custom_op(f"{NAMESPACE}::rope_backward", mutates_args=())
def rope_backward_op(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(dq_out):
        return _reference_rope(dq_out, dk_out, cos, sin, transpose=True)
    return _launch(dq_out, dk_out, cos, sin, backward=True)


def _fake(q, k, cos, sin):
    return _output_like(q), _output_like(k)


rope_op.register_fake(_fake)
rope_backward_op.register_fake(_fake)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_backward_op(dq_out, dk_out, cos, sin)
    return dq, dk, None, None


rope_op.register_autograd(_backward, setup_context=_setup)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (batch, n_heads, seq, head_dim) and k (batch, n_kv_heads, seq, head_dim).

    cos/sin: (batch, seq, rot_dim) -- or (seq, rot_dim), or batch 1 -- as the model's
    rotary module computed them; rot_dim <= head_dim (partial rotary). Returns
    (q_out, k_out) in q's and k's dtypes, laid out in memory like q and k.
    Gradients flow to q and k.
    """
    _check(q, k, cos, sin)
    return rope_op(q, k, cos, sin)
