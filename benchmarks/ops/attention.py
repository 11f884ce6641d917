"""varlen_attention benchmark: fastsft's packed kernel vs torch SDPA (per document, and
on a padded batch) vs flash-attn's varlen kernel (when installed).

Case: 16k packed tokens from a realistic length mix (128..4096, fixed seed), 32 query
heads / 8 KV heads, head_dim 128, causal, bf16. TFLOP/s count only the unmasked
(causal, same-document) work for every provider -- the padded batch does more
arithmetic than that, which is the point of packing. fwd, bwd and fwd+bwd are
timed separately over rotated input sets; peak memory is taken on fwd+bwd.
Baseline: ``sdpa_per_doc``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import common

MODES = ("fwd", "bwd", "full")
BASELINE = "sdpa_per_doc"
PROVIDERS = ("fastsft", "sdpa_per_doc", "sdpa_padded", "flash_attn")


def realistic_lengths(total: int, seed: int = 0, lo: int = 128, hi: int = 4096) -> List[int]:
    """Document lengths drawn log-uniformly from [lo, hi] (SFT data is mostly short), summing to total."""
    g = torch.Generator().manual_seed(seed)
    lengths: List[int] = []
    while sum(lengths) < total:
        u = float(torch.rand((), generator=g))
        lengths.append(int(round(lo * (hi / lo) ** u)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < lo:  # keep every document in [lo, hi]: move the shortfall from the longest
        longest = max(range(len(lengths) - 1), key=lengths.__getitem__)
        lengths[longest] -= lo - lengths[-1]
        lengths[-1] = lo
    return lengths


def causal_pairs(lengths: Sequence[int], window: Optional[int] = None) -> int:
    """Number of (query, key) pairs causal attention computes within the documents."""
    pairs = 0
    for n in lengths:
        if window is None or window >= n:
            pairs += n * (n + 1) // 2
        else:
            pairs += window * (window + 1) // 2 + (n - window) * window
    return pairs


def flops(lengths: Sequence[int], n_heads: int, head_dim: int) -> Dict[str, float]:
    fwd = 4.0 * causal_pairs(lengths) * n_heads * head_dim  # QK^T and PV
    return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}  # bwd: QK^T again, dV, dP, dQ, dK


def _cu(lengths: Sequence[int], device) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def flash_attn_unavailable() -> Optional[str]:
    if not torch.cuda.is_available():
        return "flash-attn needs CUDA"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:
        return f"flash-attn not importable ({type(exc).__name__})"
    return None


# ------------------------------------------------------------------------------ providers
# Each provider: make(lengths, q, k, v) -> fn() returning the output. Inputs are the packed
# (T, H, D) / (T, H_kv, D) leaves; layout changes a provider needs (per-document views,
# padding) are done once outside the timed function, so only attention is timed.
def make_fastsft(lengths, q, k, v):
    import fastsft_kernels as fk
    from fastsft_kernels.attention import make_cu_seqlens

    bounds = _cu(lengths, "cpu").tolist()
    cu = make_cu_seqlens(bounds, q.device)  # host-known boundaries: no sync in the timed calls
    max_len = max(lengths)
    return lambda: fk.varlen_attention(q, k, v, cu, max_len)


_SDPA_BACKEND = {"per_doc": "default"}


def _flash_backend():
    """Context manager restricting SDPA to its flash backend (CUDA), or None where that is not possible."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return None
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def make_sdpa_per_doc(lengths, q, k, v):
    # (1, H, L, D) views of each document; one SDPA call per document, on SDPA's flash
    # backend on a GPU (the baseline); the default dispatch if flash refuses the case
    bounds = _cu(lengths, "cpu").tolist()
    views = [(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None])
             for a, b in zip(bounds[:-1], bounds[1:])]

    def attend():
        outs = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True) for qd, kd, vd in views]
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    if not q.is_cuda or _flash_backend() is None:
        return attend
    try:
        with torch.no_grad(), _flash_backend():
            attend()
    except RuntimeError as exc:
        print(f"sdpa_per_doc: flash backend refused the case ({str(exc).splitlines()[0][:120]}); "
              "using SDPA's default dispatch")
        _SDPA_BACKEND["per_doc"] = "default (flash refused)"
        return attend
    _SDPA_BACKEND["per_doc"] = "flash"

    def run():
        with _flash_backend():
            return attend()

    return run


def make_sdpa_padded(lengths, q, k, v):
    # right-padded (n_docs, H, max_len, D) batch built from the packed leaves with index ops
    # (inside the timed graph, like the pad/unpad around a padded HF batch)
    n_docs, max_len = len(lengths), max(lengths)
    rows = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(q.device)
    cols = torch.cat([torch.arange(n) for n in lengths]).to(q.device)

    def pad(t):
        out = t.new_zeros(n_docs, max_len, t.shape[1], t.shape[2])
        return out.index_put((rows, cols), t).transpose(1, 2)

    def run():
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=True)
        return o.transpose(1, 2)[rows, cols]

    return run


def make_flash_attn(lengths, q, k, v):
    from flash_attn import flash_attn_varlen_func

    cu = _cu(lengths, q.device)
    max_len = max(lengths)
    return lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


MAKERS: Dict[str, Callable] = {"fastsft": make_fastsft, "sdpa_per_doc": make_sdpa_per_doc,
                               "sdpa_padded": make_sdpa_padded, "flash_attn": make_flash_attn}


