"""lora_linear benchmark: one LoRA projection, and fused q/k/v and gate/up projections.

Cases (8192 tokens, bf16 activations): 4096 -> 4096 and 4096 -> 14336, rank 16 and 64,
on a bf16 base and on an NF4 base (bitsandbytes, double-quantized absmax, blocksize
64, as QLoRA uses it); plus "qkv" (4096 -> 4096 / 1024 / 1024, Llama-3-8B GQA) and
"gate_up" (4096 -> 14336 x 2) with x shared by the projections.

Providers:
- fastsft: fastsft_kernels.lora_linear (one call per projection);
- fastsft_fused: fastsft_kernels.lora.lora_linear_fused (the shared-x cases);
- peft: peft's LoRA layer (peft.tuners.lora Linear; on NF4, its bitsandbytes Linear4bit,
  i.e. peft + bitsandbytes) -- the baseline.
The base weight is frozen, the adapter trainable and x requires grad (a layer inside
a model). Modes: fwd (grad enabled), bwd (backward alone, graph retained), full.
TFLOP/s of the nominal work: fwd 2MNK + 2Mr(K+N); bwd 2MNK + 4Mr(K+N) (dx plus the
four rank-r products); full the sum.
"""
from __future__ import annotations

import time
from typing import List

import torch

from .. import common

TOKENS, HIDDEN = 8192, 4096
SINGLE = {"4096x4096": 4096, "4096x14336": 14336}
FUSED = {"qkv": (4096, 1024, 1024), "gate_up": (14336, 14336)}
RANKS = (16, 64)
ALPHA_OVER_R = 2.0
DEVICE = "cuda"


def _peft_layer(out_f: int, in_f: int, rank: int, base_kind: str, device, dtype, gen):
    """A peft LoRA layer (init_lora_weights=False: random B, so the LoRA term is live)."""
    from peft import LoraConfig

    w = (torch.randn(out_f, in_f, device=device, generator=gen) * in_f ** -0.5).to(dtype)
    config = LoraConfig(r=rank, lora_alpha=ALPHA_OVER_R * rank, lora_dropout=0.0, init_lora_weights=False)
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
    return layer


def _kernel_args(layer):
    """(weight, lora_a, lora_b, scaling, quant_state) of a peft layer, for fastsft."""
    base = layer.get_base_layer()
    qs = getattr(base.weight, "quant_state", None)
    weight = base.weight.data if qs is not None else base.weight
    return weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, float(layer.scaling["default"]), qs


def _providers(layers, fused: bool):
    import fastsft_kernels as fk
    from fastsft_kernels.lora import lora_linear_fused

    args = [_kernel_args(layer) for layer in layers]

    def fastsft(x):
        return [fk.lora_linear(x, w, a, b, s, quant_state=q) for w, a, b, s, q in args]

    def fastsft_fused(x):
        return lora_linear_fused(x, [a[0] for a in args], [a[1] for a in args], [a[2] for a in args],
                                 [a[3] for a in args], quant_states=[a[4] for a in args])

    def peft(x):
        return [layer(x) for layer in layers]

    providers = {"fastsft": fastsft, "peft": peft}
    if fused:
        providers["fastsft_fused"] = fastsft_fused
    return providers


def _params(layers):
    return [p for layer in layers for p in layer.parameters() if p.requires_grad]


def _measure(case, provider, fn, xs, grads, params, work, quick) -> List[common.Result]:
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
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        graphs = [forward(i) for i in range(n)]

        def backward(i):
            xs[i].grad = None
            for p in params:
                p.grad = None
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
                                 tflops=work[mode] / ms[mode] / 1e9, peak_mb=peak if mode == "full" else None))
    torch.cuda.empty_cache()
    return out


def _work(m, k, outs, rank):
    fwd = sum(2 * m * n * k + 2 * m * rank * (k + n) for n in outs)
    bwd = sum(2 * m * n * k + 4 * m * rank * (k + n) for n in outs)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def _selected(args, name):
    return not getattr(args, "providers", None) or name in args.providers


def _cases(quick):
    cases = []
    for base_kind in ("bf16", "nf4"):
        for rank in (RANKS[:1] if quick else RANKS):
            for shape_name, out_f in SINGLE.items():
                cases.append((f"{base_kind}_{shape_name}_r{rank}", base_kind, rank, (out_f,)))
            for fused_name, outs in FUSED.items():
                if quick and fused_name == "qkv":
                    continue
                cases.append((f"{base_kind}_{fused_name}_r{rank}", base_kind, rank, outs))
    return cases


def run(op, args):
    dtype, device = torch.bfloat16, DEVICE
    results = []
    for case, base_kind, rank, outs in _cases(args.quick):
        gen = torch.Generator(device=device).manual_seed(0)
        layers = [_peft_layer(n, HIDDEN, rank, base_kind, device, dtype, gen) for n in outs]
        xs = [torch.randn(TOKENS, HIDDEN, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(2)]
        grads = [[torch.randn(TOKENS, n, device=device, dtype=dtype, generator=gen) for n in outs] for _ in range(2)]
        work = _work(TOKENS, HIDDEN, outs, rank)
        for provider, fn in _providers(layers, fused=len(outs) > 1).items():
            if _selected(args, provider):
                results.extend(_measure(case, provider, fn, xs, grads, _params(layers), work, args.quick))
        del layers, xs, grads
        torch.cuda.empty_cache()
    config = {"op": op, "tokens": TOKENS, "in_features": HIDDEN, "single_out_features": SINGLE,
              "fused_out_features": FUSED, "ranks": RANKS, "lora_alpha": f"{ALPHA_OVER_R} * r", "dtype": "bfloat16",
              "nf4": "bitsandbytes NF4, blocksize 64, double-quantized absmax",
              "modes": "fwd = forward with grad enabled; bwd = backward alone (graph retained); full = fwd + bwd",
              "rate": "TFLOP/s of fwd 2MNK+2Mr(K+N), bwd 2MNK+4Mr(K+N)"}
    return config, results, "peft"


def smoke(op, args):
    """Tiny CPU case (37 tokens, 96 -> 80 / 48, rank 8) through every provider, dense and NF4."""
    results = []
    for base_kind in ("fp32", "nf4"):
        gen = torch.Generator().manual_seed(0)
        outs = (80, 48)
        layers = [_peft_layer(n, 128, 8, base_kind, "cpu", torch.float32, gen) for n in outs]
        for provider, fn in _providers(layers, fused=True).items():
            x = torch.randn(37, 128, generator=torch.Generator().manual_seed(1)).requires_grad_()
            for p in _params(layers):
                p.grad = None
            case = f"tiny_{base_kind}"
            try:
                start = time.perf_counter()
                ys = fn(x)
                torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
                ms = (time.perf_counter() - start) * 1e3
                finite = all(torch.isfinite(y).all() for y in ys) and torch.isfinite(x.grad).all() and all(
                    torch.isfinite(p.grad).all() for p in _params(layers))
                if not finite:
                    results.append(common.Result(case=case, provider=provider, mode="full", error="non-finite output"))
                    continue
                results.append(common.Result(case=case, provider=provider, mode="full", ms=ms,
                                             extra={"y_sum": float(sum(y.detach().double().sum() for y in ys))}))
            except Exception as exc:
                results.append(common.Result(case=case, provider=provider, mode="full",
                                             error=f"{type(exc).__name__}: {exc}"[:300]))
    return results
