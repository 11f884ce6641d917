"""Timing, memory, peak-throughput and result-writing helpers shared by the benchmarks.

Method (see shared/DESIGN.md, Benchmarks):
- time with triton.testing.do_bench (median after warm-up), rotating through
  several input sets so the L2 cache does not flatter repeated calls;
- measure the device's bf16 matmul peak and device-to-device copy bandwidth in
  the same run and report each result against them;
- peak memory = torch.cuda.max_memory_allocated above what was allocated
  before the call (the inputs), after reset_peak_memory_stats.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _version(distribution: str) -> Optional[str]:
    """Installed version of a distribution, read from its metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or None
        if commit and dirty.stdout.strip():
            commit += "-dirty"
        return commit
    except Exception:
        return None


def environment() -> dict:
    """Device name and library versions recorded with every result."""
    env = {
        "device": torch.cuda.get_device_name() if has_cuda() else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "liger_kernel": _version("liger-kernel"),
        "flash_attn": _version("flash-attn"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "unsloth": _version("unsloth"),
        "unsloth_zoo": _version("unsloth_zoo"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return env


def device_slug() -> str:
    return device_slug_of(torch.cuda.get_device_name() if has_cuda() else "cpu")


def device_slug_of(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "").lower()).strip("-")
    return slug or "unknown"


# ---------------------------------------------------------------- timing
def bench_ms(fn: Callable[[int], object], n_inputs: int = 1, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn(i), i cycling over n_inputs prepared input sets."""
    import triton.testing

    counter = {"i": 0}

    def call():
        fn(counter["i"] % n_inputs)
        counter["i"] += 1

    return float(triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median"))


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory in MB allocated by fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_PEAKS: dict = {}


def device_peaks() -> dict:
    """Measured bf16 matmul TFLOP/s and device-to-device copy GB/s (cached per run)."""
    if _PEAKS:
        return _PEAKS
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda i: a @ b)
    _PEAKS["bf16_matmul_tflops"] = 2 * n**3 / ms / 1e9
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda i: dst.copy_(src))
    _PEAKS["d2d_copy_gbps"] = 2 * src.numel() * src.element_size() / ms / 1e6
    del a, b, src, dst
    torch.cuda.empty_cache()
    return _PEAKS


# ---------------------------------------------------------------- records
@dataclass
class Result:
    """One measurement: an op (or model) case, a provider, a pass (fwd/bwd/full)."""

    case: str
    provider: str
    mode: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    peak_mb: Optional[float] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if v is not None and v != {}}
        return d


def add_ratios(results: Sequence[Result], baseline: str) -> list:
    """Attach speed (baseline ms / ms) and memory (peak / baseline peak) ratios."""
    out = []
    base = {(r.case, r.mode): r for r in results if r.provider == baseline and r.error is None}
    for r in results:
        d = r.as_dict()
        b = base.get((r.case, r.mode))
        if b is not None and r.error is None:
            if r.ms and b.ms:
                d["speedup_vs_" + baseline] = b.ms / r.ms
            if r.peak_mb is not None and b.peak_mb:
                d["memory_vs_" + baseline] = r.peak_mb / b.peak_mb
        out.append(d)
    return out


def write_results(name: str, config: dict, records: list, plot: bool = True, out_dir: Optional[str] = None,
                  smoke: bool = False) -> str:
    """Write <out_dir or benchmarks/results/<device>>/<name>.json (+ .png); return the JSON path."""
    out_dir = out_dir or os.path.join(RESULTS_DIR, device_slug())
    os.makedirs(out_dir, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), "config": config, "smoke": smoke,
               "results": records}
    if has_cuda():
        payload["peaks"] = device_peaks()
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
    os.replace(tmp, path)
    if plot:
        from .plot import plot_results

        plot_results(path)
    return path


def print_table(records: list, columns: Sequence[str] = ("case", "provider", "mode", "ms", "tflops", "gbps", "peak_mb")) -> None:
    extra = sorted({k for r in records for k in r if k.startswith(("speedup_vs_", "memory_vs_"))})
    cols = list(columns) + extra
    rows = [[_fmt(r.get(c)) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)
