"""The compile tier's table: every Triton kernel with the configs its launcher picks at the
DESIGN.md target shapes (hidden 4096, intermediate 14336, vocab 128256 / 151936, 32 / 8
heads, head_dim 64 / 128 / 256, 16k packed tokens, LoRA rank 16, NF4 blocksize 64 with
double quantization), for every supported dtype.

One function per kernel module, each yielding ``aot.Spec``s. Configs are read from the
launcher's own choice (its config function or its autotune list), never copied here, so a
retuned launcher is compiled as it is. ``ci=True`` marks the representative config per
kernel x dtype that the default run compiles; FASTSFT_COMPILE_FULL=1 compiles them all.

A spill budget or a shared-memory exemption must carry its reason (the issue that
removes it, or why the launcher never picks that config on that arch).
"""
from __future__ import annotations

import importlib
import re
from typing import Iterator

import torch
import triton
import triton.language as tl

try:  # imported by path from benchmarks/compile_report.py, as a module by the tests
    from . import aot
except ImportError:  # pragma: no cover - loaded as a plain file
    import aot  # type: ignore

Spec = aot.Spec
TRITON = tuple(int(p) for p in triton.__version__.split(".")[:2])  # the launchers pick some tiles by it

TOKENS = 16384
HIDDEN = 4096
INTERMEDIATE = 14336
VOCABS = (128256, 151936)
HEADS, KV_HEADS = 32, 8
HEAD_DIMS = (64, 128, 256)
RANK = 16
NF4_BLOCK = 64
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _module(name: str):
    # import_module: the package re-exports functions under some module names (rope, swiglu, ...)
    return importlib.import_module(f"fastsft_kernels.{name}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------ attention
def _attention_budget(name: str, head_dim: int, dot16: bool, arch: int, variant: bool):
    """(spill budget per arch, reason, whether the spills must stay outside every inner loop)
    for one attention tile; the launcher's tile table (with its Triton 3.6 replacements) is
    in fastsft_kernels.attention."""
    v36 = TRITON < (3, 7)
    if variant and name == "fwd":
        # the Gemma-2 variant's sigmoid-tanh and window masks add live registers to the
        # 183-register d128 tile (full sweep: 16 B sm_90, 80 B sm_80 on 3.9; 36 B sm_90 on 3.6
        # and 3.7, none of it in a loop on 3.6); retune on the GPU
        older = TRITON < (3, 8)
        return {90: 40 if older else 16, 80: 80}, "softcap + window registers on the d128 forward tile", older
    if name == "dkdv" and head_dim == 64 and not dot16 and arch == 80 and TRITON >= (3, 9):
        # fp32 inputs (not the training path): 4 B on sm_80; the 16 x 16 tile spills 20 B on sm_90
        return {80: 8}, "fp32 d64 dK/dV FMA tile on sm_80", False
    if name == "dkdv" and head_dim == 256 and dot16 and arch == 90:
        # dK and dV (64 x 256 fp32 each) plus K and V as register operands exceed 255
        # registers on any wgmma tiling found (tests/compile sweep: >= 264 bytes for
        # 64 key rows, >= 1300 for 128); the least-spilling wgmma tile is kept
        return {90: 320}, "d256 dK/dV accumulators + K/V operands exceed 255 registers", False
    if dot16 and head_dim == 256 and arch == 90 and (name == "fwd" and v36 or name == "dq" and TRITON < (3, 9)):
        # Triton 3.6 spills 4 B of the forward tile, 3.6-3.8 8 B of the two-stage dq tile, before or
        # after the key loop; the spill-free alternatives (16-key blocks) take 40-65% more SASS per key
        return {90: 8}, "Triton < 3.9: a few bytes outside the key loop of the d256 tile", True
    if dot16 and head_dim == 64 and name == "dkdv" and arch == 90 and TRITON == (3, 7):
        # Triton 3.7 spills 4 B of the 64 x 128 tile, outside the query loop; the 32-row block that
        # 3.6 takes would cost 20% more SASS per query row on 3.7 (326 / 32 against 539 / 64)
        return {90: 4}, "Triton 3.7: 4 B outside the query loop of the d64 dK/dV tile", True
    if v36 and dot16 and head_dim == 64 and name == "dkdv" and arch == 80:
        # Triton 3.6 spills 60 B of the 32 x 128 tile, outside the query loop; the spill-free
        # choices drop the pipelining (one stage) or halve the query block
        return {80: 64}, "Triton 3.6: d64 dK/dV on sm_80 spills outside the query loop", True
    return {}, "", False


def attention_specs() -> Iterator[Spec]:
    A = _module("attention")
    from fastsft_kernels._triton_utils import next_power_of_2

    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            # CI: bf16 (the training dtype) at every head_dim on sm_90 and d128 on sm_80; fp32 d128
            ci = {90: dtype == torch.bfloat16 or (dtype == torch.float32 and head_dim == 128),
                  80: dtype != torch.float16 and head_dim == 128}
            yield from _attention_variant(A, next_power_of_2, dtype, head_dim, ci, causal=True, window=False,
                                          softcap=False)
        if dtype == torch.bfloat16:  # Gemma-2 style variants, full sweep only
            yield from _attention_variant(A, next_power_of_2, dtype, 128, {90: False, 80: False}, causal=True,
                                          window=True,
                                          softcap=True)


def _attention_variant(A, next_power_of_2, dtype, head_dim, ci, *, causal, window, softcap):
    p = _PTR[dtype]
    dot16 = dtype != torch.float32
    block_d = max(16, next_power_of_2(head_dim))
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_WINDOW=window, HAS_SOFTCAP=softcap,
                 DOT_PRECISION=A._dot_precision(dtype), WIDE=False)
    variant = "" if not (window or softcap) else " window+softcap"
    q_strides = dict(stride_qt=HEADS * head_dim, stride_qh=head_dim)
    kv_strides = dict(stride_kt=KV_HEADS * head_dim, stride_kh=head_dim, stride_vt=KV_HEADS * head_dim,
                      stride_vh=head_dim)
    scalars = dict(n_items=1021, total_tokens=TOKENS, sm_scale=head_dim ** -0.5, softcap=30.0,
                   window=4096 if window else 0)
    tensors = dict(Q=p, K=p, V=p, O=p, DO=p, DQ=p, DK=p, DV=p, LSE="*fp32", DELTA="*fp32", CU="*i32",
                   ITEMS="*i32")
    for arch in aot.ARCHS:  # the launcher picks its tiles per arch
        cfg = A._configs(head_dim, dtype, arch)
        for name, fn in (("fwd", A._fwd_kernel), ("dkdv", A._bwd_dkdv_kernel), ("dq", A._bwd_dq_kernel)):
            block_m, block_n, warps, stages = cfg[name]
            args = dict(tensors, **q_strides, **kv_strides, **scalars,
                        stride_ot=HEADS * head_dim, stride_oh=head_dim, stride_dot=HEADS * head_dim,
                        stride_doh=head_dim, stride_dqt=HEADS * head_dim, stride_dqh=head_dim,
                        stride_dkt=KV_HEADS * head_dim, stride_dkh=head_dim)
            budget, reason, loop_free = _attention_budget(name, head_dim, dot16, arch, bool(variant))
            yield Spec(kernel=f"attention.{fn.__name__}",
                       config=f"d{head_dim} M{block_m} N{block_n} w{warps} s{stages}" + variant,
                       dtype=_name(dtype), fn=fn, args=args,
                       constexprs=dict(flags, GROUP=HEADS // KV_HEADS, BLOCK_M=block_m, BLOCK_N=block_n),
                       num_warps=warps, num_stages=stages, ci=ci[arch], dot16=dot16, archs=(arch,),
                       spill_budget=budget, budget_reason=reason, loop_free_spills=loop_free)
    if not variant:
        block_t = 64
        yield Spec(kernel="attention._bwd_preprocess_kernel", config=f"d{head_dim} T{block_t}", dtype=_name(dtype),
                   fn=A._bwd_preprocess_kernel,
                   args=dict(O=p, DO=p, DELTA="*fp32", total_tokens=TOKENS, stride_t=HEADS * head_dim,
                             stride_h=head_dim),
                   constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, WIDE=False),
                   num_warps=A._preprocess_warps(block_t, block_d), num_stages=3, ci=ci[80])


