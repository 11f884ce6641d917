"""Compile every Triton kernel for sm_90 and sm_80 on this machine (no GPU needed):
`python -m benchmarks.compile_report [--full] [--json PATH] [--check]`.

Prints one table (kernel, config, arch, registers, spills, shared memory, MMA kind,
HGMMA/HMMA count, SASS instructions per innermost loop) and writes it as JSON
(default benchmarks/results/compile/compile_report.json). The kernel specs live in
tests/compile/specs.py (the compile tier in CI runs this same code). The default run
compiles one representative config per kernel x dtype; --full (or FASTSFT_COMPILE_FULL=1)
every config the launchers can pick at the target shapes. Register, spill and
shared-memory figures are the compiler's (ptxas -v, kernel metadata), not measurements
on a GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC_DIR = os.path.join(_ROOT, "tests", "compile")


def _load():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("benchmarks.compile_report: unset TRITON_INTERPRET (the interpreter cannot compile)")
    if _SPEC_DIR not in sys.path:
        sys.path.insert(0, _SPEC_DIR)
    import aot  # noqa: E402  (tests/compile/aot.py)
    import specs  # noqa: E402  (tests/compile/specs.py)

    return aot, specs


_WORKER = {}


def _init_worker(full: bool, cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    aot, specs = _load()
    _WORKER.update(aot=aot, specs=specs.all_specs(full))


def _compile(job):
    index, arch = job
    return _WORKER["aot"].compile_one(_WORKER["specs"][index], arch)


def run(full: bool, jobs: int, kernel_filter=None, archs=None) -> list:
    """Compile the selected specs; rows in spec order (arch 90 before 80)."""
    aot, specs = _load()
    selected = specs.all_specs(full)
    archs = archs or aot.ARCHS
    work = [(i, a) for i, s in enumerate(selected) for a in s.archs if a in archs
            and (not kernel_filter or kernel_filter in s.kernel)]
    # a fresh cache: a cached kernel skips ptxas, whose log gives registers and spills
    with tempfile.TemporaryDirectory(prefix="fastsft_compile_") as cache:
        if jobs <= 1:
            _init_worker(full, cache)
            return [_compile(j) for j in work]
        with cf.ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(full, cache)) as pool:
            return list(pool.map(_compile, work))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", default=os.environ.get("FASTSFT_COMPILE_FULL") == "1",
                   help="every config the launchers can pick (default: one per kernel x dtype)")
    p.add_argument("--json", default=os.path.join(_ROOT, "benchmarks", "results", "compile", "compile_report.json"),
                   help="where to write the table as JSON")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    p.add_argument("--arch", type=int, action="append", choices=(90, 80), help="only this arch (repeatable)")
    p.add_argument("--check", action="store_true", help="exit 1 when a row breaks the compile tier's rules")
    args = p.parse_args(argv)
    aot, _ = _load()
    reason = aot.missing_tools()
    if reason:
        print(f"benchmarks.compile_report: {reason}")
        return 2
    t0 = time.perf_counter()
    rows = run(args.full, args.jobs, args.kernel, args.arch)
    elapsed = time.perf_counter() - t0
    print(aot.format_table(rows))
    bad = [(r, aot.problems(r)) for r in rows]
    bad = [(r, why) for r, why in bad if why]
    for r, why in bad:
        print(f"FAIL {r['kernel']} [{r['config']}] {r['dtype']} {r['arch']}: {'; '.join(why)}")
    exempt = [r for r in rows if r.get("status") == "ok" and r["smem"] > r["smem_limit"] and r["smem_exempt"]]
    budget = [r for r in rows if r.get("spill_stores") and r["spill_budget"]]
    for r in exempt:
        print(f"EXEMPT smem {r['kernel']} [{r['config']}] {r['dtype']} {r['arch']}: {r['smem']} B: {r['smem_exempt']}")
    for r in budget:
        print(f"BUDGET spills {r['kernel']} [{r['config']}] {r['dtype']} {r['arch']}: {r['spill_stores']} B "
              f"(<= {r['spill_budget']}): {r['budget_reason']}")
    print(f"{len(rows)} compiles in {elapsed:.0f} s ({args.jobs} processes), {len(bad)} failing")
    import triton
    import torch

    record = {"triton": triton.__version__, "torch": torch.__version__, "git_commit": _git_commit(),
              "host": platform.node(), "ptxas": aot.tool_versions(), "full": args.full, "seconds": round(elapsed, 1),
              "note": "compiler figures for sm_90 / sm_80 from a CPU machine (ptxas -v, metadata, SASS); no GPU",
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.json}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