# ------------------------------------------------------------------------------ timing
def _inputs(lengths, n_heads, n_kv, head_dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rnd(h):
        return torch.randn(total, h, head_dim, generator=g).to(device=device, dtype=dtype).requires_grad_()

    return rnd(n_heads), rnd(n_kv), rnd(n_kv)


def measure(case: str, provider: str, lengths, input_sets, flop: Dict[str, float], quick: bool) -> List[common.Result]:
    results = []
    warmup, rep = (5, 20) if quick else (25, 100)
    try:
        fns = [MAKERS[provider](lengths, *s) for s in input_sets]
    except Exception as exc:
        return [common.Result(case=case, provider=provider, mode=m, error=f"{type(exc).__name__}: {exc}")
                for m in MODES]
    n = len(fns)
    for mode in MODES:
        try:
            if mode == "fwd":
                with torch.no_grad():
                    ms = common.bench_ms(lambda i: fns[i](), n_inputs=n, warmup=warmup, rep=rep)
            elif mode == "bwd":
                outs = [fn() for fn in fns]
                grads = [torch.randn_like(o) for o in outs]
                ms = common.bench_ms(lambda i: torch.autograd.grad(outs[i], input_sets[i], grads[i],
                                                                   retain_graph=True), n_inputs=n,
                                     warmup=warmup, rep=rep)
                del outs
            else:
                grads = [torch.randn_like(fn()) for fn in fns]
                ms = common.bench_ms(lambda i: torch.autograd.grad(fns[i](), input_sets[i], grads[i]),
                                     n_inputs=n, warmup=warmup, rep=rep)
            peak = None
            if mode == "full":
                peak = common.peak_memory_mb(lambda: torch.autograd.grad(fns[0](), input_sets[0], grads[0]))
            results.append(common.Result(case=case, provider=provider, mode=mode, ms=ms,
                                         tflops=flop[mode] / ms / 1e9, peak_mb=peak))
        except Exception as exc:  # one provider failing must not hide the others' numbers
            results.append(common.Result(case=case, provider=provider, mode=mode,
                                         error=f"{type(exc).__name__}: {exc}"[:300]))
        torch.cuda.empty_cache()
    return results


def _providers(args) -> List[str]:
    wanted = list(getattr(args, "providers", None) or PROVIDERS)
    unknown = [p for p in wanted if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    return wanted


def run(op: str, args):
    """GPU benchmark: (config, results, baseline)."""
    quick = bool(getattr(args, "quick", False))
    total, n_heads, n_kv, head_dim, dtype = 16384, 32, 8, 128, torch.bfloat16
    lengths = realistic_lengths(total, seed=0)
    config = {"op": op, "total_tokens": total, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim,
              "dtype": "bfloat16", "causal": True, "n_docs": len(lengths), "doc_lengths": lengths,
              "length_mix": "log-uniform 128..4096, seed 0", "input_sets": 2 if quick else 3,
              "flops": "unmasked work only: fwd 4*pairs*H*D, bwd 2.5x, full 3.5x",
              "notes": "sdpa_padded pads/unpads with index ops inside the timed graph; "
                       "sdpa_per_doc uses views of the packed tensors"}
    case = f"T{total}_h{n_heads}_kv{n_kv}_d{head_dim}"
    input_sets = [_inputs(lengths, n_heads, n_kv, head_dim, dtype, "cuda", seed=s)
                  for s in range(config["input_sets"])]
    flop = flops(lengths, n_heads, head_dim)
    results: List[common.Result] = []
    for provider in _providers(args):
        if provider == "flash_attn" and flash_attn_unavailable():
            results.append(common.Result(case=case, provider=provider, mode="full",
                                         error=flash_attn_unavailable()))
            continue
        results.extend(measure(case, provider, lengths, input_sets, flop, quick))
    config["sdpa_per_doc_backend"] = _SDPA_BACKEND["per_doc"]
    return config, results, BASELINE


def smoke(op: str, args) -> List[common.Result]:
    """Tiny CPU case through every provider that can run here; each checked against the reference."""
    from fastsft_kernels import reference
    from fastsft_kernels.testing import install_interpreter_bf16_dot_shim, rel_err

    install_interpreter_bf16_dot_shim()
    lengths = [5, 19, 1, 8]
    q, k, v = _inputs(lengths, 4, 2, 16, torch.float32, "cpu", seed=0)
    cu = _cu(lengths, "cpu")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.varlen_attention(*leaves, cu, max(lengths))
    ref_grads = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
    ref = ref.detach()
    flop = flops(lengths, 4, 16)
    results = []
    for provider in _providers(args):
        if provider == "flash_attn":
            continue  # CUDA only; reported by run() on a GPU
        try:
            fn = MAKERS[provider](lengths, q, k, v)
            t0 = time.perf_counter()
            out = fn()
            fwd_ms = (time.perf_counter() - t0) * 1e3
            err = rel_err(out, ref)
            error = None if err <= 1e-5 else f"output differs from the reference (rel err {err:.2e})"
            t0 = time.perf_counter()
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            bwd_ms = (time.perf_counter() - t0) * 1e3
            gerr = max(rel_err(g, r) for g, r in zip(grads, ref_grads))
            bwd_error = None if gerr <= 1e-5 else f"gradients differ from the reference (rel err {gerr:.2e})"
            results.append(common.Result(case="smoke", provider=provider, mode="fwd", ms=fwd_ms,
                                         tflops=flop["fwd"] / fwd_ms / 1e9, error=error))
            results.append(common.Result(case="smoke", provider=provider, mode="bwd", ms=bwd_ms,
                                         tflops=flop["bwd"] / bwd_ms / 1e9, error=bwd_error))
        except Exception as exc:
            for mode in ("fwd", "bwd"):
                results.append(common.Result(case="smoke", provider=provider, mode=mode,
                                             error=f"{type(exc).__name__}: {exc}"))
    return results
