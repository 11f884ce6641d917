"""Packed variable-length causal attention (FlashAttention-2 style), forward and backward.

Layout (flash-attn's varlen API): q (T, H, D), k and v (T, H_kv, D), documents
packed back to back and delimited by ``cu_seqlens`` (int32, n_docs + 1). A query
attends only keys of its own document (causally, optionally within a sliding
window); K/V heads are shared by ``H // H_kv`` query heads and never repeated.

Schedule
--------
Each program handles one (document, block) work item for one head. The work
items are built on the host from ``cu_seqlens`` once per batch: the first call
with a given ``cu_seqlens`` tensor copies it to the host (one sync), validates it
and builds the item lists; later calls with the same tensor object (the other
layers, the backward) reuse the cached lists. Items are sorted heaviest first so
the long causal rows of long documents start early (better tail balance).

Key (resp. query) loops run over exactly the blocks that have some allowed
(query, key) pair -- causal, window and document bounds -- so fully masked tiles
are never computed. Each loop is split in three ranges: masked blocks on the
window edge, unmasked interior blocks (no mask arithmetic), masked blocks on the
diagonal / document end.

Backward: a preprocess kernel computes delta = rowsum(dO * O); a dK/dV kernel
runs per (document, key block, KV head) and loops over the query heads of the
group inside the program, so dK/dV accumulate in registers with no atomics; a
dQ kernel runs per (document, query block, head). The backward is therefore
deterministic (bitwise reproducible run to run). The price of the split is the dQ
kernel's recomputed S = QK^T and dP = dO V^T: 7 block matmuls per (query, key) block
where FlashAttention-2, accumulating dQ with atomics, needs 5. Every other product is
computed once: launch tiles are sized so that no two warpgroups compute the same tile
(see the config tables). Extra memory: the fp32
log-sum-exp and delta, (H, T) each -- nothing O(T^2).

Document bases (start * stride, head * total) are int64 scalars; the row offsets
inside a document (the pointer tiles) are int32 unless the longest document times
the token stride can pass int32 (WIDE), which keeps register pressure down.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._library import NAMESPACE, reference_vjp
from ._triton_utils import (
    check_float,
    check_same_device,
    empty,
    empty_like,
    is_interpreter,
    needs_int64,
    next_power_of_2,
    triton_version,
    use_triton,
)

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jit code may read it
MAX_HEAD_DIM = 256


# =============================================================================== kernels
@triton.jit
def _idx(offs, WIDE: tl.constexpr):
    """Row offsets inside one document: int64 only when rows * stride can pass int32
    (document bases are always int64 scalars), so the pointer tiles stay 32-bit."""
    if WIDE:
        return offs.to(tl.int64)
    else:
        return offs


@triton.jit
def _scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scaled (optionally tanh-softcapped) scores in log2 units, plus tanh for the softcap gradient."""
    if HAS_SOFTCAP:
        x = qk * (sm_scale / softcap)
        t = 2.0 * tl.sigmoid(2.0 * x) - 1.0  # tanh(x), portable across Triton versions
        s = (softcap * LOG2E) * t
    else:
        t = qk  # unused
        s = qk * (sm_scale * LOG2E)
    return s, t


