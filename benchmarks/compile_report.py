"""Compile every Triton kernel for sm_90 and sm_80 on this machine (no GPU needed):
`python -m benchmarks.compile_report [--full] [--triton current|all|3.6,...] [--json PATH] [--check]`.

Prints one table (kernel, config, arch, registers, spills, shared memory, MMA kind,
HGMMA/HMMA count, SASS instructions per innermost loop) and writes it as JSON, one
report per Triton version: benchmarks/results/compile/triton-<minor>.json for --full
(the committed sweeps), triton-<minor>.ci.json for the representative set. The kernel
specs live in tests/compile/specs.py (the compile tier in CI runs this same code). The
default run compiles one representative config per kernel x dtype; --full (or
FASTSFT_COMPILE_FULL=1) every config the launchers can pick at the target shapes.
--triton names the admitted Triton minors to compile with (pyproject's bounds; `all`
is every one): each other than the running one is installed once into a cache folder
and compiled in a subprocess (tests/compile/triton_envs.py), one version at a time;
the launchers pick their tiles for the Triton they run under. Register, spill and
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


def _rules():
    """tests/compile/aot.py for its row rules only (reading a report compiles nothing: any process may)."""
    if _SPEC_DIR not in sys.path:
        sys.path.insert(0, _SPEC_DIR)
    import aot  # noqa: E402

    return aot


def _triton_envs():
    if _SPEC_DIR not in sys.path:
        sys.path.insert(0, _SPEC_DIR)
    import triton_envs  # noqa: E402  (tests/compile/triton_envs.py)

    return triton_envs


def default_json(minor: str, full: bool) -> str:
    return os.path.join(_ROOT, "benchmarks", "results", "compile", f"triton-{minor}{'' if full else '.ci'}.json")


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", default=os.environ.get("FASTSFT_COMPILE_FULL") == "1",
                   help="every config the launchers can pick (default: one per kernel x dtype)")
    p.add_argument("--triton", default="current",
                   help="the Triton minors to compile with: current (the running one, default), all (every "
                        "admitted one), or a list like 3.6,3.9")
    p.add_argument("--json", default=None,
                   help="where to write the report (default benchmarks/results/compile/triton-<minor>[.ci].json; "
                        "with several versions, {minor} in PATH is replaced)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    p.add_argument("--arch", type=int, action="append", choices=(90, 80), help="only this arch (repeatable)")
    p.add_argument("--check", action="store_true", help="exit 1 when a row breaks the compile tier's rules")
    return p


def _usage_error(message: str):
    print(f"benchmarks.compile_report: {message}", file=sys.stderr)
    raise SystemExit(2)


def _versions(value: str, envs) -> list:
    running = envs.minor_of(envs.running_version())
    if value == "current":
        return [running]
    admitted = envs.admitted_minors()
    if value == "all":
        return admitted
    wanted = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in admitted]
    if unknown or not wanted:
        _usage_error(f"--triton {value}: {', '.join(unknown) or 'nothing'} not among the admitted versions "
                     f"{', '.join(admitted)} (pyproject.toml)")
    return wanted


def _json_path(args, minor: str) -> str:
    return args.json.replace("{minor}", minor) if args.json else default_json(minor, args.full)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    envs = _triton_envs()
    versions = _versions(args.triton, envs)
    running = envs.minor_of(envs.running_version())
    if versions == [running]:
        return _report_here(args, _json_path(args, running))
    if args.json and len(versions) > 1 and "{minor}" not in args.json:
        _usage_error("with several --triton versions, --json needs {minor} in it")
    summary, status = [], 0
    for minor in versions:  # one at a time: each sweep uses every --jobs process
        path = _json_path(args, minor)
        print(f"===== triton {minor}", flush=True)
        if minor == running:
            rc = _report_here(args, path)
        else:
            argv = [sys.executable, "-m", "benchmarks.compile_report", "--triton", "current", "--json", path,
                    "--jobs", str(args.jobs)] + (["--full"] if args.full else []) + (["--check"] if args.check else [])
            argv += (["--kernel", args.kernel] if args.kernel else []) + [f"--arch={a}" for a in args.arch or ()]
            try:
                env = envs.env_for(minor)
            except RuntimeError as exc:
                print(f"benchmarks.compile_report: triton {minor}: {exc}")
                summary.append((minor, "not installed", None))
                status = max(status, 2)
                continue
            rc = subprocess.run(argv, cwd=_ROOT, env=env).returncode
        status = max(status, rc)
        record = None
        if os.path.isfile(path):
            with open(path) as f:
                record = json.load(f)
        summary.append((minor, "ok" if rc == 0 else f"exit {rc}", record))
    print("\n" + version_summary(summary))
    return status


def version_summary(summary) -> str:
    """One line per Triton version: compiles, failing rows, rows spilling within a stated budget."""
    aot = _rules()
    lines = ["triton    compiles  failing  spilling (budgeted)  seconds  report"]
    for minor, status, record in summary:
        if record is None:
            lines.append(f"{minor:<9} {status}")
            continue
        rows = record["rows"]
        failing = sum(bool(aot.problems(r)) for r in rows)
        budgeted = sum(1 for r in rows if r.get("spill_stores") and not aot.problems(r))
        lines.append(f"{record['triton']:<9} {len(rows):>8}  {failing:>7}  {budgeted:>19}  {record['seconds']:>7}  "
                     f"{'full' if record['full'] else 'representative'}")
    return "\n".join(lines)


def committed_path(version: str) -> str:
    """The committed full sweep for a Triton version (it may not exist)."""
    return default_json(".".join(version.split(".")[:2]), full=True)


def summarize(record: dict, source: str) -> dict:
    """A report in a few lines (for the GPU suite's summary): version, counts, failing and spilling rows."""
    aot = _rules()
    rows = record["rows"]

    def label(r):
        return f"{r['kernel']} [{r['config']}] {r['dtype']} {r['arch']}"

    return {"source": source, "triton": record["triton"], "full": record["full"], "git_commit": record["git_commit"],
            "compiles": len(rows), "failing": [f"{label(r)}: {'; '.join(aot.problems(r))}" for r in rows
                                               if aot.problems(r)],
            "spilling": [f"{label(r)}: {r['spill_stores']} B (budget {r['spill_budget']})" for r in rows
                         if r.get("spill_stores")],
            "tile_notes": record.get("tile_notes", [])}


def _report_here(args, path: str) -> int:
    """Compile with the running Triton; print the table and write the report to ``path``."""
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

    _, specs = _load()
    notes = specs.tile_notes()
    for note in notes:
        print(f"TILES {note}")
    budgets = sorted({f"{r['kernel']} {r['arch']}: <= {r['spill_budget']} B: {r['budget_reason']}"
                      + (" (outside the inner loops, checked)" if r.get("loop_free_spills") else "")
                      for r in rows if r.get("spill_budget")})
    record = {"triton": triton.__version__, "torch": torch.__version__, "git_commit": _git_commit(),
              "host": platform.node(), "ptxas": aot.tool_versions(), "full": args.full, "seconds": round(elapsed, 1),
              "note": "compiler figures for sm_90 / sm_80 from a CPU machine (ptxas -v, metadata, SASS); no GPU",
              "tile_notes": notes, "spill_budgets": budgets, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
