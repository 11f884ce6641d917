"""Turn one lent GPU into every figure, inside one time budget:

    benchmarks/device_wheels.sh                               # here, with PyPI: the wheels the image lacks
    python -m benchmarks.gpu_suite --budget 480 --out DIR     # there: carry .whl, DIR comes back
    python -m benchmarks.gpu_suite --dry-run --out DIR        # CPU: the same stages at smoke sizes (CI)

Setup installs the carried wheels (.whl/, when present) into a target folder put on PYTHONPATH and the
project with `pip install --no-deps --no-build-isolation -e .`, then prints the device, the versions and
the peaks measured in this run (bf16 matmul TFLOP/s, device-to-device copy GB/s). The stages follow in
priority order, each with its own time slice (seconds on an H100/H200):

    a  correctness    120  pytest -m gpu, then the kernel parity tests natively on CUDA
    b  sync_step       40  one training step per mode under torch.cuda.set_sync_debug_mode("error")
    t  torch_compile   60  one patched QLoRA / LoRA step, eager vs torch.compile(backend="inductor"): graph
                           breaks (torch._dynamo.explain), step times, first-step compile time (benchmarks.compile_step)
    c  kernels        100  python -m benchmarks.kernels --op OP at the DESIGN.md target shapes, per op,
                           then python -m benchmarks.compile_report for this run's Triton (setup attaches
                           the committed sweep of that version: suite.json "compile", summary.md)
    d  e2e_qlora_8b   150  Llama-3.1-8B shape, QLoRA r16, packed 4096: fastsft, hf, hf+liger (+ hf-packed)
    e  e2e_full_1b     60  Llama-3.2-1B shape, full fine-tuning: fastsft, hf, hf+liger
    p  plan_check      60  `fastsft plan` (traced on the CPU) next to every e2e run's max_memory_allocated
    f  max_context   rest  the max-context search (8B QLoRA, fastsft and hf), if time is left
    u  unsloth       rest  the unsloth provider on stage d's model (last: its import patches the stacks)

A stage that no longer fits the budget (less left than its minimum) is skipped and the summary says so.
DIR receives suite.json (every result: environment, peaks, stages, kernel and e2e payloads), summary.md
(every figure with its ratio to the baseline and to the measured peak; failures with their last lines),
kernels.png, e2e.png and suite.log: five files, rewritten after every stage, so a kill at the time limit
loses only the stage in flight. The exit status is 0 even when stages fail (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_TAIL_LINES = 25
LOG_KEEP_BYTES = 400_000  # per command in suite.log (the file must stay far below the 16 MiB limit)
GRACE_S = 8  # a command's own deadline comes this much before the suite kills it
# priority order; each op's slice (s) inside stage c's
KERNEL_OPS = (("linear_cross_entropy", 25), ("lora_linear", 20), ("varlen_attention", 20),
              ("cross_entropy", 10), ("rms_norm", 8), ("rope", 8), ("swiglu", 8))


@dataclass
class Command:
    label: str
    argv: List[str]
    slice_s: Optional[float] = None  # None: what is left of the stage
    env: dict = field(default_factory=dict)


@dataclass
class Stage:
    key: str
    name: str
    slice_s: Optional[float]  # None: what is left of the budget
    min_s: float
    what: str
    commands: Callable[["Suite", float], List[Command]]


# ---------------------------------------------------------------- stage commands
def _py(*args) -> List[str]:
    return [sys.executable, *args]


def _pytest(*args) -> List[str]:
    # -P: the repository root stays off sys.path, or kernels/ would import as a top-level `kernels`
    return _py("-P", "-m", "pytest", "-p", "no:cacheprovider", "-q", *args)


def _xdist() -> List[str]:
    import importlib.util

    return ["-n", "8"] if importlib.util.find_spec("xdist") is not None else []


def correctness_commands(suite: "Suite", budget: float) -> List[Command]:
    if suite.dry_run:
        # CPU: one file's GPU cases (collected, skipped) and two of its parity tests through the interpreter
        return [Command("pytest gpu + parity (rms_norm)",
                        _pytest("tests/kernels/test_norm.py", "-n", "0", "-k",
                                "real_sizes_gpu or non_contiguous_input or no_weight_grad"))]
    return [Command("pytest -m gpu", _pytest("-m", "gpu", "tests", *_xdist()), slice_s=0.5 * budget),
            Command("kernel parity (CUDA)", _pytest("-m", "not gpu", "tests/kernels", *_xdist()))]


def sync_step_commands(suite: "Suite", budget: float) -> List[Command]:
    if suite.dry_run:  # the CPU reference ops: the kernels' interpreter runs are stage a's and c's business
        return [Command("sync_step", _py("-m", "benchmarks.sync_step", "--smoke", "--modes", "qlora"),
                        env={"FASTSFT_TRITON_ON_CPU": "0"})]
    return [Command("sync_step", _py("-m", "benchmarks.sync_step"))]


def kernel_commands(suite: "Suite", budget: float) -> List[Command]:
    out = os.path.join(suite.work, "kernels")
    if suite.dry_run:  # one process for every op: the imports dominate a smoke run
        return [Command("kernels --smoke (all ops)",
                        _py("-m", "benchmarks.kernels", "--op", "all", "--smoke", "--out", out))]
    commands = [Command(f"kernels {op}", _py("-m", "benchmarks.kernels", "--op", op, "--no-plot", "--out", out),
                        slice_s=s) for op, s in KERNEL_OPS]
    if os.path.isfile(os.path.join(REPO_ROOT, "benchmarks", "compile_report.py")):
        # the compile report for this run's Triton (registers, spills, wgmma) beside the timings, with what is
        # left of the slice; the dry run leaves it to its own CPU test (the committed sweep is attached in setup)
        commands.append(Command("compile_report", _py("-m", "benchmarks.compile_report", "--json",
                                                      os.path.join(suite.work, "compile_report.json"))))
    return commands


def _e2e(suite: "Suite", budget: float, out: str, *args) -> List[str]:
    common = ["--out", os.path.join(suite.work, out), "--no-plot", "--time-budget", str(max(1.0, budget - GRACE_S))]
    if suite.model_dir:
        common += ["--model-dir", suite.model_dir]
    if os.path.isfile(suite.peaks_file):
        common += ["--peaks-from", suite.peaks_file]
    if suite.dry_run:
        return _py("-m", "benchmarks.e2e", "--smoke", *common, *args)
    return _py("-m", "benchmarks.e2e", "--seq", "4096", "--steps", "4", "--warmup", "2", *common, *args)


def compile_step_commands(suite, budget):
    out = os.path.join(suite.work, "compile_step.json")
    if suite.dry_run:  # CPU: one mode, backend aot_eager (inductor builds C++ for minutes there)
        return [Command("compile_step --smoke", _py("-m", "benchmarks.compile_step", "--smoke", "--modes", "qlora",
                                                    "--out", out), env={"FASTSFT_TRITON_ON_CPU": "0"})]
    return [Command("compile_step inductor", _py("-m", "benchmarks.compile_step", "--out", out))]


def e2e_qlora_commands(suite, budget):
    return [Command("e2e llama-3.1-8b qlora", _e2e(suite, budget, "e2e", "--model", "llama-3.1-8b", "--mode", "qlora",
                                                   "--task", "throughput",
                                                   "--providers", "fastsft,hf,hf+liger,hf-packed"))]


def e2e_full_commands(suite, budget):
    # the dry run leaves hf out here (stage d has run its recipe): one worker fewer on a 2-core CI machine
    providers = "fastsft,hf+liger" if suite.dry_run else "fastsft,hf,hf+liger"
    return [Command("e2e llama-3.2-1b full", _e2e(suite, budget, "e2e", "--model", "llama-3.2-1b", "--mode", "full",
                                                  "--task", "throughput", "--providers", providers))]


def max_context_commands(suite, budget):
    if suite.dry_run:  # one provider, both offload settings: the plumbing, cheaply
        return [Command("e2e max context", _e2e(suite, budget, "e2e", "--task", "max-context", "--providers",
                                                "fastsft", "--max-context-offload", "both"))]
    per = max(10.0, (budget - 120) / 2)  # two providers; model loads not counted in the search budget
    return [Command("e2e max context", _e2e(suite, budget, "e2e", "--model", "llama-3.1-8b", "--mode", "qlora",
                                            "--task", "max-context", "--providers", "fastsft,hf",
                                            "--max-context-offload", "off", "--max-context-budget", f"{per:.0f}"))]


def plan_check_commands(suite, budget):
    """The planner's traced peak for every e2e run of stages d and e, next to the measured one (CPU work)."""
    return [Command("plan vs measured", _py("-m", "benchmarks.plan_check", "--e2e-dir",
                                            os.path.join(suite.work, "e2e"), "--out",
                                            os.path.join(suite.work, "plan_check.json"),
                                            "--budget", f"{max(5.0, budget - GRACE_S - 10):.0f}"))]