@triton.jit
def _allowed(pos_q, pos_k, seqlen, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Allowed (query, key) pairs for broadcastable position tensors (relative to the document):
    pass offs_q[:, None], offs_k[None, :] for a (queries, keys) tile or the transposed pair."""
    ok = (pos_q < seqlen) & (pos_k < seqlen)
    if CAUSAL:
        ok = ok & (pos_k <= pos_q)
    if HAS_WINDOW:
        ok = ok & (pos_q - pos_k < window)
        if not CAUSAL:
            ok = ok & (pos_k - pos_q < window)
    return ok


@triton.jit
def _key_ranges(m0, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key range [lo, hi) a query block [m0, m0 + BLOCK_M) needs, and its fully allowed part.

    Returns lo <= full_lo <= full_hi <= hi; key blocks start at lo + i * BLOCK_N and
    the blocks in [full_lo, full_hi) need no mask.
    """
    if CAUSAL:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    elif HAS_WINDOW:
        hi = tl.minimum(seqlen, m0 + BLOCK_M - 1 + window)
    else:
        hi = seqlen
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        # every row of the block reaches back to key m0 + BLOCK_M - window
        full_lo = (tl.maximum(m0 + BLOCK_M - window, lo) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full_lo = tl.minimum(full_lo, hi)
    else:
        lo = hi * 0
        full_lo = lo
    if CAUSAL:
        full_end = tl.minimum(m0 + 1, seqlen)
    elif HAS_WINDOW:
        full_end = tl.minimum(m0 + window, seqlen)
    else:
        full_end = seqlen
    full_end = tl.maximum(full_end, lo)
    full_hi = lo + (full_end - lo) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n0, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query range [lo, hi) that sees a key block [n0, n0 + BLOCK_N), and its fully allowed part."""
    if CAUSAL:
        lo = n0 // BLOCK_M * BLOCK_M
    elif HAS_WINDOW:
        lo = tl.maximum(n0 - window + 1, 0) // BLOCK_M * BLOCK_M
    else:
        lo = n0 * 0
    if HAS_WINDOW:
        hi = tl.minimum(seqlen, n0 + BLOCK_N - 1 + window)
    else:
        hi = seqlen
    if CAUSAL:
        full_lo = (tl.maximum(n0 + BLOCK_N - 1, lo) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    elif HAS_WINDOW:
        full_lo = (tl.maximum(n0 + BLOCK_N - window, lo) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        full_lo = lo
    full_lo = tl.minimum(full_lo, hi)
    if HAS_WINDOW:
        full_end = tl.minimum(n0 + window, seqlen)
    else:
        full_end = seqlen
    full_end = tl.maximum(full_end, lo)
    full_hi = lo + (full_end - lo) // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
               offs_m, offs_n, offs_d, seqlen, window, lo, hi, sm_scale, softcap,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr):
    mask_d = offs_d < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        cols64 = _idx(cols, WIDE)
        kT_mask = mask_d[:, None]
        v_mask = mask_d[None, :]
        if MASKED:
            kT_mask = kT_mask & (cols[None, :] < seqlen)
            v_mask = v_mask & (cols[:, None] < seqlen)
        kT = tl.load(k_base + cols64[None, :] * stride_kt + offs_d[:, None], mask=kT_mask, other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s, _t = _scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP)
        if MASKED:
            ok = _allowed(offs_m[:, None], cols[None, :], seqlen, window, CAUSAL, HAS_WINDOW)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols64[:, None] * stride_vt + offs_d[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, ITEMS, n_items, total_tokens,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                sm_scale, softcap, window,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                WIDE: tl.constexpr):
    # heads vary fastest: the heaviest work items start first for every head, and the
    # query heads of one KV head run side by side (K/V reuse in L2)
    n_heads = tl.num_programs(0) // n_items
    item = tl.program_id(0) // n_heads
    head = tl.program_id(0) % n_heads
    doc = tl.load(ITEMS + item)
    m0 = tl.load(ITEMS + n_items + item) * BLOCK_M
    start = tl.load(CU + doc)
    seqlen = tl.load(CU + doc + 1) - start
    kv_head = head // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM
    start64 = start.to(tl.int64)
    head64 = head.to(tl.int64)
    rows = _idx(offs_m, WIDE)
    io_mask = mask_m[:, None] & mask_d[None, :]
    q_base = Q + (start64 * stride_qt + head64 * stride_qh)
    q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=io_mask, other=0.0)
    k_base = K + (start64 * stride_kt + kv_head.to(tl.int64) * stride_kh)
    v_base = V + (start64 * stride_vt + kv_head.to(tl.int64) * stride_vh)

    # finite initial max: fully masked rows (past the document end) stay NaN-free
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_ranges(m0, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                               seqlen, window, lo, full_lo, sm_scale, softcap, True, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, HEAD_DIM, BLOCK_N, DOT_PRECISION, WIDE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                               seqlen, window, full_lo, full_hi, sm_scale, softcap, False, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, HEAD_DIM, BLOCK_N, DOT_PRECISION, WIDE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                               seqlen, window, full_hi, hi, sm_scale, softcap, True, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, HEAD_DIM, BLOCK_N, DOT_PRECISION, WIDE)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = O + (start64 * stride_ot + head64 * stride_oh)
    tl.store(o_base + rows[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=io_mask)
    # log-sum-exp in log2 units, layout (H, T) so the backward reads it coalesced
    tl.store(LSE + (head64 * total_tokens + start64) + rows, m_i + tl.math.log2(l_safe), mask=mask_m)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, total_tokens, stride_t, stride_h,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                           WIDE: tl.constexpr):
    head = tl.program_id(1)
    rows = _idx(tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T), WIDE)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_tokens) & (offs_d[None, :] < HEAD_DIM)
    offs = rows[:, None] * stride_t + head.to(tl.int64) * stride_h + offs_d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head.to(tl.int64) * total_tokens + rows, tl.sum(o * do, 1), mask=rows < total_tokens)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    offs_n, offs_m_blk, offs_d, seqlen, window, lo, hi, sm_scale, softcap,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr):
    mask_d = offs_d < HEAD_DIM
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + offs_m_blk
        rows64 = _idx(offs_m, WIDE)
        mask_m = offs_m < seqlen
        qT = tl.load(q_base + rows64[None, :] * stride_qt + offs_d[:, None],
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        lse = tl.load(lse_base + rows64, mask=mask_m, other=0.0)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        sT, tT = _scores_log2(qkT, sm_scale, softcap, HAS_SOFTCAP)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            okT = _allowed(offs_m[None, :], offs_n[:, None], seqlen, window, CAUSAL, HAS_WINDOW)
            pT = tl.where(okT, pT, 0.0)
        do = tl.load(do_base + rows64[:, None] * stride_dot + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + rows64, mask=mask_m, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, ITEMS, n_items, total_tokens,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh,
                     sm_scale, softcap, window,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     WIDE: tl.constexpr):
    n_kv = tl.num_programs(0) // n_items
    item = tl.program_id(0) // n_kv
    kv_head = tl.program_id(0) % n_kv
    doc = tl.load(ITEMS + item)
    n0 = tl.load(ITEMS + n_items + item) * BLOCK_N
    start = tl.load(CU + doc)
    seqlen = tl.load(CU + doc + 1) - start
    start64 = start.to(tl.int64)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m_blk = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    kv_head64 = kv_head.to(tl.int64)
    rows = _idx(offs_n, WIDE)
    k = tl.load(K + (start64 * stride_kt + kv_head64 * stride_kh) + rows[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + (start64 * stride_vt + kv_head64 * stride_vh) + rows[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _query_ranges(n0, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # the query heads sharing this KV head accumulate into one dK/dV: no atomics
    for g in range(GROUP):
        head = (kv_head * GROUP + g).to(tl.int64)
        q_base = Q + (start64 * stride_qt + head * stride_qh)
        do_base = DO + (start64 * stride_dot + head * stride_doh)
        lse_base = LSE + (head * total_tokens + start64)
        delta_base = DELTA + (head * total_tokens + start64)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_m_blk, offs_d, seqlen, window, lo, full_lo, sm_scale, softcap,
                                 True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, BLOCK_M, DOT_PRECISION, WIDE)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_m_blk, offs_d, seqlen, window, full_lo, full_hi, sm_scale, softcap,
                                 False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, BLOCK_M, DOT_PRECISION, WIDE)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_m_blk, offs_d, seqlen, window, full_hi, hi, sm_scale, softcap,
                                 True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, BLOCK_M, DOT_PRECISION, WIDE)
    dk = dk * sm_scale
    out_offs = (start64 * stride_dkt + kv_head64 * stride_dkh) + rows[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                  offs_m, offs_n, offs_d, seqlen, window, lo, hi, sm_scale, softcap,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr):
    mask_d = offs_d < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        cols64 = _idx(cols, WIDE)
        load_mask = mask_d[:, None]
        if MASKED:
            load_mask = load_mask & (cols[None, :] < seqlen)
        kT = tl.load(k_base + cols64[None, :] * stride_kt + offs_d[:, None], mask=load_mask, other=0.0)
        vT = tl.load(v_base + cols64[None, :] * stride_vt + offs_d[:, None], mask=load_mask, other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s, t = _scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            ok = _allowed(offs_m[:, None], cols[None, :], seqlen, window, CAUSAL, HAS_WINDOW)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, ITEMS, n_items, total_tokens,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh,
                   sm_scale, softcap, window,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                WIDE: tl.constexpr):
    # heads vary fastest: the heaviest work items start first for every head, and the
    # query heads of one KV head run side by side (K/V reuse in L2)
    n_heads = tl.num_programs(0) // n_items
    item = tl.program_id(0) // n_heads
    head = tl.program_id(0) % n_heads
    doc = tl.load(ITEMS + item)
    m0 = tl.load(ITEMS + n_items + item) * BLOCK_M
    start = tl.load(CU + doc)
    seqlen = tl.load(CU + doc + 1) - start
    start64 = start.to(tl.int64)
    kv_head = head // GROUP
    head64 = head.to(tl.int64)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    io_mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = _idx(offs_m, WIDE)
    q = tl.load(Q + (start64 * stride_qt + head64 * stride_qh) + rows[:, None] * stride_qt + offs_d[None, :],
                mask=io_mask, other=0.0)
    do = tl.load(DO + (start64 * stride_dot + head64 * stride_doh) + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=io_mask, other=0.0)
    lse = tl.load(LSE + (head64 * total_tokens + start64) + rows, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + (head64 * total_tokens + start64) + rows, mask=mask_m, other=0.0)
    k_base = K + (start64 * stride_kt + kv_head.to(tl.int64) * stride_kh)
    v_base = V + (start64 * stride_vt + kv_head.to(tl.int64) * stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_ranges(m0, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                       seqlen, window, lo, full_lo, sm_scale, softcap, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                       HEAD_DIM, BLOCK_N, DOT_PRECISION, WIDE)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                       seqlen, window, full_lo, full_hi, sm_scale, softcap, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                       HEAD_DIM, BLOCK_N, DOT_PRECISION, WIDE)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                       seqlen, window, full_hi, hi, sm_scale, softcap, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                       HEAD_DIM, BLOCK_N, DOT_PRECISION, WIDE)
    dq = dq * sm_scale
    tl.store(DQ + (start64 * stride_dqt + head64 * stride_dqh) + rows[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=io_mask)


# =============================================================================== launch configuration
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head_dim bucket. dkdv's BLOCK_N is
# its key block and BLOCK_M the query block it loops over. Chosen from the compile tier
# (tests/compile; `python -m benchmarks.compile_report`): ptxas registers / spills and the
# SASS, not timings -- re-tune on the GPU.
#
# Hopper (wgmma): a warpgroup (4 warps) issues m64 wgmmas, so the rows of every dot (the
# query block in fwd / dq, the key block in dkdv) are 64 per warpgroup: 128-row tiles on 8
# warps, each warpgroup owning its own 64 rows. Otherwise the two warpgroups split the
# columns of one 64-row tile into tiny N = 16 / 32 wgmmas.
_HOPPER_16BIT = {
    64: {"fwd": (128, 64, 8, 3), "dkdv": (64, 128, 8, 2), "dq": (128, 64, 8, 2)},
    128: {"fwd": (128, 64, 8, 3), "dkdv": (16, 128, 8, 2), "dq": (128, 64, 8, 2)},
    # dK / dV accumulators of 64 x 256 fp32 and K / V operands leave no room for 128 key
    # rows: one 64-row key block on 8 warps, its columns split between the warpgroups
    256: {"fwd": (128, 32, 8, 2), "dkdv": (16, 64, 8, 2), "dq": (128, 32, 8, 1)},
}
# Ampere (mma.sync, 163 KB shared memory): mma.sync fragments need more registers than
# wgmma accumulators, so the Hopper tiles spill there.
_AMPERE_16BIT = {
    64: {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 2), "dq": (64, 32, 4, 2)},
    128: {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 8, 2)},
    256: {"fwd": (64, 64, 8, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)},
}
# fp32 inputs: 4-byte tiles and FMA (ieee) dots, not the training path: small tiles
_FP32 = {
    64: {"fwd": (32, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 32, 4, 2)},
    128: {"fwd": (16, 32, 8, 1), "dkdv": (16, 16, 8, 1), "dq": (16, 32, 8, 1)},
    256: {"fwd": (32, 16, 8, 1), "dkdv": (16, 16, 8, 1), "dq": (16, 16, 4, 1)},
}
_INTERPRETER = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
# Older Triton releases allocate registers differently: these tiles of the tables above spill
# there (compile tier per version, ptxas -v) and are replaced up to the last release named.
# Key: (arch major, 16-bit inputs, head_dim bucket, kernel). Every replacement keeps wgmma.
_OLDER_TRITON_TILES = {
    (9, True, 64, "dkdv"): ((3, 6), (32, 128, 8, 2), "64-row query blocks spill 280 B on 3.6; 32 rows spill "
                                                     "none and take fewer SASS instructions per query row there "
                                                     "(363 / 32 against 748 / 64)"),
    (9, True, 256, "dq"): ((3, 8), (128, 32, 8, 2), "one stage spills 160-176 B inside the key loop before 3.9; "
                                                    "two stages spill 8 B, outside every inner loop (198 KB of "
                                                    "shared memory, < 227 KB)"),
    (9, False, 64, "dkdv"): ((3, 8), (16, 16, 4, 1), "fp32 16 x 32 tile spills 16 B on sm_90 on 3.6 and 3.8; "
                                                     "16 x 16 spills none"),
    (9, False, 128, "dkdv"): ((3, 6), (16, 32, 8, 1), "fp32 16 x 16 tile spills 16 B on sm_90 on 3.6; 16 x 32 "
                                                      "spills none and takes fewer instructions per (query, key) "
                                                      "pair"),
    (8, False, 64, "dkdv"): ((3, 8), (16, 16, 4, 1), "the sm_90 fp32 tile (one fp32 table serves both archs)"),
    (8, False, 128, "dkdv"): ((3, 6), (16, 32, 8, 1), "the sm_90 fp32 tile (one fp32 table serves both archs)"),
}


def tile_notes() -> List[str]:
    """The tiles the launcher picks differently on this Triton version, with the reason (for the compile report)."""
    version = triton_version()
    return [f"attention {kernel} d{bucket} {'16-bit' if b16 else 'fp32'} sm_{major}x (triton <= "
            f"{last[0]}.{last[1]}): M{t[0]} N{t[1]} w{t[2]} s{t[3]} ({why})"
            for (major, b16, bucket, kernel), (last, t, why) in _OLDER_TRITON_TILES.items() if version <= last]


def _preprocess_warps(block_t: int, block_d: int) -> int:
    # 8 warps from 64 x 128 elements up: with 4, Triton 3.6 spills 8 B on sm_80 (fp32, d128)
    return 8 if block_t * block_d >= 8192 else 4


def _configs(head_dim: int, dtype: torch.dtype, arch: int = 90) -> dict:
    """Launch configs for ``head_dim`` / ``dtype`` on compute capability ``arch`` (e.g. 90, 80).

    Small blocks under the interpreter (speed, and several blocks per test document)."""
    if is_interpreter():
        return _INTERPRETER
    bucket = min(b for b in (64, 128, 256) if b >= next_power_of_2(head_dim))
    if dtype == torch.float32:
        table = _FP32[bucket]
    else:
        table = (_HOPPER_16BIT if arch // 10 == 9 else _AMPERE_16BIT)[bucket]
    version, major, b16 = triton_version(), (9 if arch // 10 == 9 else 8), dtype != torch.float32
    older = {kernel: tile for (m, b, bkt, kernel), (last, tile, _) in _OLDER_TRITON_TILES.items()
             if (m, b, bkt) == (major, b16, bucket) and version <= last}
    return dict(table, **older) if older else table


@functools.lru_cache(maxsize=None)
def _arch_of(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _arch(t: torch.Tensor) -> int:
    return _arch_of(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        if t.is_cuda else 90


# =============================================================================== cu_seqlens cache
class _SeqInfo:
    """Host view of one cu_seqlens tensor plus the work-item lists built from it."""

    __slots__ = ("cu", "version", "bounds", "max_len", "items")

    def __init__(self, cu: torch.Tensor, bounds: List[int]):
        self.cu = cu  # strong reference: identity stays meaningful while cached
        self.version = cu._version
        self.bounds = bounds
        self.max_len = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
        self.items = {}

    def work_items(self, block: int, by_key_block: bool, causal: bool, window: Optional[int]) -> torch.Tensor:
        """(2, n_items) int32 on the device: row 0 document, row 1 block index; heaviest first."""
        key = (block, by_key_block, causal, window)
        cached = self.items.get(key)
        if cached is not None:
            return cached
        docs, blocks, cost = [], [], []
        for d, (a, b) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            length = b - a
            for i in range((length + block - 1) // block):
                p0 = i * block
                if not causal:
                    span = length
                elif by_key_block:  # queries at or after the key block
                    span = length - p0
                else:  # keys up to the end of the query block
                    span = min(length, p0 + block)
                if window is not None:
                    span = min(span, window + block)
                docs.append(d)
                blocks.append(i)
                cost.append(span)
        order = sorted(range(len(docs)), key=lambda j: -cost[j])
        table = torch.tensor([[docs[j] for j in order], [blocks[j] for j in order]], dtype=torch.int32)
        table = table.to(self.cu.device, non_blocking=True)
        self.items[key] = table
        return table


_SEQ_CACHE: "OrderedDict[int, _SeqInfo]" = OrderedDict()
_SEQ_CACHE_SIZE = 8


def _check_bounds(bounds: Sequence[int], total: int) -> None:
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at total_tokens={total}, got {bounds[-1]}")
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b < a:
            raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{i + 1}]={b} < cu_seqlens[{i}]={a}")


def _remember(info: _SeqInfo) -> _SeqInfo:
    _SEQ_CACHE[id(info.cu)] = info
    _SEQ_CACHE.move_to_end(id(info.cu))
    while len(_SEQ_CACHE) > _SEQ_CACHE_SIZE:
        _SEQ_CACHE.popitem(last=False)
    return info


def _seq_info(cu_seqlens: torch.Tensor, total: int) -> _SeqInfo:
    """Validated host view of cu_seqlens; one device->host copy per distinct tensor."""
    info = _SEQ_CACHE.get(id(cu_seqlens))
    if info is not None and info.cu is cu_seqlens and info.version == cu_seqlens._version:
        if info.bounds[-1] != total:
            raise ValueError(f"cu_seqlens must end at total_tokens={total}, got {info.bounds[-1]}")
        return info
    bounds = [int(x) for x in cu_seqlens.tolist()]
    _check_bounds(bounds, total)
    return _remember(_SeqInfo(cu_seqlens, bounds))


def make_cu_seqlens(bounds: Sequence[int], device) -> torch.Tensor:
    """cu_seqlens on ``device`` from host boundaries, pre-validated so no later call syncs.

    Use it when the boundaries are known on the host (e.g. the data collator, or
    position ids already copied to the host): varlen_attention then never copies
    this tensor back.
    """
    bounds = [int(b) for b in bounds]
    if len(bounds) < 2:
        raise ValueError("cu_seqlens needs at least two entries (0 and total_tokens)")
    _check_bounds(bounds, bounds[-1])
    cu = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
    _remember(_SeqInfo(cu, bounds))
    return cu


# =============================================================================== input checks
def _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    total, n_heads, head_dim = q.shape
    if k.shape[0] != total:
        raise ValueError(f"k/v have {k.shape[0]} tokens but q has {total}")
    if k.shape[2] != head_dim:
        raise ValueError(f"k/v head_dim {k.shape[2]} differs from q head_dim {head_dim}")
    n_kv = k.shape[1]
    if n_kv == 0 or n_heads % n_kv != 0:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        what = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {what}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens needs at least two entries (0 and total_tokens)")
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)  # accepted like flash-attn; an int avoids this sync
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive float, got {softcap!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be None or a positive float, got {softmax_scale!r}")
    return max_seqlen


# =============================================================================== launchers
def _dot_precision(dtype: torch.dtype) -> Optional[str]:
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else None


def _wide(rows: int, *tensors: torch.Tensor) -> bool:
    """True when rows * (token stride) of some tensor can pass int32 (also covers row + head offsets)."""
    return needs_int64(*(rows * t.stride(0) + t.shape[1] * t.stride(1) for t in tensors))


def _launch_forward(q, k, v, cu, info, scale, causal, window, softcap):
    total, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    out = empty_like(q)
    lse = empty(n_heads, total, dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = _configs(head_dim, q.dtype, _arch(q))["fwd"]
    items = info.work_items(block_m, False, causal, window)
    n_items = items.shape[1]
    if n_items == 0:
        return out, lse
    _fwd_kernel[(n_items * n_heads,)](
        q, k, v, out, lse, cu, items, n_items, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        float(scale), float(softcap or 1.0), int(window or 0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, DOT_PRECISION=_dot_precision(q.dtype),
        WIDE=_wide(info.max_len, q, k, v, out), num_warps=warps, num_stages=stages,
    )
    return out, lse


def _launch_backward(do, q, k, v, out, lse, cu, info, scale, causal, window, softcap):
    total, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    block_d = max(16, next_power_of_2(head_dim))
    if do.stride(-1) != 1 or do.stride() != out.stride():
        do = do.contiguous()  # O is contiguous; the preprocess reads both with one set of strides
    if do.stride() != out.stride():
        out = out.contiguous()
    dq = empty_like(q)
    dk = empty_like(k)
    dv = empty_like(v)
    delta = empty(n_heads, total, dtype=torch.float32, device=q.device)
    if total == 0:
        return dq, dk, dv
    block_t = 64 if not is_interpreter() else 32
    _bwd_preprocess_kernel[(triton.cdiv(total, block_t), n_heads)](
        out, do, delta, total, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, WIDE=_wide(total, out, do),
        num_warps=_preprocess_warps(block_t, block_d),
    )
    cfg = _configs(head_dim, q.dtype, _arch(q))
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal,
                  HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
                  DOT_PRECISION=_dot_precision(q.dtype), WIDE=_wide(info.max_len, q, k, v, do, dq, dk))
    scalars = (float(scale), float(softcap or 1.0), int(window or 0))

    block_m, block_n, warps, stages = cfg["dkdv"]
    items = info.work_items(block_n, True, causal, window)
    _bwd_dkdv_kernel[(items.shape[1] * n_kv,)](
        q, k, v, do, lse, delta, dk, dv, cu, items, items.shape[1], total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )
    block_m, block_n, warps, stages = cfg["dq"]
    items = info.work_items(block_m, False, causal, window)
    _bwd_dq_kernel[(items.shape[1] * n_heads,)](
        q, k, v, do, lse, delta, dq, cu, items, items.shape[1], total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), *scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )
    return dq, dk, dv


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # the kernels take any token / head strides but need contiguous head_dim
    return t if t.stride(-1) == 1 else t.contiguous()


# =============================================================================== operators
def _device_of(q: torch.Tensor):
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _checked_info(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> _SeqInfo:
    """Host view of cu_seqlens (cached per tensor: one device->host copy per batch), validated."""
    info = _seq_info(cu_seqlens, total)
    if info.max_len > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest document ({info.max_len} tokens)")
    return info


def _reference_lse(q, k, bounds, causal, scale, window, softcap) -> torch.Tensor:
    """(n_heads, total) fp32 natural-log log-sum-exp of each query's allowed scores (reference path)."""
    total, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    lse = torch.zeros(n_heads, total, dtype=torch.float32, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].float().transpose(0, 1)
        kd = k[start:end].float().transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (qd @ kd.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(end - start, device=q.device).unsqueeze(1)
        j = torch.arange(end - start, device=q.device).unsqueeze(0)
        allowed = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= (i - j < window) if causal else ((i - j).abs() < window)
        lse[:, start:end] = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return lse


@torch.library.custom_op(f"{NAMESPACE}::varlen_attention", mutates_args=())
def varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int, causal: bool, softmax_scale: float, window: Optional[int],
                        softcap: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (T, H, D) contiguous, lse (H, T) fp32). cu_seqlens is read on the host here, once per
    tensor (cached), never under fake tensors; max_seqlen is an int argument."""
    info = _checked_info(cu_seqlens, q.shape[0], max_seqlen)
    if not use_triton(q):
        out = reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal,
                                         softmax_scale=softmax_scale, window=window, softcap=softcap)
        return out.contiguous(), _reference_lse(q, k, info.bounds, causal, softmax_scale, window, softcap)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    with _device_of(q):
        return _launch_forward(q, k, v, cu_seqlens, info, softmax_scale, causal, window, softcap)


@varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap):
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                 causal: bool, softmax_scale: float, window: Optional[int],
                                 softcap: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in q's / k's / v's dtypes."""
    info = _checked_info(cu_seqlens, q.shape[0], max_seqlen)
    if not use_triton(q):
        grads = reference_vjp(
            lambda a, b, c: reference.varlen_attention(a, b, c, cu_seqlens, max_seqlen, causal=causal,
                                                       softmax_scale=softmax_scale, window=window, softcap=softcap),
            (q, k, v), (True, True, True), (dout,))
        return tuple(g.contiguous() for g in grads)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    with _device_of(q):
        return _launch_backward(_unit_stride(dout), q, k, v, out, lse, cu_seqlens, info, softmax_scale, causal,
                                window, softcap)


@varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.options = (max_seqlen, causal, softmax_scale, window, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward_op(dout, q, k, v, out, lse, cu_seqlens, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


varlen_attention_op.register_autograd(_backward, setup_context=_setup)


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
    """Attention within each packed document of q (T, H, D), k/v (T, H_kv, D).

    ``cu_seqlens`` (int32, n_docs + 1) delimits the documents; ``max_seqlen`` must
    be at least the longest document (an upper bound is fine). Query i attends key
    j of its document when j <= i (``causal``) and i - j < ``window`` (sliding
    window, the query itself included). ``softcap`` applies c * tanh(s / c) to the
    scaled scores (Gemma-2). ``softmax_scale`` defaults to 1 / sqrt(head_dim).
    Differentiable in q, k and v; the backward is deterministic.
    """
    max_seqlen = _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    softcap = float(softcap) if softcap is not None else None
    return varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap)[0]


__all__ = ["varlen_attention", "make_cu_seqlens"]
