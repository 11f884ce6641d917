"""rms_norm benchmark: fastsft vs torch (the HF-style reference) vs Liger's LigerRMSNormFunction.

Also home of the small timing driver shared by the elementwise-op benchmarks
(rms_norm, rope, swiglu): each provider is a function of one input set that
returns the output tensors; forward, backward and forward+backward are timed
separately over rotated input sets, with GB/s from the bytes each pass must move.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import common

MODES = ("fwd", "bwd", "full")


def liger_available() -> Optional[str]:
    """None when liger-kernel imports on this machine, else why not."""
    if not torch.cuda.is_available():
        return "liger-kernel needs CUDA"
    try:
        import liger_kernel  # noqa: F401
    except Exception as exc:  # not installed / broken install
        return f"liger-kernel not importable ({type(exc).__name__})"
    return None


def _leaves(inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def measure(case: str, provider: str, fn: Callable, input_sets: List[tuple], bytes_per_mode: Dict[str, float],
            modes: Sequence[str] = MODES, quick: bool = False) -> List[common.Result]:
    """Time fn over rotated input sets (CUDA): one Result per mode."""
    results = []
    n = len(input_sets)
    warmup, rep = (5, 20) if quick else (25, 100)
    for mode in modes:
        try:
            if mode == "fwd":
                with torch.no_grad():
                    ms = common.bench_ms(lambda i: fn(*input_sets[i]), n_inputs=n, warmup=warmup, rep=rep)
            elif mode == "bwd":
                outs = [_as_tuple(fn(*s)) for s in input_sets]
                grads = [tuple(torch.randn_like(o) for o in out) for out in outs]

                def backward(i):
                    for t in _leaves(input_sets[i]):
                        t.grad = None
                    torch.autograd.backward(outs[i], grads[i], retain_graph=True)

                ms = common.bench_ms(backward, n_inputs=n, warmup=warmup, rep=rep)
                del outs
            else:
                grads = [tuple(torch.randn_like(o) for o in _as_tuple(fn(*s))) for s in input_sets]

                def full(i):
                    for t in _leaves(input_sets[i]):
                        t.grad = None
                    torch.autograd.backward(_as_tuple(fn(*input_sets[i])), grads[i])

                ms = common.bench_ms(full, n_inputs=n, warmup=warmup, rep=rep)
            peak = None
            if mode == "full":
                def once():
                    for t in _leaves(input_sets[0]):
                        t.grad = None
                    torch.autograd.backward(_as_tuple(fn(*input_sets[0])), grads[0])

                peak = common.peak_memory_mb(once)
            results.append(common.Result(case=case, provider=provider, mode=mode, ms=ms,
                                         gbps=bytes_per_mode[mode] / ms / 1e6, peak_mb=peak))
        except Exception as exc:  # a provider failing must not hide the others' numbers
            results.append(common.Result(case=case, provider=provider, mode=mode,
                                         error=f"{type(exc).__name__}: {exc}"[:300]))
        torch.cuda.empty_cache()
    return results


def smoke_measure(case: str, provider: str, fn: Callable, inputs: tuple) -> common.Result:
    """One forward+backward on CPU: checks the provider's code path runs (timing not meaningful)."""
    try:
        start = time.perf_counter()
        out = _as_tuple(fn(*inputs))
        torch.autograd.backward(out, tuple(torch.ones_like(o) for o in out))
        ms = (time.perf_counter() - start) * 1e3
        if not all(torch.isfinite(o).all() for o in out):
            return common.Result(case=case, provider=provider, mode="full", error="non-finite output")
        return common.Result(case=case, provider=provider, mode="full", ms=ms)
    except Exception as exc:
        return common.Result(case=case, provider=provider, mode="full", error=f"{type(exc).__name__}: {exc}"[:300])


def skipped(case: str, provider: str, why: str) -> common.Result:
    return common.Result(case=case, provider=provider, mode="full", extra={"skipped": why})


def selected(args, name: str) -> bool:
    return not getattr(args, "providers", None) or name in args.providers


# ---------------------------------------------------------------- rms_norm
def measure_providers(case: str, providers: Dict[str, Callable], input_sets: List[tuple],
                      bytes_per_mode: Dict[str, float], args, unsupported: Optional[Dict[str, str]] = None) -> list:
    """Time every selected provider on one case; a provider that cannot run gets a skip row."""
    results = []
    for provider, fn in providers.items():
        if not selected(args, provider):
            continue
        why = (unsupported or {}).get(provider) or (liger_available() if provider == "liger" else None)
        if why:
            results.append(skipped(case, provider, why))
            continue
        results.extend(measure(case, provider, fn, input_sets, bytes_per_mode, quick=args.quick))
    return results


def smoke_providers(case: str, providers: Dict[str, Callable], inputs: tuple, args) -> list:
    """One tiny CPU call per selected provider (skip rows for those that cannot run)."""
    results = []
    for provider, fn in providers.items():
        if not selected(args, provider):
            continue
        why = liger_available() if provider == "liger" else None
        results.append(skipped(case, provider, why) if why else smoke_measure(case, provider, fn, inputs))
    return results


def _torch_rms_norm(x, w, eps, offset):
    from fastsft_kernels import reference

    return reference.rms_norm(x, w, eps, offset=offset)


def _fastsft_rms_norm(x, w, eps, offset):
    import fastsft_kernels as fk

    return fk.rms_norm(x, w, eps, offset=offset)


def _liger_rms_norm(x, w, eps, offset):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    mode = "llama" if offset == 0.0 else "gemma"
    return LigerRMSNormFunction.apply(x, w, eps, offset, mode, True)  # Liger's defaults: in-place backward


PROVIDERS = {"fastsft": _fastsft_rms_norm, "torch": _torch_rms_norm, "liger": _liger_rms_norm}

# (name, rows, hidden, offset): Llama-3-8B / 70B hidden, Gemma-2-9B, Qwen3 q_norm over head_dim 128
CASES = [("llama_16k_x_4096", 16384, 4096, 0.0), ("llama_16k_x_8192", 16384, 8192, 0.0),
         ("gemma_16k_x_3584", 16384, 3584, 1.0), ("qwen3_qknorm_512k_x_128", 16384 * 32, 128, 0.0)]


def _inputs(rows, hidden, offset, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(hidden, device=device, generator=g) * 0.1 + (0.0 if offset else 1.0)).to(dtype).requires_grad_()
    return x, w, 1e-6, offset


def run(op, args):
    dtype = torch.bfloat16
    cases = CASES[:2] if args.quick else CASES
    results = []
    for name, rows, hidden, offset in cases:
        sets = [_inputs(rows, hidden, offset, dtype, "cuda", s) for s in range(3)]
        elt = 2
        nbytes = {"fwd": 2 * rows * hidden * elt, "bwd": 3 * rows * hidden * elt, "full": 5 * rows * hidden * elt}
        results.extend(measure_providers(name, PROVIDERS, sets, nbytes, args))
        del sets
    config = {"dtype": "bfloat16", "cases": [dict(zip(("name", "rows", "hidden", "offset"), c)) for c in cases],
              "bytes": "fwd: read x + write y; bwd: read dy, x + write dx; full: both"}
    return config, results, "torch"


def smoke(op, args):
    results = []
    for name, offset in (("tiny_llama", 0.0), ("tiny_gemma", 1.0)):
        inputs = _inputs(37, 96, offset, torch.float32, "cpu", 0)
        results.extend(smoke_providers(name, PROVIDERS, inputs, args))
    return results