# ------------------------------------------------------------------------------ cross-entropy
def cross_entropy_specs() -> Iterator[Spec]:
    CE = _module("cross_entropy")

    for dtype in DTYPES:
        p = _PTR[dtype]
        for vocab in VOCABS:
            block, warps = CE._row_block(vocab)
            ci = vocab == VOCABS[0] and dtype != torch.float16
            # forward (loss + row stats, gradient fused when the logits need it) and backward (stats given);
            # the GPU path computes the softcap's tanh with libdevice
            for label, loss, stats_given, grad, softcap in (("fwd+grad", True, False, True, False),
                                                            ("bwd", False, True, True, False),
                                                            ("fwd", True, False, False, False),
                                                            ("fwd+grad softcap", True, False, True, True)):
                yield Spec(kernel="cross_entropy._ce_rows_kernel", config=f"V{vocab} {label} B{block} w{warps}",
                           dtype=_name(dtype), fn=CE._ce_rows_kernel,
                           args=dict(logits_ptr=p, logits_row_stride=vocab, labels_ptr="*i64", loss_ptr="*fp32",
                                     stats_ptr="*fp32", grad_ptr=p, grad_row_stride=vocab, scale_ptr="*fp32",
                                     scale_stride=0, n_cols=vocab, ignore_index=-100, label_smoothing=0.0,
                                     z_loss=0.0, softcap=30.0),
                           constexprs=dict(HAS_SOFTCAP=softcap, WRITE_LOSS=loss, STATS_GIVEN=stats_given,
                                           WRITE_GRAD=grad, LIBDEVICE=True, BLOCK=block),
                           num_warps=warps, num_stages=3, ci=ci and label == "fwd+grad")
        yield Spec(kernel="cross_entropy._scale_inplace_kernel", config="B4096 w8", dtype=_name(dtype),
                   fn=CE._scale_inplace_kernel, args=dict(x_ptr=p, scale_ptr="*fp32", n=TOKENS * HIDDEN),
                   constexprs=dict(BLOCK=4096), num_warps=8, num_stages=3, ci=dtype != torch.float16)
    yield Spec(kernel="cross_entropy._count_trained_kernel", config="B1024 w4", dtype="int64",
               fn=CE._count_trained_kernel,
               args=dict(labels_ptr="*i64", n_rows=TOKENS, ignore_index=-100, count_ptr="*i32"),
               constexprs=dict(BLOCK=1024), num_warps=4, num_stages=3)


