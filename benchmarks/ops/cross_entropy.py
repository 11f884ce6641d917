"""cross_entropy and linear_cross_entropy benchmarks.

Providers:
- fastsft: fastsft_kernels.cross_entropy / linear_cross_entropy;
- torch: eager PyTorch with full logits, upcast to fp32 as Hugging Face's loss does
  (the baseline);
- torch_compile: the same function under torch.compile (errors are recorded);
- liger: LigerCrossEntropyLoss / LigerFusedLinearCrossEntropyLoss when liger_kernel imports;
- cce, cce_exact (linear_cross_entropy only): Apple's Cut Cross-Entropy (`cut-cross-entropy`),
  cut_cross_entropy.linear_cross_entropy with its default gradient filtering (filter_eps="high",
  it skips the gradient of vocabulary entries whose softmax is below bf16 resolution) and in its exact
  mode (filter_eps=None, every entry's gradient computed).

Shapes (DESIGN.md targets): 16k tokens; plain CE over vocab 128256 and 151936; linear CE at
hidden 4096 x vocab 128256 (Llama 3) and hidden 3584 x vocab 151936 (Qwen 2.5 7B), bf16.

Modes: "fwd" is the forward pass with gradients enabled (what a training step pays;
the fused providers compute their gradients there), "full" is forward + backward,
and "bwd" = full - fwd (a derived number: the fused providers' graphs cannot be
backpropagated twice, so backward alone is not timed directly).
Rates: plain CE in GB/s (logits bytes each pass must move: fwd reads them once,
bwd reads them and writes the gradient); linear CE in TFLOP/s of the nominal matmul
work: fwd 2*N*H*V, bwd 4*N*H*V, full 6*N*H*V.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .. import common

TOKENS = 16384
# case name -> (hidden, vocab); plain cross_entropy uses the vocab only
CASES = {"llama3_128256": (4096, 128256), "qwen2_151936": (3584, 151936)}
IGNORE_EVERY = 8  # every 8th token is ignored (prompt tokens in SFT)


# ---------------------------------------------------------------- providers
def _fastsft_ce(logits, labels):
    import fastsft_kernels as fk

    return fk.cross_entropy(logits, labels)


def _torch_ce(logits, labels):
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def _liger_ce(logits, labels):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(ignore_index=-100)(logits, labels)


def _fastsft_lce(hidden, weight, labels):
    import fastsft_kernels as fk

    return fk.linear_cross_entropy(hidden, weight, labels)


def _torch_lce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)


def _liger_lce(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100)(weight, hidden, labels)


def _cce_lce(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean")


def _cce_exact_lce(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", filter_eps=None)


_COMPILED: dict = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


PROVIDERS = {
    "cross_entropy": {"fastsft": _fastsft_ce, "torch": _torch_ce, "torch_compile": lambda *a: _compiled(_torch_ce)(*a),
                      "liger": _liger_ce},
    "linear_cross_entropy": {"fastsft": _fastsft_lce, "torch": _torch_lce,
                             "torch_compile": lambda *a: _compiled(_torch_lce)(*a), "liger": _liger_lce,
                             "cce": _cce_lce, "cce_exact": _cce_exact_lce},
}


def cce_unavailable() -> Optional[str]:
    if not torch.cuda.is_available():
        return "cut-cross-entropy's Triton kernels need CUDA"
    try:
        import cut_cross_entropy  # noqa: F401
    except Exception as exc:
        return f"cut-cross-entropy not importable ({type(exc).__name__}: {exc})"[:200]
    return None


def unavailable(provider: str) -> Optional[str]:
    """Why a provider cannot run here (None: it can)."""
    if provider == "liger":
        return liger_unavailable()
    if provider in ("cce", "cce_exact"):
        return cce_unavailable()
    return None


def liger_unavailable() -> Optional[str]:
    if not torch.cuda.is_available():
        return "liger-kernel needs CUDA"
    try:
        import liger_kernel  # noqa: F401
    except Exception as exc:
        return f"liger-kernel not importable ({type(exc).__name__})"
    return None


# ---------------------------------------------------------------- inputs
def _labels(n, vocab, device, gen):
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    labels[::IGNORE_EVERY] = -100
    return labels


def _ce_inputs(n, vocab, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, vocab, device=device, generator=gen) * 2).to(dtype).requires_grad_()
    return logits, _labels(n, vocab, device, gen)


def _lce_inputs(n, hidden, vocab, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, device=device, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=gen) * hidden**-0.5).to(dtype).requires_grad_()
    return h, w, _labels(n, vocab, device, gen)


# ---------------------------------------------------------------- timing
def _zero_grads(inputs):
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def _measure(case: str, provider: str, fn: Callable, input_sets: List[tuple], work: dict, unit: str,
             quick: bool) -> List[common.Result]:
    """fwd (grad enabled) and full timed over rotated input sets; bwd derived; peak for full."""
    warmup, rep = (3, 10) if quick else (10, 50)
    n = len(input_sets)
    try:
        def forward(i):
            _zero_grads(input_sets[i])
            return fn(*input_sets[i])

        def full(i):
            forward(i).backward()

        full(0)  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        ms = {"fwd": common.bench_ms(forward, n_inputs=n, warmup=warmup, rep=rep),
              "full": common.bench_ms(full, n_inputs=n, warmup=warmup, rep=rep)}
        ms["bwd"] = max(ms["full"] - ms["fwd"], 1e-6)
        _zero_grads(input_sets[0])
        peak = common.peak_memory_mb(lambda: full(0))
    except Exception as exc:  # one provider failing must not hide the others
        torch.cuda.empty_cache()
        return [common.Result(case=case, provider=provider, mode="full", error=f"{type(exc).__name__}: {exc}"[:400])]
    results = []
    for mode in ("fwd", "bwd", "full"):
        r = common.Result(case=case, provider=provider, mode=mode, ms=ms[mode],
                          peak_mb=peak if mode == "full" else None,
                          extra={"derived": "full - fwd"} if mode == "bwd" else {})
        rate = work[mode] / ms[mode] / (1e9 if unit == "tflops" else 1e6)
        setattr(r, unit, rate)
        results.append(r)
    torch.cuda.empty_cache()
    return results


def _selected(args, name):
    return not getattr(args, "providers", None) or name in args.providers


def run(op, args):
    dtype = torch.bfloat16
    cases = dict(list(CASES.items())[:1]) if args.quick else CASES
    results = []
    n_sets = 2
    for name, (hidden, vocab) in cases.items():
        if op == "cross_entropy":
            case = f"{name}_{TOKENS}tok"
            sets = [_ce_inputs(TOKENS, vocab, dtype, "cuda", s) for s in range(n_sets)]
            nbytes = TOKENS * vocab * 2
            work, unit = {"fwd": nbytes, "bwd": 2 * nbytes, "full": 3 * nbytes}, "gbps"
        else:
            case = f"{name}_{TOKENS}tok_h{hidden}"
            sets = [_lce_inputs(TOKENS, hidden, vocab, dtype, "cuda", s) for s in range(n_sets)]
            flops = TOKENS * hidden * vocab
            work, unit = {"fwd": 2 * flops, "bwd": 4 * flops, "full": 6 * flops}, "tflops"
        for provider, fn in PROVIDERS[op].items():
            if not _selected(args, provider):
                continue
            why = unavailable(provider)
            if why:
                results.append(common.Result(case=case, provider=provider, mode="full", extra={"skipped": why}))
                continue
            results.extend(_measure(case, provider, fn, sets, work, unit, args.quick))
        del sets
        torch.cuda.empty_cache()
    config = {"op": op, "tokens": TOKENS,
              "cases": {n: ({"hidden": h, "vocab": v} if op == "linear_cross_entropy" else {"vocab": v})
                        for n, (h, v) in cases.items()},
              "dtype": "bfloat16", "ignored_fraction": 1 / IGNORE_EVERY, "reduction": "mean",
              "modes": "fwd = forward with grad enabled; bwd = full - fwd; full = forward + backward",
              "rate": "GB/s of logits traffic" if op == "cross_entropy" else "TFLOP/s of 2/4/6*N*H*V",
              "providers": {"cce": "cut_cross_entropy.linear_cross_entropy, default filter_eps='high'",
                            "cce_exact": "cut_cross_entropy.linear_cross_entropy, filter_eps=None (exact)"}
              if op == "linear_cross_entropy" else {},
              "versions": {k: common._version(d) for k, d in (("liger_kernel", "liger-kernel"),
                                                             ("cut_cross_entropy", "cut-cross-entropy"),
                                                             ("triton", "triton"))}}
    return config, results, "torch"


# ---------------------------------------------------------------- CPU smoke
def smoke(op, args):
    """Tiny CPU case through fastsft (interpreter or reference, per the environment) and torch."""
    n, hidden, vocab = 37, 96, 509
    results = []
    for provider, fn in PROVIDERS[op].items():
        why = "compiling takes too long for a smoke run" if provider == "torch_compile" else unavailable(provider)
        if why:
            results.append(common.Result(case="tiny", provider=provider, mode="full", extra={"skipped": why}))
            continue
        if op == "cross_entropy":
            inputs = _ce_inputs(n, vocab, torch.float32, "cpu", 0)
        else:
            inputs = _lce_inputs(n, hidden, vocab, torch.float32, "cpu", 0)
        try:
            start = time.perf_counter()
            loss = fn(*inputs)
            loss.backward()
            ms = (time.perf_counter() - start) * 1e3
            grads_ok = all(torch.isfinite(t.grad).all() for t in inputs if t.requires_grad)
            if not (torch.isfinite(loss) and grads_ok):
                results.append(common.Result(case="tiny", provider=provider, mode="full", error="non-finite output"))
                continue
            results.append(common.Result(case="tiny", provider=provider, mode="full", ms=ms,
                                         extra={"loss": float(loss)}))
        except Exception as exc:
            results.append(common.Result(case="tiny", provider=provider, mode="full",
                                         error=f"{type(exc).__name__}: {exc}"[:300]))
    return results
