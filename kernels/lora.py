"""LoRA linear: y = x W^T + scaling * (x A^T) B^T (+ bias), dense or 4-bit W.

Shapes follow peft: x (..., in), weight (out, in) (or bitsandbytes' packed 4-bit
data + its QuantState), lora_a (r, in), lora_b (out, r).

Kernels (all fp32 accumulation; dot operands in the activation dtype):
- ``_rank_project_kernel``   xa = x A^T (M, r), and s * g B (M, r): one pass over a
                              (M, big) operand into a rank-r result.
- ``_lora_matmul_kernel``    the big matmul with the LoRA term fused into its epilogue:
                              forward  y  = x W^T + (s xa) B^T + bias
                              backward dx = g W   + (s g B) A
                              W tiles are loaded (and 4-bit W dequantized) in
                              registers, tile by tile; the dense W is never copied.
- ``_rank_reduce_kernel``    dB = s g^T xa and dA = (s g B)^T x: reductions over
                              tokens, split over token chunks for parallelism and
                              summed deterministically (no atomics).
Backward saves x, the rank-r xa (fp32) and the parameters, never a dequantized W
or a full-width intermediate. On the GPU the 16-bit matmuls choose their tile
shape by autotuning (keyed on shape and variant, pruned on the host to what fits
the arch's shared memory: ``matmul_configs``); fp32 inputs use exact ("ieee")
fp32 dots with one fixed tile shape.

Strategy per product, picked on the host from the row count (``pick_strategy``):
a 4-bit base runs the fused kernel above below ``dequant_rows`` rows (default
1024), and from there on is dequantized once into a workspace shared by every
layer and multiplied by cuBLAS, the LoRA term added by one addmm (training
sizes: decoding each W tile once per row tile costs more than one dequantize).
A dense base uses cuBLAS + the LoRA addmm by default; ``dense_base="triton"``
selects the epilogue GEMM (kept until a GPU measures which wins per shape).

``lora_linear_fused`` runs several projections that share x (q/k/v, gate/up): one
pass of x computes every adapter's x A^T, one pass computes every dA, and dx is
accumulated across projections in one buffer.

The 4-bit main loop decodes each packed byte with one 8-byte lookup in a 256-entry
code-pair table, keeps row offsets and the (cached, pre-decoded) absmax out of the
per-element math, drops k bounds checks when BLOCK_K divides K, and in the forward
makes the dequantized W tile the wgmma's register operand (out^T = W x^T).
``launch_variants(arch)`` lists every compiled variant the launcher can pick there.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._triton_utils import (FLOAT_DTYPES, check_float, check_same_device, empty, is_interpreter,
                            next_power_of_2, triton_version, use_triton)
from ._library import NAMESPACE, nothing, reference_vjp
from . import quant as _quant
from .quant import (_CACHE_ATTR, QuantInfo, _state_key, absmax_fp32, cached_quant_info, dequantize_into,
                    load_weight_tile)

MAX_RANK = 128

# --------------------------------------------------------------------------- strategy
# Two ways to compute the base product x W^T (and g W in backward):
#   "triton": the Triton GEMM below, LoRA term in its epilogue; a 4-bit W is
#             dequantized tile by tile in registers (no dense copy anywhere);
#   "cublas": W dense (a 4-bit W first dequantized by Triton into a reusable
#             workspace), cuBLAS for the base product, the LoRA term added by one
#             more addmm into the same output.
# In-kernel dequantization re-decodes every W tile once per row tile, so it only
# wins when the rows are few; from DEQUANT_ROWS rows on, dequantizing once (about
# 1.5x the packed bytes of traffic) and running cuBLAS is faster. A dense base uses
# cuBLAS until a GPU run measures the Triton epilogue GEMM faster at some shape.
DEQUANT_ROWS_DEFAULT = 1024
DEQUANT_ROWS_ENV = "FASTSFT_LORA_DEQUANT_ROWS"
DENSE_BASE_DEFAULT = "cublas"
DENSE_BASE_ENV = "FASTSFT_LORA_DENSE_BASE"
STRATEGIES = ("triton", "cublas")


def resolve_dequant_rows(value: Optional[int] = None) -> int:
    """Rows from which a 4-bit base is dequantized once and multiplied by cuBLAS (argument > env > 1024)."""
    if value is None:
        raw = os.environ.get(DEQUANT_ROWS_ENV)
        if raw is None or raw.strip() == "":
            return DEQUANT_ROWS_DEFAULT
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{DEQUANT_ROWS_ENV}={raw!r}: expected a non-negative integer") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"dequant_rows must be a non-negative integer, got {value!r}")
    return value


def resolve_dense_base(value: Optional[str] = None) -> str:
    """How a dense base product runs: "cublas" (default) or "triton" (argument > env)."""
    if value is None:
        value = os.environ.get(DENSE_BASE_ENV) or DENSE_BASE_DEFAULT
        where = DENSE_BASE_ENV
    else:
        where = "dense_base"
    if value not in STRATEGIES:
        raise ValueError(f"{where}={value!r}: expected one of {', '.join(STRATEGIES)}")
    return value


def pick_strategy(rows: int, is_4bit: bool, *, dequant_rows: Optional[int] = None,
                  dense_base: Optional[str] = None) -> str:
    """"triton" or "cublas" for a product with ``rows`` rows; decided on the host from shapes alone."""
    if is_4bit:
        return "cublas" if rows >= resolve_dequant_rows(dequant_rows) else "triton"
    return resolve_dense_base(dense_base)


# One dequantization workspace per (device, dtype), grown to the largest layer seen;
# every layer reuses it (work on one stream is ordered, and no product keeps it past
# its own call: backward dequantizes again instead of saving a dense W).
_WORKSPACES: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, shared by every 4-bit layer on ``device``."""
    key = (torch.device(device), dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)  # free the smaller one before growing
        buf = empty(numel, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf[:numel]


def workspace_bytes() -> Dict[str, int]:
    """{"device dtype": bytes} of the dequantization workspaces (for memory reports and tests)."""
    return {f"{d} {str(t).replace('torch.', '')}": b.numel() * b.element_size() for (d, t), b in _WORKSPACES.items()}


# --------------------------------------------------------------------------- kernels
@triton.jit
def _rank_project_kernel(x_ptr, p_ptr, out_ptr, M, K, R, scale,
                         stride_xm, stride_xk, stride_pr, stride_pk, stride_om,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[m, j] = scale * sum_k x[m, k] * p[j, k]  (out fp32, (M, R), rows contiguous)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        p = tl.load(p_ptr + offs_r[None, :].to(tl.int64) * stride_pr + offs_k[:, None].to(tl.int64) * stride_pk,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), p.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :]
    tl.store(out, acc * scale, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _rank_reduce_kernel(y_ptr, z_ptr, part_ptr, M, D, R, rows_per_split,
                        stride_ym, stride_yd, stride_zm, stride_zr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """part[split, d, j] = sum over this split's rows m of y[m, d] * z[m, j]  (fp32)."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_d = offs_d < D
    mask_r = offs_r < R
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)[:, None]
        y = tl.load(y_ptr + rows * stride_ym + offs_d[None, :].to(tl.int64) * stride_yd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        z = tl.load(z_ptr + rows * stride_zm + offs_r[None, :] * stride_zr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(tl.trans(y.to(DOT_DTYPE)), z.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out = part_ptr + split.to(tl.int64) * D * R + offs_d.to(tl.int64)[:, None] * R + offs_r[None, :]
    tl.store(out, acc, mask=mask_d[:, None] & mask_r[None, :])


@triton.jit
def _lora_matmul_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, l_ptr, p_ptr, bias_ptr, out_ptr,
    M, N_OUT, K_RED, R, scale,
    stride_am, stride_ak, stride_wr, stride_wc, stride_lm, stride_lr, stride_pr, stride_pn,
    stride_om, stride_on,
    W_ROWS_ARE_OUT: tl.constexpr, IS_4BIT: tl.constexpr, PAIRED: tl.constexpr, QBLOCK: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, W_AS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N_OUT) [+]= a (M, K_RED) @ W-side + scale * l (M, R) @ p (R, N_OUT) [+ bias].

    W_ROWS_ARE_OUT: W is (N_OUT, K_RED) and the product is a @ W^T (forward);
    otherwise W is (K_RED, N_OUT) and the product is a @ W (backward dx).
    W_AS_A: accumulate the transposed tile, W as the dot's first (register) operand.
    QBLOCK: the 4-bit quantization blocksize (a constexpr: block index math becomes
    shifts). ROWS_ALIGNED: W's row length is a multiple of QBLOCK, so a tile whose
    columns fit in one quantization block needs one absmax per row. EVEN_K: K_RED is
    a multiple of BLOCK_K, so the loop body needs no bounds checks along k.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    # grouped ordering: programs sharing W tiles run close together (L2 reuse)
    group_size = GROUP_M * num_n
    group = pid // group_size
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am

    if W_AS_A:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_RED, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_rows + offs_k[None, :].to(tl.int64) * stride_ak, mask=mask_m[:, None], other=0.0)
        else:
            a = tl.load(a_rows + offs_k[None, :].to(tl.int64) * stride_ak,
                        mask=mask_m[:, None] & (offs_k[None, :] < K_RED), other=0.0)
        if W_ROWS_ARE_OUT:
            w = load_weight_tile(w_ptr, absmax_ptr, code_ptr, offs_n, k0, N_OUT, K_RED, stride_wr, stride_wc,
                                 QBLOCK, IS_4BIT=IS_4BIT, PAIRED=PAIRED, BLOCK_ROW=BLOCK_N, BLOCK_COL=BLOCK_K,
                                 OUT_DTYPE=DOT_DTYPE, ROW_SCALE=ROWS_ALIGNED and QBLOCK % BLOCK_K == 0,
                                 EVEN_COLS=EVEN_K)
            if W_AS_A:
                acc_t = tl.dot(w, tl.trans(a.to(DOT_DTYPE)), acc_t, input_precision=PRECISION)
            else:
                acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w), acc, input_precision=PRECISION)
        else:
            w = load_weight_tile(w_ptr, absmax_ptr, code_ptr, offs_k, pid_n * BLOCK_N, K_RED, N_OUT, stride_wr,
                                 stride_wc, QBLOCK, IS_4BIT=IS_4BIT, PAIRED=PAIRED, BLOCK_ROW=BLOCK_K,
                                 BLOCK_COL=BLOCK_N, OUT_DTYPE=DOT_DTYPE,
                                 ROW_SCALE=ROWS_ALIGNED and QBLOCK % BLOCK_N == 0, EVEN_ROWS=EVEN_K)
            if W_AS_A:
                acc_t = tl.dot(tl.trans(w), tl.trans(a.to(DOT_DTYPE)), acc_t, input_precision=PRECISION)
            else:
                acc = tl.dot(a.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    if W_AS_A:
        acc = tl.trans(acc_t)

    # LoRA epilogue: rank-r update while the tile is still in registers
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    lo = tl.load(l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    pr = tl.load(p_ptr + offs_r[:, None].to(tl.int64) * stride_pr + offs_n[None, :].to(tl.int64) * stride_pn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    lo = (lo.to(tl.float32) * scale).to(DOT_DTYPE)
    acc = tl.dot(lo, pr.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :].to(tl.int64) * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# On the GPU the 16-bit matmuls pick their tiles by autotuning (keyed on the problem
# shape and variant); dx accumulation restores the output between trials. Configs
# whose shared memory would pass the arch's limit are pruned on the host first.
_DENSE_TILES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4))
# the 4-bit kernel runs below DEQUANT_ROWS rows (few row tiles): smaller M tiles
_4BIT_TILES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               (64, 64, 64, 4, 4), (64, 128, 64, 4, 3))
_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in dict.fromkeys(_DENSE_TILES + _4BIT_TILES)
]
_TILES = {False: set(_DENSE_TILES), True: set(_4BIT_TILES)}
# Tiles older Triton releases compile badly on one arch (compile tier per version, ptxas -v):
# left out of the autotuner's list there, up to the last release named.
# Key: (last release, arch major, forward, 4-bit); value: tiles, reason.
_VERSION_EXCLUDED = {
    ((3, 7), 8, True, True): ({(128, 256, 64, 8, 3)}, "Triton 3.6 and 3.7 spill 6.8 KB of the 128 x 256 NF4 "
                                                      "forward tile on sm_80"),
}


def _excluded(tile, arch: Tuple[int, int], forward: bool, is_4bit: bool) -> bool:
    version = triton_version()
    return any(version <= last and arch[0] == major and (forward, is_4bit) == (fwd, b4) and tile in tiles
               for (last, major, fwd, b4), (tiles, _) in _VERSION_EXCLUDED.items())


def tile_notes() -> List[str]:
    """The tiles left out on this Triton version, with the reason (for the compile report)."""
    version = triton_version()
    return [f"lora {'forward' if fwd else 'backward dx'} {'4-bit' if b4 else 'dense'} sm_{major}x (triton <= "
            f"{last[0]}.{last[1]}): without {', '.join('BM%d BN%d BK%d w%d s%d' % t for t in sorted(tiles))} ({why})"
            for (last, major, fwd, b4), (tiles, why) in _VERSION_EXCLUDED.items() if version <= last]

# usable shared memory per block (bytes), by compute capability
SMEM_LIMIT = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
              (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}


def _smem_estimate(cfg: triton.Config, *, forward: bool, is_4bit: bool, elem: int = 2) -> int:
    """Shared memory (bytes) a config of _lora_matmul_kernel needs, an upper estimate.

    Dense: the pipelined x and W tiles, num_stages * (BM*BK + BK*BN) * elem (what the
    compiler allocates for sm_90 and sm_80). 4-bit: the pipelined x tiles plus, per W
    element of a tile, the staged packed bytes, code-pair gathers and absmax (and, in
    backward, the dequantized tile handed to the tensor cores): at most 6 bytes
    (forward) / 8 bytes (backward), fitted to sm_90 compiles of every config
    (``python -m benchmarks.lora_sass``) and rounded up; sm_80 compiles need less.
    """
    kw = cfg.kwargs
    bm, bn, bk, st = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_stages
    x_tiles = st * bm * bk * elem
    if not is_4bit:
        return x_tiles + st * bk * bn * elem
    return x_tiles + bn * bk * (6 if forward else 8)


def _arch_of(device) -> Optional[Tuple[int, int]]:
    if isinstance(device, tuple):
        return device
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(dev)


def matmul_configs(*, forward: bool, is_4bit: bool, arch=(9, 0), dtype: torch.dtype = torch.bfloat16) -> List:
    """The triton.Config list the 16-bit launcher may pick for one variant on one arch.

    ``arch`` is a (major, minor) capability, an int like 90, or a CUDA device. This is
    what the autotuner is given after its host-side prune (the tile set of the variant,
    minus configs whose shared memory passes the arch's limit and tiles the running Triton
    release compiles badly there, ``_VERSION_EXCLUDED``): an ahead-of-time tier
    compiles exactly these. fp32 inputs and the interpreter use one fixed tile
    (``fixed_matmul_config``) instead.
    """
    if isinstance(arch, int):
        arch = divmod(arch, 10)
    arch = _arch_of(arch)
    limit = SMEM_LIMIT.get(arch, 99 * 1024) if arch is not None else None
    elem = torch.empty((), dtype=dtype).element_size()
    out = []
    for cfg in _MATMUL_CONFIGS:
        kw = cfg.kwargs
        tile = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)
        if tile not in _TILES[is_4bit] or (arch is not None and _excluded(tile, arch, forward, is_4bit)):
            continue
        if limit is not None and _smem_estimate(cfg, forward=forward, is_4bit=is_4bit, elem=elem) > limit:
            continue
        out.append(cfg)
    return out


def fixed_matmul_config(dtype: torch.dtype) -> dict:
    """The one tile fp32 inputs use on the GPU (exact fp32 dots; not the hot path)."""
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def _prune_configs(configs, nargs, **kwargs):
    """Autotuner hook: keep the configs matmul_configs lists for this call's variant and device."""
    arch = _arch_of(nargs["a_ptr"].device)
    allowed = matmul_configs(forward=bool(kwargs["W_ROWS_ARE_OUT"]), is_4bit=bool(kwargs["IS_4BIT"]),
                             arch=arch if arch is not None else (9, 0), dtype=nargs["a_ptr"].dtype)
    keep = [c for c in configs if any(c.kwargs == a.kwargs and c.num_warps == a.num_warps
                                      and c.num_stages == a.num_stages for a in allowed)]
    return keep or allowed[:1] or configs[-1:]


def w_as_a(forward: bool, is_4bit: bool) -> bool:
    """Whether the kernel computes out^T = W a^T: the dequantized W tile is then the
    wgmma's register operand (no shared-memory round trip, and the wgmma is not waited
    on at once). Compiled for sm_90 this wins for the 4-bit forward only; the backward's
    W^T tile would need a transpose and its wgmmas are then waited one by one."""
    return forward and is_4bit


def _even_k(args) -> bool:
    return args["K_RED"] % args["BLOCK_K"] == 0


_lora_matmul_tuned = triton.autotune(
    configs=_MATMUL_CONFIGS,
    key=["N_OUT", "K_RED", "W_ROWS_ARE_OUT", "IS_4BIT", "PAIRED", "QBLOCK", "ROWS_ALIGNED", "HAS_BIAS",
         "ACCUMULATE", "BLOCK_R"],
    restore_value=["out_ptr"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(triton.heuristics({"EVEN_K": _even_k})(_lora_matmul_kernel))


# --------------------------------------------------------------------------- launchers
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_config(dtype: torch.dtype):
    """Dot operand dtype and precision: 16-bit activations use tensor cores; fp32 stays exact fp32."""
    return _TL_DTYPE[dtype], ("ieee" if dtype == torch.float32 else None)


def _rank_block(r: int) -> int:
    return max(16, next_power_of_2(r))


class _Weight:
    """The base weight as the kernels see it: dense (out, in) or 4-bit packed + QuantInfo."""

    def __init__(self, weight: torch.Tensor, info: Optional[QuantInfo]):
        self.weight = weight
        self.info = info

    @property
    def is_4bit(self) -> bool:
        return self.info is not None

    @property
    def shape(self):
        return self.info.shape if self.info is not None else tuple(self.weight.shape)

    def kernel_args(self, absmax: Optional[torch.Tensor]):
        """(w_ptr tensor, absmax, code, stride_row, stride_col, blocksize, paired)."""
        if self.info is None:
            w = self.weight
            return w, w, w, w.stride(0), w.stride(1), 1, False
        info = self.info
        paired = info.shape[1] % 2 == 0
        return info.packed, absmax, info.pairs if paired else info.code, 0, 0, info.blocksize, paired


def _matmul(a: torch.Tensor, weight: _Weight, absmax, lo: torch.Tensor, p: torch.Tensor, p_strides,
            scale: float, bias: Optional[torch.Tensor], out: torch.Tensor, *, forward: bool,
            accumulate: bool = False) -> torch.Tensor:
    """out [+]= a @ W^T (forward) or a @ W (backward), plus scale * lo @ p, plus bias."""
    M, k_red = a.shape
    n_out = out.shape[1]
    r = lo.shape[1]
    w, am, code, s_wr, s_wc, blocksize, paired = weight.kernel_args(absmax)
    dot_dtype, precision = _dot_config(a.dtype)
    args = (a, w, am, code, lo, p, bias if bias is not None else out, out,
            M, n_out, k_red, r, scale,
            a.stride(0), a.stride(1), s_wr, s_wc, lo.stride(0), lo.stride(1), p_strides[0], p_strides[1],
            out.stride(0), out.stride(1))
    flags = dict(W_ROWS_ARE_OUT=forward, IS_4BIT=weight.is_4bit, PAIRED=paired, QBLOCK=blocksize,
                 W_AS_A=w_as_a(forward, weight.is_4bit),
                 ROWS_ALIGNED=bool(paired and weight.shape[1] % blocksize == 0),
                 HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
                 DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_R=_rank_block(r))
    if is_interpreter() or a.dtype == torch.float32:
        # interpreter: one small config; fp32 (exact ieee dots, not the hot path): tiles that fit registers
        if is_interpreter():
            cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)
        else:
            cfg = fixed_matmul_config(a.dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
        _lora_matmul_kernel[grid](*args, **flags, **cfg, EVEN_K=k_red % cfg["BLOCK_K"] == 0)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

        _lora_matmul_tuned[grid](*args, **flags)
    return out


def _rank_project(x: torch.Tensor, p: torch.Tensor, p_strides, r: int, scale: float,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scale * x @ P^T as fp32 (M, r) (into ``out``, unit column stride, when given), P by (row j, col k) strides."""
    M, K = x.shape
    if out is None:
        out = empty(M, r, dtype=torch.float32, device=x.device)
    dot_dtype, precision = _dot_config(x.dtype)
    bm, bk = (32, 64) if is_interpreter() else (64, 64)
    _rank_project_kernel[(triton.cdiv(M, bm),)](
        x, p, out, M, K, r, scale, x.stride(0), x.stride(1), p_strides[0], p_strides[1], out.stride(0),
        DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=_rank_block(r),
        num_warps=4, num_stages=1 if is_interpreter() else 4,
    )
    return out


def _rank_reduce(y: torch.Tensor, z: torch.Tensor, dot_dtype_src: torch.dtype) -> torch.Tensor:
    """y^T @ z as fp32 (D, R) for y (M, D), z (M, R): reduction over M, split for parallelism."""
    M, D = y.shape
    r = z.shape[1]
    dot_dtype, precision = _dot_config(dot_dtype_src)
    bd, bm = (64, 32) if is_interpreter() else (64, 64)
    d_tiles = triton.cdiv(D, bd)
    # enough programs to fill the GPU; each split sums a contiguous chunk of rows
    target = 1 if is_interpreter() else 264
    splits = max(1, min(triton.cdiv(target, d_tiles), triton.cdiv(M, 4 * bm)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), bm) * bm
    splits = triton.cdiv(M, rows_per_split) if M else 1
    part = empty(splits, D, r, dtype=torch.float32, device=y.device)
    _rank_reduce_kernel[(d_tiles, splits)](
        y, z, part, M, D, r, rows_per_split, y.stride(0), y.stride(1), z.stride(0), z.stride(1),
        DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_D=bd, BLOCK_M=bm, BLOCK_R=_rank_block(r),
        num_warps=4, num_stages=1 if is_interpreter() else 3,
    )
    return part[0] if splits == 1 else part.sum(0)


def _dense_or_4bit(weight: torch.Tensor, quant_state) -> _Weight:
    if quant_state is None:
        if weight.dtype == torch.uint8:
            raise ValueError("weight is uint8 (packed 4-bit data?) but quant_state is None")
        check_float("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        return _Weight(weight, None)
    return _Weight(weight, cached_quant_info(weight, quant_state))


def _check_lora(x: torch.Tensor, w: _Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, bias, name: str = ""):
    out_f, in_f = w.shape
    check_float("x", x)
    check_float(f"lora_a{name}", lora_a)
    check_float(f"lora_b{name}", lora_b)
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features but weight{name} expects in_features={in_f}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"lora_a{name} must be (r, {in_f}), got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or lora_b.shape != (out_f, r):
        raise ValueError(f"lora_b{name} must be ({out_f}, {r}), got {tuple(lora_b.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"LoRA rank must be in 1..{MAX_RANK}, got {r}")
    if not w.is_4bit and w.weight.dtype != x.dtype:
        raise ValueError(f"weight{name} dtype {w.weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        check_float(f"bias{name}", bias)
        if bias.shape != (out_f,):
            raise ValueError(f"bias{name} must be ({out_f},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=w.weight, lora_a=lora_a, lora_b=lora_b, bias=bias)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --------------------------------------------------------------------------- ahead-of-time view
def _matmul_signature(fn, *, is_4bit: bool, dt: str, constexprs: dict):
    """(signature, attrs) of _lora_matmul_kernel as the JIT sees it at training shapes:
    16-byte aligned pointers; sizes and row strides divisible by 16; unit strides constexpr 1."""
    ptr = {"a_ptr": dt, "w_ptr": "u8" if is_4bit else dt, "absmax_ptr": "fp32",
           "code_ptr": "i64" if is_4bit else dt, "l_ptr": "fp32", "p_ptr": "fp32", "bias_ptr": dt, "out_ptr": dt}
    div16 = ("N_OUT", "K_RED", "stride_am", "stride_wr", "stride_om", "stride_lm", "stride_pr", "stride_pn")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = "*" + ptr[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _plain_signature(fn, types: dict, constexprs: dict):
    """Signature for a kernel whose pointers are in ``types`` (aligned) and whose other arguments are i32."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
            if types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    return sig, attrs


def _entry(name, fn, sig, constexprs, attrs, options, smem_estimate=None) -> dict:
    return dict(name=name, fn=fn, signature=sig, constexprs=constexprs, attrs=attrs, options=options,
                smem_estimate=smem_estimate)


def launch_variants(arch=(9, 0), dtypes=("bf16", "fp16"), ranks=(16,), blocksize: int = 64,
                    even_k: bool = True, include_aux: bool = True) -> List[dict]:
    """Every (kernel, constexprs, launch options) the launchers of this module can pick on ``arch``.

    For an ahead-of-time tier: each entry has "name", "fn" (the @triton.jit function),
    "signature", "constexprs", "attrs" (for ``triton.compiler.ASTSource``), "options"
    (num_warps, num_stages, ...) and "smem_estimate" (the bytes the host-side prune
    assumed, None where nothing is pruned). The matmul entries cover the forward (with
    and without bias) and backward-dx (first write and accumulation) of a dense and an
    NF4/FP4 base (even in_features, rows a multiple of ``blocksize``), each tile of
    ``matmul_configs(arch)``, per dot dtype and LoRA rank, plus the fixed exact-fp32
    tile. ``include_aux`` adds the fixed-config kernels: the rank projection and
    reduction (per dtype and rank), the 4-bit dequantizer (per output dtype, byte
    aligned rows or not) and the nested-absmax decoder. Unit strides are not
    specialized in the aux entries (the JIT may specialize them to 1).
    """
    if isinstance(arch, int):
        arch = divmod(arch, 10)
    out = []
    dots = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    fn = _lora_matmul_kernel
    fixed = triton.Config({k: v for k, v in fixed_matmul_config(torch.float32).items()
                           if k not in ("num_warps", "num_stages")},
                          num_warps=fixed_matmul_config(torch.float32)["num_warps"],
                          num_stages=fixed_matmul_config(torch.float32)["num_stages"])
    for dt in tuple(dtypes) + ("fp32",):
        for forward in (True, False):
            for is_4bit in (False, True):
                if dt == "fp32":
                    cfgs = [fixed]
                else:
                    cfgs = matmul_configs(forward=forward, is_4bit=is_4bit, arch=arch,
                                          dtype=torch.bfloat16 if dt == "bf16" else torch.float16)
                for rank in ranks:
                    for extra in (False, True):
                        has_bias, accumulate = (extra, False) if forward else (False, extra)
                        for cfg in cfgs:
                            c = dict(W_ROWS_ARE_OUT=forward, IS_4BIT=is_4bit, PAIRED=is_4bit,
                                     QBLOCK=blocksize if is_4bit else 1, ROWS_ALIGNED=is_4bit, EVEN_K=even_k,
                                     W_AS_A=w_as_a(forward, is_4bit), HAS_BIAS=has_bias, ACCUMULATE=accumulate,
                                     DOT_DTYPE=dots[dt], PRECISION="ieee" if dt == "fp32" else None,
                                     BLOCK_R=_rank_block(rank), stride_ak=1, stride_lr=1, stride_on=1, **cfg.kwargs)
                            c["stride_pr" if forward else "stride_pn"] = 1
                            if is_4bit:
                                c.update(stride_wr=0, stride_wc=0)
                            else:
                                c["stride_wc"] = 1
                            sig, attrs = _matmul_signature(fn, is_4bit=is_4bit, dt=dt, constexprs=c)
                            kw = cfg.kwargs
                            name = (f"lora_matmul_{'fwd' if forward else 'bwd_dx'}_{'4bit' if is_4bit else 'dense'}"
                                    f"_{dt}_r{rank}{'_bias' if has_bias else ''}{'_acc' if accumulate else ''}"
                                    f"_BM{kw['BLOCK_M']}_BN{kw['BLOCK_N']}_BK{kw['BLOCK_K']}"
                                    f"_w{cfg.num_warps}_s{cfg.num_stages}")
                            est = None if dt == "fp32" else _smem_estimate(cfg, forward=forward, is_4bit=is_4bit)
                            out.append(_entry(name, fn, sig, c, attrs,
                                              {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, est))
    if not include_aux:
        return out
    from .quant import _decode_nested_absmax_kernel, _dequantize_4bit_kernel

    for dt in tuple(dtypes) + ("fp32",):
        prec = "ieee" if dt == "fp32" else None
        for rank in ranks:
            for p_dt in dict.fromkeys(("fp32", dt)):  # peft keeps adapters in fp32 or in the model dtype
                c = dict(DOT_DTYPE=dots[dt], PRECISION=prec, BLOCK_M=64, BLOCK_K=64, BLOCK_R=_rank_block(rank))
                sig, attrs = _plain_signature(_rank_project_kernel, {"x_ptr": "*" + dt, "p_ptr": "*" + p_dt,
                                                                     "out_ptr": "*fp32", "scale": "fp32"}, c)
                out.append(_entry(f"rank_project_{dt}_p{p_dt}_r{rank}", _rank_project_kernel, sig, c, attrs,
                                  {"num_warps": 4, "num_stages": 4}))
            c = dict(DOT_DTYPE=dots[dt], PRECISION=prec, BLOCK_D=64, BLOCK_M=64, BLOCK_R=_rank_block(rank))
            sig, attrs = _plain_signature(_rank_reduce_kernel, {"y_ptr": "*" + dt, "z_ptr": "*fp32",
                                                                "part_ptr": "*fp32"}, c)
            out.append(_entry(f"rank_reduce_{dt}_r{rank}", _rank_reduce_kernel, sig, c, attrs,
                              {"num_warps": 4, "num_stages": 3}))
        for paired in (True, False):
            c = dict(PAIRED=paired, BLOCK_ROW=32, BLOCK_COL=128)
            sig, attrs = _plain_signature(_dequantize_4bit_kernel, {
                "w_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*i64" if paired else "*fp32",
                "out_ptr": "*" + dt}, c)
            out.append(_entry(f"dequantize_4bit_{dt}_{'paired' if paired else 'odd_cols'}", _dequantize_4bit_kernel,
                              sig, c, attrs, {"num_warps": 4, "num_stages": 3}))
    c = dict(BLOCK=1024)
    sig, attrs = _plain_signature(_decode_nested_absmax_kernel, {
        "q_ptr": "*u8", "code2_ptr": "*fp32", "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*fp32"}, c)
    out.append(_entry("decode_nested_absmax", _decode_nested_absmax_kernel, sig, c, attrs,
                      {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}))
    return out


# --------------------------------------------------------------------------- cuBLAS strategy
def _dense_w(w: _Weight, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) dense in ``dtype``: the weight itself, or a 4-bit W dequantized into the workspace."""
    if not w.is_4bit:
        return w.weight
    out_f, in_f = w.shape
    buf = workspace(out_f * in_f, dtype, w.info.packed.device).view(out_f, in_f)
    return dequantize_into(w.info, buf)


def _cublas_lora(a: torch.Tensor, w_mat: torch.Tensor, lo: torch.Tensor, p_mat: torch.Tensor, scale: float,
                 bias: Optional[torch.Tensor], out: torch.Tensor, *, accumulate: bool = False) -> torch.Tensor:
    """out [+]= a @ w_mat (+ bias), then out += scale * lo @ p_mat in one more addmm (rank r: cheap)."""
    with torch.autocast(out.device.type, enabled=False):  # the products run in x's dtype, as the kernels do
        return _cublas_lora_impl(a, w_mat, lo, p_mat, scale, bias, out, accumulate)


def _cublas_lora_impl(a, w_mat, lo, p_mat, scale, bias, out, accumulate):
    dt = out.dtype
    if accumulate:
        out.addmm_(a, w_mat)
    elif bias is not None:
        torch.addmm(bias.to(dt), a, w_mat, out=out)
    else:
        torch.mm(a, w_mat, out=out)
    if lo.shape[1]:
        out.addmm_(lo.to(dt), p_mat.to(dt), alpha=scale)
    return out


# --------------------------------------------------------------------------- launchers (forward / backward)
# One or several LoRA projections sharing the input x. Projection i has weight[i], lora_a[i],
# lora_b[i], scaling[i], bias[i] and a strategy ("triton" or "cublas", chosen on the host from
# the row count). Backward recomputes a 4-bit W (the cuBLAS strategy dequantizes it again into
# the workspace); nothing dense is saved: x, the fp32 rank-r xa and the parameters.
def _lora_forward(x2, infos, scalings, strategies, weights, lora_as, lora_bs, biases):
    """(outs, xa): y_i = x W_i^T + s_i (x A_i^T) B_i^T (+ bias_i); xa = x A_cat^T fp32 (M, sum r)."""
    n = len(scalings)
    ranks = [a.shape[0] for a in lora_as]
    # one pass over x for every adapter's x A^T
    a_cat = lora_as[0] if n == 1 else torch.cat([a.to(lora_as[0].dtype) for a in lora_as], 0)
    xa = _rank_project(x2, a_cat, (a_cat.stride(0), a_cat.stride(1)), a_cat.shape[0], 1.0)
    outs, offset = [], 0
    for i in range(n):
        w = _Weight(weights[i], infos[i])
        y = empty(x2.shape[0], w.shape[0], dtype=x2.dtype, device=x2.device)
        lo = xa[:, offset:offset + ranks[i]]
        b = lora_bs[i]
        if strategies[i] == "cublas":
            _cublas_lora(x2, _dense_w(w, x2.dtype).t(), lo, b.t(), scalings[i], biases[i], y)
        else:
            absmax = absmax_fp32(w.info) if w.is_4bit else None
            _matmul(x2, w, absmax, lo, b, (b.stride(1), b.stride(0)), scalings[i], biases[i], y, forward=True)
        outs.append(y)
        offset += ranks[i]
    return outs, xa


def _lora_backward(grads, x2, xa, weights, lora_as, lora_bs, infos, scalings, strategies,
                   need_x, need_w, need_a, need_b, bias_meta):
    """(dx, [dW_i], [dA_i], [dB_i], [dbias_i]); an entry not needed is None. bias_meta: (needed, dtype)."""
    n = len(scalings)
    ranks = [a.shape[0] for a in lora_as]
    M = x2.shape[0]
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in grads]
    # rank-first: s * g B (M, r) for each projection, side by side in one buffer
    gbs = empty(M, sum(ranks), dtype=torch.float32, device=x2.device)
    d_a, d_b, offset = [], [], 0
    for i in range(n):
        g, b, s, r = grads[i], lora_bs[i], scalings[i], ranks[i]
        _rank_project(g, b, (b.stride(1), b.stride(0)), r, s, out=gbs[:, offset:offset + r])
        # dB = s * g^T xa  (out, r)
        d_b.append((_rank_reduce(g, xa[:, offset:offset + r], g.dtype) * s).to(b.dtype) if need_b[i] else None)
        offset += r
    # dA = (s g B)^T x for all adapters in one pass over x
    if any(need_a):
        d_a_cat = _rank_reduce(x2, gbs, x2.dtype).t()  # (r_tot, in)
        offset = 0
        for i in range(n):
            r = ranks[i]
            d_a.append(d_a_cat[offset:offset + r].to(lora_as[i].dtype).contiguous() if need_a[i] else None)
            offset += r
    else:
        d_a = [None] * n
    dx = None
    if need_x:
        # dx = sum_i g_i W_i + (s g B)_cat A_cat, accumulated in one buffer
        dx = empty(M, x2.shape[1], dtype=x2.dtype, device=x2.device)
        a_cat = lora_as[0] if n == 1 else torch.cat([a.to(lora_as[0].dtype) for a in lora_as], 0)
        rank_done = False
        for i in range(n):
            w = _Weight(weights[i], infos[i])
            if strategies[i] == "cublas":
                _cublas_lora(grads[i], _dense_w(w, x2.dtype), gbs[:, :0], a_cat[:0], 1.0, None, dx,
                             accumulate=i > 0)
            else:
                absmax = absmax_fp32(w.info) if w.is_4bit else None
                # the rank term for all projections rides on one Triton matmul's epilogue
                lo, p = (gbs, a_cat) if not rank_done else (gbs[:, :0], a_cat[:0])
                _matmul(grads[i], w, absmax, lo, p, (p.stride(0), p.stride(1)), 1.0, None, dx,
                        forward=False, accumulate=i > 0)
                rank_done = True
        if not rank_done:
            dx.addmm_(gbs.to(dx.dtype), a_cat.to(dx.dtype))
    d_w = []
    for i in range(n):
        if infos[i] is None and need_w[i]:
            gw = empty(*weights[i].shape, dtype=weights[i].dtype, device=x2.device)
            torch.mm(grads[i].t(), x2, out=gw)  # full fine-tuning of the base: cuBLAS
            d_w.append(gw)
        else:
            d_w.append(None)
    d_bias = [grads[i].sum(0, dtype=torch.float32).to(dt) if needed else None for i, (needed, dt) in enumerate(bias_meta)]
    return dx, d_w, d_a, d_b, d_bias


# --------------------------------------------------------------------------- operators
# The bitsandbytes QuantState travels as operator arguments, one list entry per projection
# (None / 0 / "" for a dense weight): absmax, code, nested absmax2 / code2 / offset (tensors),
# blocksize, blocksize2, (out, in) shape (ints) and quant type (str). The implementations
# rebuild a state object from them; fake implementations need only the shape.
class _State:
    """A QuantState rebuilt from operator arguments (what quant_info and the reference read)."""

    def __init__(self, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, quant_type, dtype):
        self.absmax, self.code, self.blocksize, self.shape = absmax, code, blocksize, tuple(shape)
        self.quant_type, self.dtype, self.offset = quant_type, dtype, offset
        self.nested = absmax2 is not None
        self.state2 = _State(absmax2, code2, None, None, None, blocksize2, 0, (), "", dtype) if self.nested else None


def _state_args(weight: torch.Tensor, quant_state) -> tuple:
    """(absmax, code, absmax2, code2, offset, blocksize, blocksize2, [out, in], quant_type) of one weight."""
    if quant_state is None:
        return None, None, None, None, None, 0, 0, list(weight.shape), ""
    for field in ("absmax", "shape", "blocksize", "quant_type", "dtype"):
        if not hasattr(quant_state, field):
            raise ValueError(f"quant_state has no field {field!r}; expected a bitsandbytes QuantState")
    shape = [int(s) for s in quant_state.shape]
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D (out, in), got {tuple(shape)}")
    state2 = getattr(quant_state, "state2", None)
    nested = bool(getattr(quant_state, "nested", False)) and state2 is not None
    offset = getattr(quant_state, "offset", None) if nested else None
    if nested and not isinstance(offset, torch.Tensor):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=weight.device)
    return (quant_state.absmax, getattr(quant_state, "code", None), state2.absmax if nested else None,
            state2.code if nested else None, offset, int(quant_state.blocksize),
            int(state2.blocksize) if nested else 0, shape, str(quant_state.quant_type))


def _quant_infos(weights, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, dtype):
    """QuantInfo per 4-bit weight (None for dense), validated once and cached on its absmax tensor."""
    infos = []
    for i, w in enumerate(weights):
        if absmax[i] is None:
            infos.append(None)
            continue
        state = _State(absmax[i], code[i], absmax2[i], code2[i], offset[i], blocksize[i], blocksize2[i], shapes[i],
                       quant_types[i], dtype)
        key = _state_key(w, state)
        hit = getattr(absmax[i], _CACHE_ATTR, None)
        if hit is None or hit[0] != key:
            hit = (key, _quant.quant_info(w, state))
            setattr(absmax[i], _CACHE_ATTR, hit)
        infos.append(hit[1])
    return infos


def _reference_states(absmax, code, absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, dtype):
    return [None if absmax[i] is None else
            _State(absmax[i], code[i], absmax2[i], code2[i], offset[i], blocksize[i], blocksize2[i], shapes[i],
                   quant_types[i], dtype) for i in range(len(absmax))]


def _reference_outputs(x2, weights, lora_as, lora_bs, biases, scalings, states):
    return [reference.lora_linear(x2, w, a, b, s, bias=bi, quant_state=q)
            for w, a, b, s, bi, q in zip(weights, lora_as, lora_bs, scalings, biases, states)]


_QUANT_SCHEMA = ("Tensor?[] absmax, Tensor?[] code, Tensor?[] absmax2, Tensor?[] code2, Tensor?[] offset, "
                 "int[] blocksize, int[] blocksize2, int[][] shapes, str[] quant_types")
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
# biases: Tensor[] with an empty placeholder where has_bias is False (gradients do not flow
# through a Tensor?[] argument)
_LIB.define("lora_linear(Tensor x2, Tensor[] weights, Tensor[] lora_as, Tensor[] lora_bs, float[] scalings, "
            f"Tensor[] biases, bool[] has_bias, {_QUANT_SCHEMA}, str[] strategies) -> Tensor[]")
_LIB.define("lora_linear_backward(Tensor[] grads, Tensor x2, Tensor xa, Tensor[] weights, Tensor[] lora_as, "
            f"Tensor[] lora_bs, float[] scalings, Tensor[] biases, bool[] has_bias, {_QUANT_SCHEMA}, str[] strategies, "
            "bool need_x, bool[] need_w, bool[] need_a, bool[] need_b, bool[] need_bias) -> Tensor[]")


def _present(biases, has_bias):
    return [b if h else None for b, h in zip(biases, has_bias)]


def _lora_impl(x2, weights, lora_as, lora_bs, scalings, biases, has_bias, absmax, code, absmax2, code2, offset, blocksize,
               blocksize2, shapes, quant_types, strategies):
    """[y_0, ..., y_{n-1}, xa]: the projections and the fp32 rank-r x A_cat^T that backward reads."""
    quant = (absmax, code, absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, x2.dtype)
    biases = _present(biases, has_bias)
    if not use_triton(x2) or x2.shape[0] == 0:  # no tokens: nothing to launch
        a_cat = torch.cat([a.to(torch.float32) for a in lora_as], 0)
        outs = _reference_outputs(x2, weights, lora_as, lora_bs, biases, scalings, _reference_states(*quant))
        return [y.contiguous() for y in outs] + [x2.to(torch.float32) @ a_cat.t()]
    infos = _quant_infos(weights, *quant)
    outs, xa = _lora_forward(x2, infos, list(scalings), list(strategies), weights, lora_as, lora_bs, biases)
    return outs + [xa]


def _lora_fake(x2, weights, lora_as, lora_bs, scalings, biases, has_bias, absmax, code, absmax2, code2, offset, blocksize,
               blocksize2, shapes, quant_types, strategies):
    outs = [x2.new_empty(x2.shape[0], shape[0]) for shape in shapes]
    return outs + [x2.new_empty(x2.shape[0], sum(a.shape[0] for a in lora_as), dtype=torch.float32)]


def _lora_backward_impl(grads, x2, xa, weights, lora_as, lora_bs, scalings, biases, has_bias, absmax, code, absmax2, code2,
                        offset, blocksize, blocksize2, shapes, quant_types, strategies, need_x, need_w, need_a,
                        need_b, need_bias):
    """[dx, dW_0.., dA_0.., dB_0.., dbias_0..]; an entry not needed is an empty tensor."""
    n = len(weights)
    quant = (absmax, code, absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, x2.dtype)
    biases = _present(biases, has_bias)
    if not use_triton(x2) or x2.shape[0] == 0:
        states = _reference_states(*quant)
        biases_l = list(biases)

        def forward(x, *params):
            ws, a_s, b_s, bs = (list(params[i * n:(i + 1) * n]) for i in range(4))
            return tuple(_reference_outputs(x, ws, a_s, b_s, bs, scalings, states))

        primals = (x2, *weights, *lora_as, *lora_bs, *biases_l)
        needs = (need_x, *[need_w[i] and absmax[i] is None for i in range(n)], *need_a, *need_b,
                 *[need_bias[i] and biases_l[i] is not None for i in range(n)])
        result = reference_vjp(forward, primals, needs, grads)
        result = [r.to(p.dtype).contiguous() if r is not None else None for r, p in zip(result, primals)]
    else:
        infos = _quant_infos(weights, *quant)
        bias_meta = [(need_bias[i] and b is not None, None if b is None else b.dtype) for i, b in enumerate(biases)]
        dx, d_w, d_a, d_b, d_bias = _lora_backward(list(grads), x2, xa, weights, lora_as, lora_bs, infos,
                                                   list(scalings), list(strategies), need_x, need_w, need_a,
                                                   need_b, bias_meta)
        result = [dx, *d_w, *d_a, *d_b, *d_bias]
    return [r if r is not None else nothing(x2) for r in result]


def _lora_backward_fake(grads, x2, xa, weights, lora_as, lora_bs, scalings, biases, has_bias, absmax, code, absmax2, code2,
                        offset, blocksize, blocksize2, shapes, quant_types, strategies, need_x, need_w, need_a,
                        need_b, need_bias):
    return lora_grad_fakes(x2, weights, lora_as, lora_bs, biases, has_bias, absmax, need_x, need_w, need_a, need_b,
                           need_bias)


def lora_grad_fakes(x2, weights, lora_as, lora_bs, biases, has_bias, absmax, need_x, need_w, need_a, need_b,
                    need_bias) -> list:
    """[dx, dW_0.., dA_0.., dB_0.., dbias_0..] of a LoRA backward operator under fake tensors (an empty
    placeholder where not needed; a 4-bit weight gets none)."""
    n = len(weights)
    out = [x2.new_empty(x2.shape) if need_x else nothing(x2)]
    out += [weights[i].new_empty(weights[i].shape) if need_w[i] and absmax[i] is None else nothing(x2)
            for i in range(n)]
    out += [a.new_empty(a.shape) if need_a[i] else nothing(x2) for i, a in enumerate(lora_as)]
    out += [b.new_empty(b.shape) if need_b[i] else nothing(x2) for i, b in enumerate(lora_bs)]
    out += [b.new_empty(b.shape) if need_bias[i] and has_bias[i] else nothing(x2) for i, b in enumerate(biases)]
    return out


def _lora_setup(ctx, inputs, output):
    x2, weights, lora_as, lora_bs = inputs[:4]
    ctx.n = len(weights)
    ctx.statics = inputs[4:]  # scalings, biases, has_bias, the quant-state lists, strategies
    ctx.mark_non_differentiable(output[-1])
    ctx.save_for_backward(x2, output[-1], *weights, *lora_as, *lora_bs)


def _lora_autograd_backward(ctx, grads):
    n = ctx.n
    x2, xa, *params = ctx.saved_tensors
    weights, lora_as, lora_bs = params[:n], params[n:2 * n], params[2 * n:]
    needs = ctx.needs_input_grad  # (x2, weights, lora_as, lora_bs, scalings, biases, ...): lists as one flag each
    grads = list(grads[:n])
    biases, has_bias = ctx.statics[1], ctx.statics[2]
    need_bias = [h and b.requires_grad for b, h in zip(biases, has_bias)]
    need_w = [w.requires_grad for w in weights]
    need_a = [a.requires_grad for a in lora_as]
    need_b = [b.requires_grad for b in lora_bs]
    flat = torch.ops.fastsft.lora_linear_backward(grads, x2, xa, list(weights), list(lora_as), list(lora_bs),
                                                  *ctx.statics, bool(needs[0]), need_w, need_a, need_b, need_bias)
    dx, d_w, d_a, d_b, d_bias = flat[0], flat[1:n + 1], flat[n + 1:2 * n + 1], flat[2 * n + 1:3 * n + 1], flat[3 * n + 1:]
    return (dx if needs[0] else None, picked(d_w, need_w), picked(d_a, need_a), picked(d_b, need_b), None,
            picked(d_bias, need_bias), *[no_grad_for(arg) for arg in ctx.statics[2:]])


def picked(grads, flags) -> list:
    """The backward operator's gradients where they were wanted, None elsewhere (its placeholders)."""
    return [g if f else None for g, f in zip(grads, flags)]


def no_grad_for(arg):
    """What autograd wants back for a non-differentiable argument: a list of None for a tensor list."""
    if isinstance(arg, list) and arg and all(isinstance(a, torch.Tensor) for a in arg):
        return [None] * len(arg)
    return None


_LIB.impl("lora_linear", _lora_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_linear_backward", _lora_backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::lora_linear", _lora_fake, lib=_LIB)
torch.library.register_fake(f"{NAMESPACE}::lora_linear_backward", _lora_backward_fake, lib=_LIB)
torch.library.register_autograd(f"{NAMESPACE}::lora_linear", _lora_autograd_backward, setup_context=_lora_setup,
                                lib=_LIB)


def _run(x, weights, lora_as, lora_bs, scalings, biases, quant_states, dequant_rows=None, dense_base=None):
    n = len(weights)
    for name, seq in (("lora_as", lora_as), ("lora_bs", lora_bs), ("scalings", scalings),
                      ("biases", biases), ("quant_states", quant_states)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries; expected one per weight ({n})")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (..., in), got shape {tuple(x.shape)}")
    states = [_state_args(w, q) for w, q in zip(weights, quant_states)]
    ws = [_checked_weight(w, q, st) for w, q, st in zip(weights, quant_states, states)]
    for i, w in enumerate(ws):
        _check_lora(x, w, lora_as[i], lora_bs[i], biases[i], name="" if n == 1 else f"[{i}]")
    for i, s in enumerate(scalings):
        if not isinstance(s, (int, float)) or s != s:
            raise ValueError(f"scaling must be a finite Python number, got {s!r}")
    rows_threshold = resolve_dequant_rows(dequant_rows)
    base = resolve_dense_base(dense_base)
    lead = x.shape[:-1]
    x2 = _as_2d(x)
    strategies = [pick_strategy(x2.shape[0], q is not None, dequant_rows=rows_threshold, dense_base=base)
                  for q in quant_states]
    quant = [list(column) for column in zip(*states)]
    has_bias = [b is not None for b in biases]
    bias_args = [b if b is not None else nothing(x2) for b in biases]
    outs = torch.ops.fastsft.lora_linear(x2, list(weights), list(lora_as), list(lora_bs), [float(s) for s in scalings],
                                         bias_args, has_bias, *quant, strategies)[:n]
    return [y.reshape(*lead, y.shape[-1]) for y in outs]


class _Shape:
    """What _check_lora reads of a weight: its (out, in) shape, 4-bit or not, the dense tensor."""

    def __init__(self, weight, shape, is_4bit):
        self.weight, self.shape, self.is_4bit = weight, tuple(shape), is_4bit


def _checked_weight(weight: torch.Tensor, quant_state, state: tuple) -> _Shape:
    """Validate a weight's metadata on the host (no device value read; the operator validates the rest)."""
    if quant_state is None:
        _dense_or_4bit(weight, None)
        return _Shape(weight, weight.shape, False)
    shape, qtype, blocksize = state[7], state[8], state[5]
    if qtype not in ("nf4", "fp4"):
        raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {qtype!r}")
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"quant_state.blocksize must be an even number >= 2, got {blocksize}")
    numel = shape[0] * shape[1]
    if weight.numel() * weight.element_size() != (numel + 1) // 2:
        raise ValueError(f"packed 4-bit weight has {weight.numel() * weight.element_size()} bytes; "
                         f"quant_state.shape {tuple(shape)} needs {(numel + 1) // 2}")
    return _Shape(weight, shape, True)


# --------------------------------------------------------------------------- public API
def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, *, bias: Optional[torch.Tensor] = None, quant_state=None,
                dequant_rows: Optional[int] = None, dense_base: Optional[str] = None) -> torch.Tensor:
    """y = x W^T + scaling * (x A^T) B^T (+ bias); W dense or bitsandbytes 4-bit (quant_state).

    dequant_rows: from this many rows (x's leading dims flattened) on, a 4-bit W is
    dequantized once into a shared workspace and multiplied by cuBLAS; below it the
    Triton kernel dequantizes in registers (default 1024, env FASTSFT_LORA_DEQUANT_ROWS).
    dense_base: "cublas" (default, env FASTSFT_LORA_DENSE_BASE) or "triton" for a dense W.
    """
    return _run(x, [weight], [lora_a], [lora_b], [scaling], [bias], [quant_state],
                dequant_rows=dequant_rows, dense_base=dense_base)[0]


def lora_linear_fused(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                      lora_bs: Sequence[torch.Tensor], scalings: Sequence[float], *,
                      biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      quant_states: Optional[Sequence] = None, dequant_rows: Optional[int] = None,
                      dense_base: Optional[str] = None) -> list:
    """Several LoRA projections of one x (q/k/v, gate/up): [lora_linear(x, W_i, A_i, B_i, s_i, ...)].

    x is read once for all x A_i^T and once for all dA_i, and dx accumulates every
    projection's g_i W_i + s_i (g_i B_i) A_i into one buffer.
    """
    n = len(weights)
    if n == 0:
        raise ValueError("weights is empty; lora_linear_fused needs at least one projection")
    biases = list(biases) if biases is not None else [None] * n
    quant_states = list(quant_states) if quant_states is not None else [None] * n
    return _run(x, list(weights), list(lora_as), list(lora_bs), list(scalings), biases, quant_states,
                dequant_rows=dequant_rows, dense_base=dense_base)


_LIB.define("dequantize_4bit(Tensor packed, Tensor absmax, Tensor? code, Tensor? absmax2, Tensor? code2, Tensor? offset, "
            "int blocksize, int blocksize2, int[] shape, str quant_type, ScalarType dtype) -> Tensor")


def _dequantize_impl(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, quant_type, dtype):
    state = _State(absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, quant_type, dtype)
    if not use_triton(packed):
        return reference.dequantize_4bit(packed, state, dtype=dtype).contiguous()
    from .quant import dequantize_4bit as triton_dequantize_4bit

    info = _quant_infos([packed], [absmax], [code], [absmax2], [code2], [offset], [blocksize], [blocksize2],
                        [shape], [quant_type], dtype)[0]
    return triton_dequantize_4bit(info.packed, state, dtype=dtype)


def _dequantize_fake(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, quant_type, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


_LIB.impl("dequantize_4bit", _dequantize_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::dequantize_4bit", _dequantize_fake, lib=_LIB)


def dequantize_4bit(packed: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense (out, in) W from bitsandbytes 4-bit data (operator ``fastsft.dequantize_4bit``; Triton,
    CPU -> reference unless FASTSFT_TRITON_ON_CPU=1). dtype defaults to quant_state.dtype."""
    if quant_state is None:
        raise ValueError("dequantize_4bit needs the weight's quant_state")
    state = _state_args(packed, quant_state)
    _checked_weight(packed, quant_state, state)
    dtype = dtype or quant_state.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    return torch.ops.fastsft.dequantize_4bit(packed, *state, dtype)


__all__ = ["lora_linear", "lora_linear_fused", "dequantize_4bit", "pick_strategy", "matmul_configs",
           "launch_variants", "resolve_dequant_rows", "resolve_dense_base", "workspace_bytes", "MAX_RANK",
           "FLOAT_DTYPES"]