# ------------------------------------------------------------------------------ LoRA / NF4
# The lora launcher prunes its tiles per arch on the host (shared memory estimated from the
# tile) and lists what it can launch itself; the tier compiles exactly that list and also
# checks that the compiled shared memory stays within the launcher's estimate.
_DTYPE_IN_NAME = re.compile(r"_(bf16|fp16|fp32)(?:_|$)")
_FULL_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# CI: per arch, the first tile of these lora/quant variants (the training dtype, both bases and
# directions, the exact-fp32 tile, and the fixed-config kernels); every other tile with --full
_LORA_CI = ("lora_matmul_fwd_4bit_bf16_r16", "lora_matmul_fwd_dense_bf16_r16", "lora_matmul_fwd_dense_fp32_r16",
            "lora_matmul_bwd_dx_4bit_bf16_r16_acc", "lora_matmul_bwd_dx_dense_bf16_r16",
            "rank_project_bf16_pbf16_r16", "rank_reduce_bf16_r16", "dequantize_4bit_bf16_paired",
            "decode_nested_absmax", "rank_project_fp32_pfp32_r16", "rank_reduce_fp32_r16",
            "dequantize_4bit_fp32_paired")


def _lora_family_specs(module_name: str) -> Iterator[Spec]:
    """The launcher's own list (fastsft_kernels.lora.launch_variants): every tile its host-side prune
    keeps on each arch, with the signature and constexprs it launches with."""
    L = _module("lora")
    for arch in aot.ARCHS:
        seen = set()
        for entry in L.launch_variants(arch, dtypes=("bf16", "fp16"), ranks=(RANK,), blocksize=NF4_BLOCK):
            fn = entry["fn"]
            if fn.fn.__module__.rsplit(".", 1)[-1] != module_name:
                continue
            group = re.sub(r"_BM\d+.*$", "", entry["name"])
            match = _DTYPE_IN_NAME.search(entry["name"])
            dtype = match.group(1) if match else "uint8"
            dot16 = dtype in ("bf16", "fp16") and fn.__name__ != "_dequantize_4bit_kernel"
            budget, reason = {}, ""
            if arch == 80 and dot16 and fn.__name__ == "_lora_matmul_kernel":
                # full sweep: the 128x256 / 256x128 (and w4 128x128 accumulating) 16-bit tiles spill 8-44 B on
                # Ampere, whose mma.sync keeps the whole accumulator in registers; the autotuner takes them only
                # where they time faster, every sm_90 tile is spill-free
                budget, reason = {80: 48}, "large 16-bit tiles on sm_80 (mma.sync accumulators in registers)"
            yield Spec(kernel=f"{module_name}.{fn.__name__}", config=entry["name"], dtype=_FULL_NAMES.get(dtype, dtype),
                       fn=fn, args={}, constexprs=entry["constexprs"], num_warps=entry["options"]["num_warps"],
                       num_stages=entry["options"]["num_stages"], ci=group in _LORA_CI and group not in seen,
                       dot16=dot16, archs=(arch,), spill_budget=budget, budget_reason=reason,
                       prebuilt=(entry["signature"], entry["constexprs"], entry["attrs"]),
                       smem_limit_hint=entry.get("smem_estimate"))
            seen.add(group)


