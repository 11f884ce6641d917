"""lora_linear benchmark: `python -m benchmarks.kernels --op lora` (alias of lora_linear).

Grid: 4096 -> 4096, 4096 -> 14336 and 14336 -> 4096 at rank 16, M in {256, 1024, 4096,
16384} rows, bf16 activations, on a bf16 base and on an NF4 base (bitsandbytes,
blocksize 64, double-quantized absmax, as QLoRA uses it); plus the shared-x groups
"qkv" (4096 -> 4096 / 1024 / 1024, Llama-3-8B GQA) and "gate_up" (4096 -> 14336 x 2).

Providers (the base weight frozen, the adapter trainable, x requires grad):
- fastsft: fastsft_kernels.lora_linear as shipped, i.e. the dispatcher's pick at this M
  (recorded as "pick" in each record and in config["dispatch"]);
- fastsft_triton: forced Triton GEMM with the LoRA epilogue (4-bit W dequantized in registers);
- fastsft_cublas: forced cuBLAS base (a 4-bit W dequantized into the shared workspace first);
- peft: peft's LoRA layer (on NF4, its bitsandbytes Linear4bit: peft + bitsandbytes) -- the baseline;
- dequant_matmul (NF4 only): the Unsloth approach written here: bitsandbytes' CUDA dequantize,
  then torch matmuls, dequantizing again in backward;
- cublas_base: the bare bf16 base products (forward x W^T, backward g W), the limit;
- fastsft_fused / fastsft_single (groups): one lora_linear_fused call vs one call per projection.
Modes: fwd (grad enabled), bwd (backward alone, graph retained), full. TFLOP/s of the
nominal work: fwd 2MNK + 2Mr(K+N); bwd 2MNK + 4Mr(K+N); the base product alone for cublas_base.

DoRA rows (issue 24; cases "dora_*" on the bf16 base, "qdora_*" on NF4: 4096 -> 14336 and
the q/k/v group): fastsft = lora_linear_ex(_fused) with the magnitude, fastsft_lora = the
same adapters as plain LoRA through lora_linear(_fused) (the target: DoRA <= 1.15x LoRA),
peft = peft's DoRA layer (use_dora=True), cublas_base. Each record carries
"time_vs_fastsft_lora".
"""
from __future__ import annotations

import os
import time
from typing import List

import torch

from .. import common

SHAPES = {"4096x4096": (4096, 4096), "4096x14336": (4096, 14336), "14336x4096": (14336, 4096)}
ROWS = (256, 1024, 4096, 16384)
GROUPS = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336))}
GROUP_ROWS = (1024, 16384)
RANK = 16
ALPHA_OVER_R = 2.0
DEVICE = "cuda"
FORCE = {"fastsft_triton": dict(dequant_rows=2**62, dense_base="triton"),
         "fastsft_cublas": dict(dequant_rows=0, dense_base="cublas")}


def _peft_layer(out_f: int, in_f: int, rank: int, base_kind: str, device, dtype, gen, use_dora: bool = False):
    """(peft LoRA layer, its dense base W in ``dtype``); init_lora_weights=False keeps the LoRA term live."""
    from peft import LoraConfig

    w = (torch.randn(out_f, in_f, device=device, generator=gen) * in_f ** -0.5).to(dtype)
    config = LoraConfig(r=rank, lora_alpha=ALPHA_OVER_R * rank, lora_dropout=0.0, init_lora_weights=False,
                        use_dora=use_dora)
    if base_kind == "nf4":
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit

        base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", blocksize=64,
                                        compress_statistics=True)
        base = base.to(device)
        layer = Linear4bit(base, "default", config, r=rank, lora_alpha=ALPHA_OVER_R * rank)
    else:
        from peft.tuners.lora.layer import Linear

        base = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        base.weight.data.copy_(w)
        base.weight.requires_grad_(False)
        layer = Linear(base, "default", config, r=rank, lora_alpha=ALPHA_OVER_R * rank)
    layer.to(device)
    layer.train()
    return layer, w


def _kernel_args(layer):
    """(weight, lora_a, lora_b, scaling, quant_state) of a peft layer, for fastsft."""
    base = layer.get_base_layer()
    qs = getattr(base.weight, "quant_state", None)
    weight = base.weight.data if qs is not None else base.weight
    return weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, float(layer.scaling["default"]), qs