def unsloth_commands(suite, budget):
    return [Command("e2e unsloth", _e2e(suite, budget, "e2e_unsloth", "--model", "llama-3.1-8b", "--mode", "qlora",
                                        "--task", "throughput", "--providers", "unsloth"))]


STAGES = (
    Stage("a", "correctness", 120, 30, "pytest -m gpu and the kernel parity tests on CUDA", correctness_commands),
    Stage("b", "sync_step", 40, 15, "one training step per mode under set_sync_debug_mode('error')",
          sync_step_commands),
    Stage("c", "kernels", 100, 30, "every op against its providers at the DESIGN.md target shapes", kernel_commands),
    Stage("t", "torch_compile", 60, 30, "one patched training step, eager vs torch.compile(backend='inductor')",
          compile_step_commands),
    Stage("d", "e2e_qlora_8b", 150, 90, "Llama-3.1-8B shape, QLoRA r16, packed 4096", e2e_qlora_commands),
    Stage("e", "e2e_full_1b", 60, 40, "Llama-3.2-1B shape, full fine-tuning", e2e_full_commands),
    Stage("p", "plan_check", 60, 20, "fastsft plan's traced peak vs each e2e run's max_memory_allocated",
          plan_check_commands),
    Stage("f", "max_context", None, 60, "longest trainable sequence, 8B QLoRA", max_context_commands),
    Stage("u", "unsloth", None, 60, "Unsloth on the 8B QLoRA run", unsloth_commands),
)