def lora_specs() -> Iterator[Spec]:
    yield from _lora_family_specs("lora")


def quant_specs() -> Iterator[Spec]:
    yield from _lora_family_specs("quant")


# ------------------------------------------------------------------------------ norm / rope / swiglu
def norm_specs() -> Iterator[Spec]:
    N = _module("norm")

    block_r, block_n, warps = N._tile(HIDDEN)
    for dtype in DTYPES:
        p = _PTR[dtype]
        ci = dtype != torch.float16
        yield Spec(kernel="norm._rms_norm_fwd_kernel", config=f"R{block_r} N{block_n} w{warps}", dtype=_name(dtype),
                   fn=N._rms_norm_fwd_kernel,
                   args=dict(x_ptr=p, w_ptr=p, y_ptr=p, rstd_ptr="*fp32", n_rows=TOKENS, n_cols=HIDDEN,
                             x_row_stride=HIDDEN, y_row_stride=HIDDEN, eps=1e-6, offset=0.0),
                   constexprs=dict(LLAMA_CAST=True, BLOCK_R=block_r, BLOCK_N=block_n), num_warps=warps,
                   num_stages=3, ci=ci)
        yield Spec(kernel="norm._rms_norm_bwd_kernel", config=f"R{block_r} N{block_n} w{warps}", dtype=_name(dtype),
                   fn=N._rms_norm_bwd_kernel,
                   args=dict(dy_ptr=p, x_ptr=p, w_ptr=p, rstd_ptr="*fp32", dx_ptr=p, dw_partial_ptr="*fp32",
                             n_rows=TOKENS, n_cols=HIDDEN, dy_row_stride=HIDDEN, x_row_stride=HIDDEN,
                             dx_row_stride=HIDDEN, rows_per_program=32, offset=0.0),
                   constexprs=dict(LLAMA_CAST=True, BLOCK_R=block_r, BLOCK_N=block_n), num_warps=warps,
                   num_stages=3, ci=ci)