class _DequantMatmul(torch.autograd.Function):
    """Unsloth-style: dequantize W (bitsandbytes), cuBLAS products, dequantize again in backward."""

    @staticmethod
    def forward(ctx, x, packed, qs, a, b, s):
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(packed, qs).to(x.dtype)
        a16, b16 = a.to(x.dtype), b.to(x.dtype)
        xa = x @ a16.t()
        y = torch.addmm(x @ w.t(), xa, b16.t(), alpha=s) if x.dim() == 2 else x @ w.t() + s * (xa @ b16.t())
        ctx.save_for_backward(x, xa, packed, a16, b16)
        ctx.qs, ctx.s, ctx.dtypes = qs, s, (a.dtype, b.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        import bitsandbytes.functional as bnbf

        x, xa, packed, a16, b16 = ctx.saved_tensors
        s = ctx.s
        w = bnbf.dequantize_4bit(packed, ctx.qs).to(g.dtype)
        gb = (g @ b16) * s
        dx = torch.addmm(g @ w, gb, a16)
        da = (gb.t() @ x).to(ctx.dtypes[0])
        db = (s * (g.t() @ xa)).to(ctx.dtypes[1])
        return dx, None, None, da, db, None


def _providers(layers, dense_ws, base_kind: str, group: bool):
    import fastsft_kernels as fk
    from fastsft_kernels.lora import lora_linear_fused

    args = [_kernel_args(layer) for layer in layers]

    def fastsft_with(**force):
        if group:
            return lambda x: lora_linear_fused(x, [a[0] for a in args], [a[1] for a in args], [a[2] for a in args],
                                               [a[3] for a in args], quant_states=[a[4] for a in args], **force)
        return lambda x: [fk.lora_linear(x, w, a, b, s, quant_state=q, **force) for w, a, b, s, q in args]

    def peft(x):
        return [layer(x) for layer in layers]

    def single(x):
        return [fk.lora_linear(x, w, a, b, s, quant_state=q) for w, a, b, s, q in args]

    def cublas_base(x):
        return [torch.nn.functional.linear(x, w) for w in dense_ws]

    def dequant_matmul(x):
        return [_DequantMatmul.apply(x, w, q, a, b, s) for w, a, b, s, q in args]

    providers = {"fastsft": fastsft_with()}
    if group:
        providers["fastsft_fused"] = providers.pop("fastsft")
        providers["fastsft_single"] = single
    else:
        providers.update({name: fastsft_with(**force) for name, force in FORCE.items()})
    providers["peft"] = peft
    if base_kind == "nf4":
        providers["dequant_matmul"] = dequant_matmul
    providers["cublas_base"] = cublas_base
    return providers


def _dora_providers(layers, dense_ws):
    """DoRA rows: fastsft's lora_linear_ex(_fused) with the magnitude, the same adapters as plain
    LoRA in fastsft, peft's DoRA layers, and the bare base products."""
    import fastsft_kernels as fk

    args = [_kernel_args(layer) for layer in layers]
    mags = [layer.lora_magnitude_vector["default"].weight for layer in layers]
    cols = [[a[i] for a in args] for i in range(5)]

    def fastsft(x):
        return fk.lora_linear_ex_fused(x, cols[0], cols[1], cols[2], cols[3], quant_states=cols[4], magnitudes=mags)

    def fastsft_lora(x):
        return fk.lora_linear_fused(x, cols[0], cols[1], cols[2], cols[3], quant_states=cols[4])

    return {"fastsft": fastsft, "fastsft_lora": fastsft_lora, "peft": lambda x: [layer(x) for layer in layers],
            "cublas_base": lambda x: [torch.nn.functional.linear(x, w) for w in dense_ws]}


def _dora_cases(quick):
    """(case, base kind, rows, in_features, out_features per projection) of the DoRA rows."""
    rows = (1024, 16384) if quick else ROWS
    k, n = SHAPES["4096x14336"]
    cases = []
    for base_kind, prefix in (("bf16", "dora"), ("nf4", "qdora")):
        cases += [(f"{prefix}_4096x14336_r{RANK}_M{m}", base_kind, m, k, (n,)) for m in rows]
        k_g, outs = GROUPS["qkv"]
        cases += [(f"{prefix}_qkv_r{RANK}_M{m}", base_kind, m, k_g, outs) for m in GROUP_ROWS[-1:]]
    return cases


def _run_dora(args, device, dtype) -> List[common.Result]:
    results = []
    for case, base_kind, m, k, outs in _dora_cases(args.quick):
        gen = torch.Generator(device=device).manual_seed(0)
        built = [_peft_layer(n, k, RANK, base_kind, device, dtype, gen, use_dora=True) for n in outs]
        layers, dense_ws = [b[0] for b in built], [b[1] for b in built]
        xs = [torch.randn(m, k, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(2)]
        grads = [[torch.randn(m, n, device=device, dtype=dtype, generator=gen) for n in outs] for _ in range(2)]
        for provider, fn in _dora_providers(layers, dense_ws).items():
            if _selected(args, provider):
                work = _work(m, k, outs, RANK, lora=provider != "cublas_base")
                results.extend(_measure(case, provider, fn, xs, grads, _params(layers), work, args.quick, {}))
        del layers, dense_ws, built, xs, grads
        torch.cuda.empty_cache()
    lora = {(r.case, r.mode): r.ms for r in results if r.provider == "fastsft_lora" and r.ms}
    for r in results:
        if lora.get((r.case, r.mode)) and r.ms:
            r.extra["time_vs_fastsft_lora"] = r.ms / lora[(r.case, r.mode)]
    return results


def _params(layers):
    return [p for layer in layers for p in layer.parameters() if p.requires_grad]


def _measure(case, provider, fn, xs, grads, params, work, quick, extra) -> List[common.Result]:
    warmup, rep = (3, 10) if quick else (10, 50)
    n = len(xs)

    def clear(i):
        xs[i].grad = None
        for p in params:
            p.grad = None

    def forward(i):
        clear(i)
        return fn(xs[i])

    def full(i):
        torch.autograd.backward(forward(i), grads[i])

    try:
        full(0)  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        graphs = [forward(i) for i in range(n)]

        def backward(i):
            clear(i)
            torch.autograd.backward(graphs[i], grads[i], retain_graph=True)

        ms = {"fwd": common.bench_ms(forward, n_inputs=n, warmup=warmup, rep=rep),
              "bwd": common.bench_ms(backward, n_inputs=n, warmup=warmup, rep=rep),
              "full": common.bench_ms(full, n_inputs=n, warmup=warmup, rep=rep)}
        graphs.clear()  # free the retained graphs before measuring memory
        clear(0)
        peak = common.peak_memory_mb(lambda: full(0))
    except Exception as exc:  # one provider failing must not hide the others
        torch.cuda.empty_cache()
        return [common.Result(case=case, provider=provider, mode="full", error=f"{type(exc).__name__}: {exc}"[:400])]
    out = []
    for mode in ("fwd", "bwd", "full"):
        out.append(common.Result(case=case, provider=provider, mode=mode, ms=ms[mode],
                                 tflops=work[mode] / ms[mode] / 1e9, peak_mb=peak if mode == "full" else None,
                                 extra=dict(extra)))
    torch.cuda.empty_cache()
    return out


def _work(m, k, outs, rank, lora=True):
    r = rank if lora else 0
    fwd = sum(2 * m * n * k + 2 * m * r * (k + n) for n in outs)
    bwd = sum(2 * m * n * k + 4 * m * r * (k + n) for n in outs)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def _selected(args, name):
    return not getattr(args, "providers", None) or name in args.providers


def _cases(quick):
    """(case name, base kind, rows, in_features, out_features per projection, is a shared-x group)."""
    cases = []
    rows = (1024, 16384) if quick else ROWS
    shapes = {"4096x14336": SHAPES["4096x14336"]} if quick else SHAPES
    for base_kind in ("bf16", "nf4"):
        for shape_name, (k, n) in shapes.items():
            for m in rows:
                cases.append((f"{base_kind}_{shape_name}_r{RANK}_M{m}", base_kind, m, k, (n,), False))
        for group, (k, outs) in GROUPS.items():
            for m in (GROUP_ROWS[-1:] if quick else GROUP_ROWS):
                cases.append((f"{base_kind}_{group}_r{RANK}_M{m}", base_kind, m, k, outs, True))
    return cases


def _ratios_to_base(results: List[common.Result]) -> None:
    """Record each result's time over the bare cuBLAS base products of its case and mode (the limit)."""
    base = {(r.case, r.mode): r.ms for r in results if r.provider == "cublas_base" and r.ms}
    for r in results:
        b = base.get((r.case, r.mode))
        if b and r.ms:
            r.extra["time_vs_cublas_base"] = r.ms / b


def run(op, args):
    from fastsft_kernels.lora import pick_strategy, resolve_dequant_rows

    dtype, device = torch.bfloat16, DEVICE
    results, dispatch = [], {}
    for case, base_kind, m, k, outs, group in _cases(args.quick):
        gen = torch.Generator(device=device).manual_seed(0)
        built = [_peft_layer(n, k, RANK, base_kind, device, dtype, gen) for n in outs]
        layers, dense_ws = [b[0] for b in built], [b[1] for b in built]
        xs = [torch.randn(m, k, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(2)]
        grads = [[torch.randn(m, n, device=device, dtype=dtype, generator=gen) for n in outs] for _ in range(2)]
        pick = pick_strategy(m, base_kind == "nf4")
        dispatch[case] = pick
        for provider, fn in _providers(layers, dense_ws, base_kind, group).items():
            if not _selected(args, provider):
                continue
            work = _work(m, k, outs, RANK, lora=provider != "cublas_base")
            extra = {"pick": pick} if provider in ("fastsft", "fastsft_fused", "fastsft_single") else {}
            results.extend(_measure(case, provider, fn, xs, grads, _params(layers), work, args.quick, extra))
        del layers, dense_ws, built, xs, grads
        torch.cuda.empty_cache()
    results.extend(_run_dora(args, device, dtype))
    _ratios_to_base(results)
    config = {"op": op, "rank": RANK, "rows": ROWS, "shapes": {k: list(v) for k, v in SHAPES.items()},
              "groups": {g: [k, list(o)] for g, (k, o) in GROUPS.items()}, "group_rows": GROUP_ROWS,
              "lora_alpha": f"{ALPHA_OVER_R} * r", "dtype": "bfloat16",
              "nf4": "bitsandbytes NF4, blocksize 64, double-quantized absmax",
              "dequant_rows": resolve_dequant_rows(), "dispatch": dispatch,
              "modes": "fwd = forward with grad enabled; bwd = backward alone (graph retained); full = fwd + bwd",
              "rate": "TFLOP/s of fwd 2MNK+2Mr(K+N), bwd 2MNK+4Mr(K+N); cublas_base: the base products only",
              "dora": "dora_* (bf16 base) / qdora_* (NF4) cases: fastsft = lora_linear_ex with the magnitude, "
                      "fastsft_lora = the same adapters as plain LoRA, peft = peft's use_dora layer"}
    return config, results, "peft"


def smoke(op, args):
    """Tiny CPU case through every provider, dense and NF4, at a row count on each side of the
    dispatch threshold (set to 24 rows here), recording the dispatcher's pick."""
    from fastsft_kernels.lora import DEQUANT_ROWS_ENV, pick_strategy

    os.environ[DEQUANT_ROWS_ENV] = "24"
    results = []
    for base_kind in ("fp32", "nf4"):
        for rows in (9, 37):
            gen = torch.Generator().manual_seed(0)
            outs = (40, 24)
            built = [_peft_layer(n, 64, 8, base_kind, "cpu", torch.float32, gen) for n in outs]
            layers, dense_ws = [b[0] for b in built], [b[1] for b in built]
            pick = pick_strategy(rows, base_kind == "nf4")
            for group in ((False, True) if rows > 24 else (False,)):
                case = f"tiny_{base_kind}_M{rows}" + ("_group" if group else "")
                for provider, fn in _providers(layers, dense_ws, base_kind, group).items():
                    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
                    for p in _params(layers):
                        p.grad = None
                    extra = {"pick": pick} if provider in ("fastsft", "fastsft_fused", "fastsft_single") else {}
                    try:
                        start = time.perf_counter()
                        ys = fn(x)
                        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
                        ms = (time.perf_counter() - start) * 1e3
                        finite = all(torch.isfinite(y).all() for y in ys) and torch.isfinite(x.grad).all() and all(
                            p.grad is None or torch.isfinite(p.grad).all() for p in _params(layers))
                        if not finite:
                            results.append(common.Result(case=case, provider=provider, mode="full",
                                                         error="non-finite output"))
                            continue
                        extra["y_sum"] = float(sum(y.detach().double().sum() for y in ys))
                        results.append(common.Result(case=case, provider=provider, mode="full", ms=ms, extra=extra))
                    except Exception as exc:
                        results.append(common.Result(case=case, provider=provider, mode="full",
                                                     error=f"{type(exc).__name__}: {exc}"[:300]))
    results.extend(_smoke_dora())
    return results


def _smoke_dora() -> List[common.Result]:
    """Tiny CPU DoRA / QDoRA group through the DoRA providers; fastsft's outputs checked against peft's."""
    results = []
    for base_kind, prefix in (("fp32", "dora"), ("nf4", "qdora")):
        gen = torch.Generator().manual_seed(0)
        built = [_peft_layer(n, 64, 8, base_kind, "cpu", torch.float32, gen, use_dora=True) for n in (40, 24)]
        layers, dense_ws = [b[0] for b in built], [b[1] for b in built]
        x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
        expected = [layer(x).detach() for layer in layers]
        for provider, fn in _dora_providers(layers, dense_ws).items():
            case = f"tiny_{prefix}_M9_group"
            try:
                xg = x.clone().requires_grad_()
                start = time.perf_counter()
                ys = fn(xg)
                torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
                ms = (time.perf_counter() - start) * 1e3
                extra = {"y_sum": float(sum(y.detach().double().sum() for y in ys))}
                if provider == "fastsft":
                    extra["max_abs_diff_vs_peft"] = max(float((y - e).abs().max()) for y, e in zip(ys, expected))
                    if extra["max_abs_diff_vs_peft"] > 1e-4:
                        results.append(common.Result(case=case, provider=provider, mode="full",
                                                     error=f"differs from peft's DoRA by {extra}"))
                        continue
                results.append(common.Result(case=case, provider=provider, mode="full", ms=ms, extra=extra))
            except Exception as exc:
                results.append(common.Result(case=case, provider=provider, mode="full",
                                             error=f"{type(exc).__name__}: {exc}"[:300]))
    return results