# ---------------------------------------------------------------- the run
class Suite:
    def __init__(self, args):
        self.args = args
        self.dry_run = args.dry_run
        self.out = os.path.abspath(args.out)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="fastsft-gpu-suite-"))
        # None: benchmarks.e2e's default ($FASTSFT_BENCH_MODELS, else /dev/shm), shared by stages d, f and u
        self.model_dir = os.path.join(self.work, "models") if self.dry_run else args.model_dir
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.report = {"kind": "gpu_suite", "dry_run": self.dry_run, "budget_s": args.budget,
                       "setup": [], "environment": None, "peaks": None, "compile": None, "stages": [], "kernels": [],
                       "e2e": []}
        self.log_parts: List[str] = []
        self.peaks_file = os.path.join(self.work, "peaks.json")  # the e2e stages reuse this run's peaks
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # ------------------------------------------------------------ processes
    def run(self, label: str, argv: List[str], timeout: float, env_extra: Optional[dict] = None) -> dict:
        """Run argv from the repository root with a hard timeout; keep its output's tail."""
        env = dict(self.env, **(env_extra or {}))
        t0 = time.monotonic()
        print(f"[gpu_suite] {label}: {' '.join(argv[1:]) if argv[0] == sys.executable else ' '.join(argv)} "
              f"(up to {timeout:.0f} s)", flush=True)
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(1.0, timeout))
            rc, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            output, _ = proc.communicate()
            rc, timed_out = None, True
        seconds = time.monotonic() - t0
        output = output or ""
        self.log_parts.append(f"===== {label} (rc {rc}{', timed out' if timed_out else ''}, {seconds:.1f} s)\n"
                              f"$ {' '.join(argv)}\n{output[-LOG_KEEP_BYTES:]}\n")
        tail = "\n".join(output.rstrip().splitlines()[-LOG_TAIL_LINES:])
        status = "ok" if rc == 0 else ("timed out" if timed_out else f"failed (exit {rc})")
        print(f"[gpu_suite] {label}: {status} in {seconds:.1f} s", flush=True)
        return {"label": label, "status": status, "seconds": round(seconds, 1), "timeout_s": round(timeout, 1),
                "tail": tail, "output": output}

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        wheels = os.path.join(REPO_ROOT, self.args.wheels)
        site = os.path.abspath(self.args.site)
        found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
        if self.dry_run or self.args.no_install:
            why = "dry run" if self.dry_run else "--no-install"
            self.report["setup"].append({"label": "install", "status": f"skipped ({why})",
                                         "would_run": f"pip install --no-index --no-deps --target {site} "
                                                      f"{self.args.wheels}/*.whl ({len(found)} wheels); pip "
                                                      f"install --no-deps --no-build-isolation -e ."})
        else:
            if found:
                res = self.run("install wheels", _py("-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                     "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                                     site, *found), timeout=min(180, self.left()))
                self._setup_result(res)
                if res["status"] == "ok":
                    path = self.env.get("PYTHONPATH")
                    self.env["PYTHONPATH"] = site + (os.pathsep + path if path else "")
            else:
                self.report["setup"].append({"label": "install wheels", "status": f"skipped (no {wheels}/*.whl; "
                                             "run benchmarks/device_wheels.sh where PyPI is reachable)"})
            res = self.run("install project", _py("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                                  "-e", "."), timeout=min(180, self.left()))
            self._setup_result(res)
        res = self.run("environment + peaks", _py("-m", "benchmarks.gpu_suite", "--internal-peaks"),
                       timeout=min(120, max(10.0, self.left())))
        info = _last_json(res["output"])
        self._setup_result(res)
        if info:
            self.report["environment"], self.report["peaks"] = info["environment"], info["peaks"]
            _write(self.peaks_file, json.dumps(info))
            self.report["compile"] = compile_record(info["environment"].get("triton"))
            env, peaks = info["environment"], info["peaks"]
            print(f"[gpu_suite] device {env.get('device')}; " + ", ".join(
                f"{k} {env.get(k)}" for k in ("torch", "cuda", "triton", "transformers", "peft", "bitsandbytes",
                                              "liger_kernel", "cut_cross_entropy", "unsloth", "flash_attn")))
            if peaks:
                print(f"[gpu_suite] measured peaks: bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s, "
                      f"device-to-device copy {peaks['d2d_copy_gbps']:.0f} GB/s", flush=True)
            else:
                print("[gpu_suite] peaks: no GPU", flush=True)
        self.flush()

    def _setup_result(self, res: dict) -> None:
        self.report["setup"].append({k: v for k, v in res.items() if k != "output"})

    # ------------------------------------------------------------ stages
    def run_stage(self, stage: Stage, selected: bool) -> None:
        record = {"key": stage.key, "name": stage.name, "what": stage.what,
                  "slice_s": stage.slice_s if stage.slice_s is not None else "rest", "min_s": stage.min_s,
                  "commands": []}
        left = self.left()
        if not selected:
            record["status"] = "skipped (not selected with --stages)"
        elif left < stage.min_s and not self.dry_run:
            record["status"] = f"skipped (needs at least {stage.min_s:.0f} s; {max(0.0, left):.0f} s of the budget left)"
            print(f"[gpu_suite] stage {stage.key} {stage.name}: {record['status']}", flush=True)
        else:
            budget = left if stage.slice_s is None else min(stage.slice_s, left)
            if self.dry_run:
                budget = max(budget, 300.0)  # CPU sizes: the GPU slices do not apply
            end = time.monotonic() + budget
            print(f"[gpu_suite] stage {stage.key} {stage.name} ({stage.what}): {budget:.0f} s", flush=True)
            failures = []
            for cmd in stage.commands(self, budget):
                remaining = end - time.monotonic()
                if remaining < 5:
                    record["commands"].append({"label": cmd.label, "status": "skipped (stage slice used up)"})
                    failures.append(cmd.label)
                    continue
                timeout = remaining if cmd.slice_s is None else min(cmd.slice_s, remaining)
                res = self.run(cmd.label, cmd.argv, timeout, cmd.env)
                record["commands"].append({k: v for k, v in res.items() if k != "output"})
                if res["status"] != "ok":
                    failures.append(cmd.label)
            record["status"] = "ok" if not failures else f"failed: {', '.join(failures)}"
            record["seconds"] = round(budget - max(0.0, end - time.monotonic()), 1)
        self.report["stages"].append(record)
        self.collect()
        self.flush()

    def collect(self) -> None:
        """Merge what the stages wrote under the work folder into the report."""
        kernels = []
        for path in sorted(glob.glob(os.path.join(self.work, "kernels", "*.json"))):
            kernels.append(_read_json(path))
        self.report["kernels"] = [k for k in kernels if k]
        payloads = []
        for path in sorted(glob.glob(os.path.join(self.work, "e2e", "e2e_*.json"))):
            payloads.append(_read_json(path))
        extra = [_read_json(p) for p in sorted(glob.glob(os.path.join(self.work, "e2e_unsloth", "e2e_*.json")))]
        self.report["e2e"] = merge_e2e([p for p in payloads if p], [p for p in extra if p])
        compiled = _read_json(os.path.join(self.work, "compile_step.json"))
        if compiled:
            self.report["torch_compile"] = compiled
        checked = _read_json(os.path.join(self.work, "plan_check.json"))
        if checked:
            self.report["plan_vs_measured"] = checked.get("rows", [])
        this_run = _read_json(os.path.join(self.work, "compile_report.json"))
        if this_run and self.report.get("compile") is not None:
            self.report["compile"]["this_run"] = _compile_report_module().summarize(
                this_run, "this run (stage c, representative set)")

    def flush(self) -> None:
        """Rewrite the five files in DIR (atomically each)."""
        self.report["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        _write(os.path.join(self.out, "suite.json"), json.dumps(self.report, indent=1))
        _write(os.path.join(self.out, "summary.md"), summary_markdown(self.report))
        _write(os.path.join(self.out, "suite.log"), "".join(self.log_parts))
        for name, fn in (("kernels.png", plot_kernels), ("e2e.png", plot_e2e)):
            try:
                fn(self.report, os.path.join(self.out, name))
            except Exception as exc:  # a plot must never cost the numbers
                self.report.setdefault("plot_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:300]


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_json(output: str) -> Optional[dict]:
    for line in reversed((output or "").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def merge_e2e(payloads: list, extra: list) -> list:
    """Stage d's payloads with the Unsloth stage's rows added to the matching benchmark (ratios to its hf row)."""
    by_name = {p["benchmark"]: p for p in payloads}
    for p in extra:
        target = by_name.get(p["benchmark"])
        if target is None:
            by_name[p["benchmark"]] = p
            continue
        base = next((r for r in target["results"] if r["provider"] == "hf" and not r.get("error")
                     and not r.get("skipped")), None)
        providers = {r["provider"] for r in p["results"]}
        rows = [r for r in target["results"] if r["provider"] not in providers]
        for r in p["results"]:
            r = dict(r)
            if base and r.get("ms") and base.get("ms"):
                r["speedup_vs_hf"] = base["ms"] / r["ms"]
            if base and r.get("peak_mb") is not None and base.get("peak_mb"):
                r["memory_vs_hf"] = r["peak_mb"] / base["peak_mb"]
            rows.append(r)
        target["results"] = rows
        target.setdefault("merged_from", []).append({"benchmark": p["benchmark"],
                                                     "environment": p.get("environment")})
    return list(by_name.values())


# ---------------------------------------------------------------- summary.md
def _f(v, fmt="{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def summary_markdown(report: dict) -> str:
    env = report.get("environment") or {}
    peaks = report.get("peaks") or {}
    lines = [f"# GPU suite{' (DRY RUN: CPU, smoke sizes, not a measurement)' if report['dry_run'] else ''}", "",
             f"Device: {env.get('device', 'unknown')}; " + ", ".join(
                 f"{k} {env.get(k)}" for k in ("torch", "cuda", "triton", "transformers", "peft", "bitsandbytes",
                                               "liger_kernel", "cut_cross_entropy", "unsloth", "flash_attn")
                 if k in env) + f"; commit {env.get('git_commit')}; {env.get('date')}", ""]
    if peaks:
        lines.append(f"Measured peaks (this run): bf16 matmul **{peaks['bf16_matmul_tflops']:.0f} TFLOP/s**, "
                     f"device-to-device copy **{peaks['d2d_copy_gbps']:.0f} GB/s**.")
    else:
        lines.append("Measured peaks: no GPU.")
    lines += ["", f"Budget {report['budget_s']:.0f} s, elapsed {report.get('elapsed_s', 0):.0f} s.", "",
              "## Stages", "", "| stage | slice (s) | status | seconds | what |", "|---|---:|---|---:|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['key']} {s['name']} | {s['slice_s']} | {s['status']} | {_f(s.get('seconds'), '{:.0f}')} "
                     f"| {s['what']} |")
    lines += (_kernel_lines(report, peaks) + _compile_lines(report) + _torch_compile_lines(report) + _e2e_lines(report)
              + _plan_lines(report))
    failures = [(s["name"], c) for s in report["stages"] for c in s.get("commands", []) if c["status"] != "ok"]
    failures = [("setup", c) for c in report["setup"] if c["status"] not in ("ok",)
                and not c["status"].startswith("skipped")] + failures
    if failures:
        lines += ["", "## Failures", ""]
        for stage, c in failures:
            lines += [f"### {stage}: {c['label']}: {c['status']}", "", "```", c.get("tail", "").strip(), "```", ""]
    return "\n".join(lines) + "\n"


def _compile_report_module():
    # by path: the tests load this file as a plain module, where a relative import has no package
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastsft_compile_report",
                                                  os.path.join(REPO_ROOT, "benchmarks", "compile_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_record(triton_version: Optional[str]) -> dict:
    """The compile report for the Triton this run uses: the committed full sweep for that version
    (benchmarks/results/compile/triton-<minor>.json) summarized; stage c adds this run's own."""
    reports = _compile_report_module()
    committed_path, summarize = reports.committed_path, reports.summarize
    record = {"triton": triton_version, "committed": None, "this_run": None}
    if not triton_version:
        return record
    path = committed_path(triton_version)
    committed = _read_json(path)
    if committed is None:
        record["committed"] = {"source": f"none: no {os.path.relpath(path, REPO_ROOT)} (python -m "
                                         "benchmarks.compile_report --full --triton all writes it)"}
    else:
        record["committed"] = summarize(committed, os.path.relpath(path, REPO_ROOT))
    return record


def _compile_lines(report: dict) -> List[str]:
    rec = report.get("compile")
    if not rec:
        return []
    lines = ["", f"## Compile report (triton {rec.get('triton')})", ""]
    for key in ("committed", "this_run"):
        part = rec.get(key)
        if not part:
            continue
        if "compiles" not in part:
            lines.append(f"- {part['source']}")
            continue
        lines.append(f"- {part['source']} (triton {part['triton']}, commit {str(part['git_commit'])[:10]}, "
                     f"{'full sweep' if part['full'] else 'representative set'}): {part['compiles']} compiles, "
                     f"{len(part['failing'])} failing, {len(part['spilling'])} with spilled bytes")
        lines += [f"  - FAIL {f}" for f in part["failing"]] + [f"  - spills {f}" for f in part["spilling"]]
        lines += [f"  - tiles: {n}" for n in part.get("tile_notes", [])]
    return lines


def _kernel_lines(report: dict, peaks: dict) -> List[str]:
    if not report["kernels"]:
        return []
    lines = ["", "## Kernels", "", "| op | case | pass | provider | ms | rate | vs baseline | of peak | peak MB | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for payload in report["kernels"]:
        base = (payload.get("config") or {}).get("baseline", "torch")
        for r in payload["results"]:
            rate, of_peak = "-", "-"
            if r.get("tflops") is not None:
                rate = f"{r['tflops']:.1f} TFLOP/s"
                if peaks.get("bf16_matmul_tflops"):
                    of_peak = f"{100 * r['tflops'] / peaks['bf16_matmul_tflops']:.0f}%"
            elif r.get("gbps") is not None:
                rate = f"{r['gbps']:.0f} GB/s"
                if peaks.get("d2d_copy_gbps"):
                    of_peak = f"{100 * r['gbps'] / peaks['d2d_copy_gbps']:.0f}%"
            ratio = r.get(f"speedup_vs_{base}")
            note = r.get("error") or (r.get("extra") or {}).get("skipped") or r.get("skipped") or ""
            lines.append(f"| {payload['benchmark']} | {r['case']} | {r['mode']} | {r['provider']} | "
                         f"{_f(r.get('ms'), '{:.3f}')} | {rate} | {_f(ratio, '{:.2f}x')} | {of_peak} | "
                         f"{_f(r.get('peak_mb'), '{:.0f}')} | {str(note).splitlines()[0][:100] if note else ''} |")
    return lines


def _e2e_lines(report: dict) -> List[str]:
    lines = []
    for p in report["e2e"]:
        if p.get("kind") == "throughput":
            if not lines:
                lines += ["", "## End to end"]
            lines += ["", f"**{p['benchmark']}**", "",
                      "| provider | trained tok/s | tok/s | step ms | peak GB | MFU | vs hf | memory vs hf | note |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for r in p["results"]:
                note = r.get("skipped") or r.get("error") or ""
                peak = r.get("peak_mb")
                lines.append(f"| {r['provider']} | {_f(r.get('trained_tokens_per_s'), '{:,.0f}')} | "
                             f"{_f(r.get('tokens_per_s'), '{:,.0f}')} | {_f(r.get('ms'), '{:,.1f}')} | "
                             f"{_f(peak / 1024 if peak is not None else None, '{:.2f}')} | "
                             f"{_f(100 * r['mfu'] if r.get('mfu') is not None else None, '{:.1f}%')} | "
                             f"{_f(r.get('speedup_vs_hf'), '{:.2f}x')} | {_f(r.get('memory_vs_hf'), '{:.2f}x')} | "
                             f"{str(note).splitlines()[0][:100] if note else ''} |")
        elif p.get("kind") == "max_context":
            lines += ["", f"**{p['benchmark']}**", "", "| provider | mode | longest trained | first OOM | vs hf | note |",
                      "|---|---|---:|---:|---:|---|"]
            for r in p["results"]:
                note = r.get("skipped") or r.get("error") or ""
                lines.append(f"| {r['provider']} | {r.get('mode')} | {_f(r.get('max_seq'), '{:,}')} | "
                             f"{_f(r.get('first_oom'), '{:,}')} | {_f(r.get('context_vs_hf'), '{:.2f}x')} | "
                             f"{str(note).splitlines()[0][:100] if note else ''} |")
    return lines


def _torch_compile_lines(report: dict) -> List[str]:
    payload = report.get("torch_compile") or {}
    rows = payload.get("rows") or []
    if not rows:
        return []
    lines = ["", f"## torch.compile of the patched step ({payload.get('device')}, {payload.get('seq')} packed tokens)",
             "", "| mode | backend | graph breaks | eager ms | compiled ms | speedup | first compiled step s | "
                 "loss rel. diff | status |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = (lambda v: _f(v * 1e3 if v is not None else None, "{:.1f}"))
        lines.append(f"| {r['mode']} | {r.get('backend')} | {r.get('graph_breaks', '-')} | {ms(r.get('eager_step_s'))} | "
                     f"{ms(r.get('compiled_step_s'))} | {_f(r.get('speedup'), '{:.2f}')} | "
                     f"{_f(r.get('first_compiled_step_s'), '{:.1f}')} | {_f(r.get('loss_rel_diff'), '{:.1e}')} | "
                     f"{str(r.get('status'))[:80]} |")
    return lines


def _plan_lines(report: dict) -> List[str]:
    rows = report.get("plan_vs_measured") or []
    if not rows:
        return []
    lines = ["", "## Planned (traced on the CPU) vs measured peak memory", "",
             "| case | provider | measured GB | planned GB | planned / measured | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        note = r.get("skipped") or r.get("error") or ""
        plan = r.get("plan_peak_mb")
        lines.append(f"| {r['case']} | {r['provider']} | {r['measured_peak_mb'] / 1024:.2f} | "
                     f"{_f(plan / 1024 if plan is not None else None, '{:.2f}')} | "
                     f"{_f(r.get('plan_over_measured'), '{:.3f}')} | {str(note)[:100]} |")
    return lines


# ---------------------------------------------------------------- plots
def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    return plt, fig, [ax for row in axes for ax in row]


def plot_kernels(report: dict, path: str) -> None:
    """One panel per op: forward+backward time per case, one bar per provider (log scale)."""
    payloads = [p for p in report["kernels"] if any(r.get("ms") for r in p["results"])]
    if not payloads:
        return
    plt, fig, axes = _figure(len(payloads))
    for ax, p in zip(axes, payloads):
        rows = [r for r in p["results"] if r.get("ms") and r["mode"] == "full"]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            values = [next((r["ms"] for r in rows if r["case"] == c and r["provider"] == prov), 0) for c in cases]
            ax.bar([k + i * width for k in range(len(cases))], values, width=width, label=prov)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
        ax.set_xticklabels([c[:28] for c in cases], fontsize=6, rotation=15)
        ax.set_yscale("log")
        ax.set_title(f"{p['benchmark']}: fwd+bwd ms (lower is better)", fontsize=8)
        ax.legend(fontsize=6)
    _finish_figure(plt, fig, axes[len(payloads):], report, path)


def plot_e2e(report: dict, path: str) -> None:
    """One panel per e2e benchmark: trained tokens/s (throughput) or longest sequence (max context)."""
    payloads = report["e2e"]
    if not payloads:
        return
    plt, fig, axes = _figure(len(payloads))
    for ax, p in zip(axes, payloads):
        key, title = (("trained_tokens_per_s", "trained tokens/s") if p.get("kind") == "throughput"
                      else ("max_seq", "longest sequence"))
        rows = [r for r in p["results"] if r.get(key)]
        labels = [r["provider"] + (f" {r['mode']}" if p.get("kind") == "max_context" else "") for r in rows]
        bars = ax.bar(range(len(rows)), [r[key] for r in rows])
        ax.bar_label(bars, labels=[f"{r[key]:,.0f}" for r in rows], fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        if not rows:
            ax.text(0.5, 0.5, "no provider measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{p['benchmark']}: {title}", fontsize=8)
    _finish_figure(plt, fig, axes[len(payloads):], report, path)


def _finish_figure(plt, fig, unused_axes, report: dict, path: str) -> None:
    """Blank the unused panels, title the figure, and write it atomically (a kill never leaves half a PNG)."""
    for ax in unused_axes:
        ax.axis("off")
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _title(report: dict) -> str:
    env = report.get("environment") or {}
    return f"{env.get('device', '?')}{' (dry run, CPU smoke sizes)' if report['dry_run'] else ''}"


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything, setup included (default 480)")
    p.add_argument("--out", help="folder for suite.json, summary.md, kernels.png, e2e.png, suite.log")
    p.add_argument("--dry-run", action="store_true", help="CPU: the same stages at smoke sizes (used by CI)")
    p.add_argument("--stages", default=",".join(s.key for s in STAGES),
                   help="comma-separated stage letters or names to run (default all: " +
                        ", ".join(f"{s.key}={s.name}" for s in STAGES) + ")")
    p.add_argument("--wheels", default=".whl", help="folder of carried wheels, relative to the repository")
    p.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "fastsft-site"),
                   help="target folder the wheels are installed into (put on PYTHONPATH)")
    p.add_argument("--no-install", action="store_true", help="install neither the wheels nor the project")
    p.add_argument("--work", default=None, help="folder for the stages' raw outputs (default: a temporary one)")
    p.add_argument("--model-dir", default=None, help="folder for the saved random-weight checkpoints")
    p.add_argument("--internal-peaks", action="store_true", help=argparse.SUPPRESS)
    return p


def _internal_peaks() -> int:
    from . import common

    peaks = dict(common.device_peaks()) if common.has_cuda() else None
    print(json.dumps({"environment": common.environment(), "peaks": peaks}))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.internal_peaks:
        return _internal_peaks()
    if not args.out:
        parser.error("--out is required")
    if args.budget <= 0:
        parser.error(f"--budget must be positive; got {args.budget}")
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    known = {s.key for s in STAGES} | {s.name for s in STAGES}
    if wanted - known:
        parser.error(f"--stages: unknown {sorted(wanted - known)}; choose from " +
                     ", ".join(f"{s.key} ({s.name})" for s in STAGES))
    suite = Suite(args)
    print(f"[gpu_suite] budget {args.budget:.0f} s; results in {suite.out}; raw outputs in {suite.work}"
          f"{'; DRY RUN (CPU, smoke sizes)' if suite.dry_run else ''}", flush=True)
    try:
        suite.setup()
        for stage in STAGES:
            suite.run_stage(stage, selected=stage.key in wanted or stage.name in wanted)
    finally:
        suite.flush()
        if not args.work:
            shutil.rmtree(suite.work, ignore_errors=True)
    failed = [s for s in suite.report["stages"] if s["status"].startswith("failed")]
    skipped = [s for s in suite.report["stages"] if s["status"].startswith("skipped")]
    print(f"[gpu_suite] done in {time.monotonic() - suite.t0:.0f} s: {len(suite.report['stages']) - len(failed) - len(skipped)}"
          f" stage(s) ok, {len(failed)} failed, {len(skipped)} skipped; see {os.path.join(suite.out, 'summary.md')}")
    for s in failed + skipped:
        print(f"[gpu_suite]   {s['key']} {s['name']}: {s['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