def rope_specs() -> Iterator[Spec]:
    R = _module("rope")
    from fastsft_kernels._triton_utils import next_power_of_2

    for dtype in DTYPES:
        p = _PTR[dtype]
        for head_dim in HEAD_DIMS:
            half = head_dim // 2
            block_hq, block_hk = next_power_of_2(HEADS), next_power_of_2(KV_HEADS)
            per_token = max(block_hq, block_hk) * next_power_of_2(half)
            block_t = max(1, min(TOKENS, R.TILE_ELEMENTS_GPU // per_token))
            warps = 4 if block_t * per_token <= 2048 else 8
            # model layout (batch 1, heads, seq, head_dim) transposed from (batch, seq, heads, head_dim)
            q = dict(q_sb=TOKENS * HEADS * head_dim, q_sh=head_dim, q_ss=HEADS * head_dim)
            k = dict(k_sb=TOKENS * KV_HEADS * head_dim, k_sh=head_dim, k_ss=KV_HEADS * head_dim)
            qo = {"qo" + key[1:]: v for key, v in q.items()}
            ko = {"ko" + key[1:]: v for key, v in k.items()}
            for backward in (False, True):
                yield Spec(kernel="rope._rope_kernel", config=f"d{head_dim} {'bwd' if backward else 'fwd'} "
                           f"T{block_t} w{warps}", dtype=_name(dtype), fn=R._rope_kernel,
                           args=dict(q_ptr=p, k_ptr=p, qo_ptr=p, ko_ptr=p, cos_ptr=p, sin_ptr=p, n_tokens=TOKENS,
                                     seq_len=TOKENS, n_q_heads=HEADS, n_k_heads=KV_HEADS, head_dim=head_dim,
                                     half=half, rot_dim=head_dim, **q, **k, **qo, **ko,
                                     cos_sb=TOKENS * head_dim, cos_ss=head_dim, sin_sb=TOKENS * head_dim,
                                     sin_ss=head_dim),
                           constexprs=dict(BACKWARD=backward, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
                                           BLOCK_HALF=next_power_of_2(half), BLOCK_PASS=0),
                           num_warps=warps, num_stages=3,
                           ci=head_dim == 128 and not backward and dtype != torch.float16)


def swiglu_specs() -> Iterator[Spec]:
    S = _module("swiglu")

    _, block_r, block_c = S._tile(TOKENS, INTERMEDIATE)
    warps = 4 if block_r * block_c <= 2048 else 8
    n = INTERMEDIATE
    for dtype in DTYPES:
        p = _PTR[dtype]
        ci = dtype != torch.float16
        yield Spec(kernel="swiglu._swiglu_fwd_kernel", config=f"R{block_r} C{block_c} w{warps}", dtype=_name(dtype),
                   fn=S._swiglu_fwd_kernel,
                   args=dict(gate_ptr=p, up_ptr=p, h_ptr=p, n_rows=TOKENS, n_cols=n, gate_row_stride=2 * n,
                             up_row_stride=2 * n, h_row_stride=n),
                   constexprs=dict(BLOCK_R=block_r, BLOCK_C=block_c), num_warps=warps, num_stages=3, ci=ci)
        yield Spec(kernel="swiglu._swiglu_bwd_kernel", config=f"R{block_r} C{block_c} w{warps}", dtype=_name(dtype),
                   fn=S._swiglu_bwd_kernel,
                   args=dict(dh_ptr=p, gate_ptr=p, up_ptr=p, dgate_ptr=p, dup_ptr=p, n_rows=TOKENS, n_cols=n,
                             dh_row_stride=n, gate_row_stride=2 * n, up_row_stride=2 * n, dgate_row_stride=2 * n,
                             dup_row_stride=2 * n),
                   constexprs=dict(BLOCK_R=block_r, BLOCK_C=block_c), num_warps=warps, num_stages=3, ci=ci)


def tile_notes() -> list:
    """What the launchers pick differently on the running Triton version, and why."""
    return _module("attention").tile_notes() + _module("lora").tile_notes()


SPEC_TABLE = (attention_specs, cross_entropy_specs, lora_specs, quant_specs, norm_specs, rope_specs, swiglu_specs)


def all_specs(full: bool = False):
    """The specs of the default (CI) run, or every spec with ``full``."""
    return [s for make in SPEC_TABLE for s in make() if full or s.ci]
