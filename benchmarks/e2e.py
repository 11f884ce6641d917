"""End-to-end fine-tuning benchmark: fastsft against transformers + peft (with and without Liger-Kernel,
with padding-free flash-attn packing) and Unsloth, on the same GPU, same documents, same LoRA/QLoRA settings.

    python -m benchmarks.e2e --model llama-3.1-8b --mode qlora --seq 4096    # throughput, memory, MFU
    python -m benchmarks.e2e --model llama-3.1-8b --mode qlora --max-context # longest trainable sequence
    python -m benchmarks.e2e --suite                                         # the README's whole matrix
    python -m benchmarks.e2e --smoke                                         # tiny CPU run of the same code

Every provider runs in its own subprocess (a clean peak-memory reading, a crash or OOM stays contained);
the parent collects one JSON line per job, prints a table and writes JSON + PNG under
benchmarks/results/<gpu>/ (or --out). `python -m benchmarks.render_table` turns the JSON into the
README's table. Models have random weights built from the published configs (nothing is downloaded),
saved once to a local folder (--model-dir) that every provider loads the way its users would; fastsft's
through the trainer's own builder, fastsft.train.model.load_model.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from . import common
from .e2e_search import ProbeError, search_max_length

_T0 = time.monotonic()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARK = "@@e2e-result@@ "
PROVIDER_NAMES = ("hf", "hf+liger", "hf-packed", "fastsft", "unsloth")
# the README's matrix (--suite): throughput runs, then the max-context search
SUITE = (
    {"model": "llama-3.2-1b", "mode": "full", "max_context": False},
    {"model": "llama-3.1-8b", "mode": "lora", "max_context": False},
    {"model": "llama-3.1-8b", "mode": "qlora", "max_context": False},
    {"model": "llama-3.1-8b", "mode": "qlora", "max_context": True},
)
SMOKE = {"model": "tiny-llama", "seq": 256, "doc_median": 48, "warmup": 1, "steps": 2, "max_context_start": 64,
         "max_context_cap": 128, "max_context_granularity": 16, "worker_timeout": 300}


def build_parser() -> argparse.ArgumentParser:
    from .e2e_models import ARCHS, MODES

    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", choices=sorted(ARCHS), help="architecture (random weights)")
    p.add_argument("--mode", default="qlora", choices=MODES, help="full fine-tuning, LoRA, or QLoRA (NF4 base)")
    p.add_argument("--seq", type=int, default=4096,
                   help="tokens per step: packed row length; hf pads the same documents")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (compilation, autotuning, allocator)")
    p.add_argument("--providers", default=",".join(PROVIDER_NAMES),
                   help="comma-separated subset of " + ", ".join(PROVIDER_NAMES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc-median", type=int, default=600, help="median document length of the synthetic SFT mix")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--grad-ckpt", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing (auto: on for the 7B/8B models)")
    p.add_argument("--offload", action="store_true", help="throughput run: checkpointed layer inputs offloaded to CPU")
    p.add_argument("--precision", choices=("bf16",), default="bf16",
                   help="bf16 mixed precision as `fastsft train --precision bf16` and the Trainer's bf16=True run "
                        "it: torch.autocast(bf16); full fine-tuning keeps fp32 weights, LoRA a bf16 base with fp32 "
                        "adapters, QLoRA an NF4 base. The CPU smoke run uses fp32.")
    p.add_argument("--task", choices=("throughput", "max-context", "both"), default=None,
                   help="what to measure (default: throughput, or max-context with --max-context; both with "
                        "--smoke)")
    p.add_argument("--model-dir", default=None,
                   help="folder for the saved random-weight checkpoints (default $FASTSFT_BENCH_MODELS, else "
                        "/dev/shm/fastsft-bench-models; --smoke: a temporary folder)")
    p.add_argument("--max-context", action="store_true",
                   help="instead of throughput: longest single sequence (batch 1) each provider trains, "
                        "with activation checkpointing, without and with offload")
    p.add_argument("--max-context-offload", choices=("both", "off", "on"), default="both")
    p.add_argument("--max-context-start", type=int, default=4096)
    p.add_argument("--max-context-cap", type=int, default=None,
                   help="longest length tried (default: the model's max positions)")
    p.add_argument("--max-context-granularity", type=int, default=1024)
    p.add_argument("--max-context-budget", type=float, default=150.0,
                   help="seconds of probing per provider and offload setting (model build not counted)")
    p.add_argument("--suite", action="store_true", help="run the README matrix: " + "; ".join(
        f"{s['model']} {s['mode']}{' max-context' if s['max_context'] else ''}" for s in SUITE))
    p.add_argument("--smoke", action="store_true",
                   help="tiny config on the CPU, a few steps per provider that can run there (fixes --model, --seq, "
                        "--steps, --warmup, --doc-median and --max-context-*); writes files only with --out")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<gpu>/)")
    p.add_argument("--no-plot", action="store_true", help="write JSON only")
    p.add_argument("--worker-timeout", type=float, default=1800.0,
                   help="seconds before a provider's subprocess is killed")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run (the GPU suite's slice): a provider that no longer fits is "
                        "recorded as skipped, a running one is stopped at the deadline, and the results so far "
                        "are written before it")
    p.add_argument("--peaks-from", default=None,
                   help="JSON with the environment and peaks measured earlier in this session (the GPU suite's), "
                        "instead of measuring them again")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run jobs from a JSON spec
    return p


# ====================================================================== parent side
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return _worker_main(args.worker)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDER_NAMES]
    if unknown or not providers:
        build_parser().error(f"--providers: unknown {unknown}; choose from {', '.join(PROVIDER_NAMES)}")
    for name in ("seq", "steps", "warmup", "doc_median", "lora_rank", "lora_alpha", "max_context_start",
                 "max_context_granularity"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            build_parser().error(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    elif not common.has_cuda():
        print("benchmarks.e2e needs a CUDA GPU; none found. Use --smoke for a tiny CPU run.")
        return 0
    task = args.task or ("both" if args.smoke else ("max-context" if args.max_context else "throughput"))
    # max_context: False = throughput only, True = max context only, None = both
    runs = [dict(model=args.model, mode=args.mode,
                 max_context={"throughput": False, "max-context": True, "both": None}[task])]
    if args.suite and not args.smoke:
        runs = [dict(s) for s in SUITE]

    device = "cuda" if (common.has_cuda() and not args.smoke) else "cpu"
    args.deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    temporary = None
    if args.model_dir is None:
        if args.smoke:
            import tempfile

            temporary = tempfile.mkdtemp(prefix="fastsft-e2e-smoke-")
            args.model_dir = temporary
        else:
            from .e2e_models import default_model_root

            args.model_dir = default_model_root()
    try:
        measured = _measure_environment(args, device)
        status = 0
        for run in runs:
            status |= _run_one(args, run, providers, device, measured)
        return status
    finally:
        if temporary:
            import shutil

            shutil.rmtree(temporary, ignore_errors=True)


def _measure_environment(args, device: str) -> dict:
    """Device name, versions and the bf16 matmul peak, measured in a subprocess so that the parent
    never holds GPU memory while the providers run. On the CPU, the parent fills in the environment
    later (while the workers import)."""
    if device != "cuda":
        return {"environment": None, "peaks": None}
    if args.peaks_from:
        with open(args.peaks_from) as f:
            given = json.load(f)
        if given.get("peaks"):
            given["environment"] = dict(given["environment"], git_commit=common.git_commit())
            return {"environment": given["environment"],
                    "peaks": {**given["peaks"], "device_slug": common.device_slug_of(given["environment"]["device"])}}
    jobs = [{"task": "peaks"}]
    res = _collect(_start(args, jobs), jobs, timeout=600)[0]
    if "error" in res:
        raise RuntimeError(f"measuring the device peaks failed: {res['error']}")
    return {"environment": res["environment"], "peaks": {**res["peaks"], "device_slug": res["device_slug"]}}


def _run_one(args, run: dict, providers: list, device: str, measured: dict) -> int:
    """One benchmark (a model, a mode, throughput and/or max context) over all providers."""
    base = _base_job(args, run, device)
    _save_model(args, base, providers)
    offloads = {"both": [False, True], "off": [False], "on": [True]}[args.max_context_offload]
    rows, groups = _plan(args, run, providers, device, base, offloads)
    rows += _execute(args, groups, measured)
    if measured["environment"] is None:
        measured["environment"] = common.environment()
    order = {name: i for i, name in enumerate(providers)}
    rows.sort(key=lambda r: (order[r["provider"]], bool(r.get("offload"))))
    throughput = [r for r in rows if r["task"] == "throughput"]
    max_context = [r for r in rows if r["task"] == "max_context"]
    config = {k: v for k, v in base.items() if not k.startswith("max_context")}
    env_info, peaks = measured["environment"], measured["peaks"]
    status = 0
    if throughput:
        records = _throughput_records(throughput, run, args, peaks)
        print(f"== e2e throughput: {run['model']} {run['mode']} seq {args.seq} on {env_info.get('device')}")
        common.print_table(records, columns=("provider", "ms", "tokens_per_s", "trained_tokens_per_s", "peak_mb",
                                             "tflops", "mfu", "error", "skipped"))
        status |= _check(records, args)
        _write(args, f"e2e_{run['model']}_{run['mode']}_seq{args.seq}", "throughput",
               dict(config, **_throughput_config(run, args)), records, env_info, peaks)
    if max_context:
        records = _max_context_records(max_context, run)
        print(f"== e2e max context: {run['model']} {run['mode']} batch 1 on {env_info.get('device')}")
        common.print_table(records, columns=("provider", "mode", "max_seq", "first_oom", "stopped_by",
                                             "peak_mb", "error", "skipped"))
        status |= _check(records, args)
        mc_config = dict(config, task="max_context", seq=None, steps=None, warmup=None, doc_median=None,
                         grad_ckpt=True, offload=args.max_context_offload,
                         batch="one document of the probed length",
                         **{k: v for k, v in base.items() if k.startswith("max_context")})
        _write(args, f"e2e_{run['model']}_{run['mode']}_max_context", "max_context", mc_config, records,
               env_info, peaks)
    return status


def _base_job(args, run: dict, device: str) -> dict:
    """The settings every provider's job shares."""
    import torch

    from .e2e_models import get_arch, saved_model_dir

    arch = get_arch(run["model"])
    cap = args.max_context_cap or arch.config.get("max_position_embeddings", 131072)
    save_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return dict(model=run["model"], mode=run["mode"], seq=args.seq, steps=args.steps, warmup=args.warmup,
                seed=args.seed, doc_median=args.doc_median, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                model_dir=saved_model_dir(args.model_dir, run["model"], args.seed, save_dtype),
                device=device, precision="fp32" if device == "cpu" else args.precision,
                grad_ckpt={"on": True, "off": False, "auto": arch.grad_ckpt_default}[args.grad_ckpt],
                offload=args.offload, max_context_start=args.max_context_start, max_context_cap=int(cap),
                max_context_granularity=args.max_context_granularity, max_context_budget=args.max_context_budget)


def _time_left(args) -> float:
    return float("inf") if args.deadline is None else args.deadline - time.monotonic()


def _save_model(args, base: dict, providers: list) -> None:
    """The random-weight checkpoint every provider loads, saved once (in a worker on a GPU, so that the
    parent never holds device memory; in this process for the CPU smoke run)."""
    from .e2e_models import is_saved
    from .e2e_providers import PROVIDERS

    if is_saved(base["model_dir"]) or all(PROVIDERS[n].unavailable(base["device"]) for n in providers):
        return
    job = {"task": "save_model", "model": base["model"], "seed": base["seed"], "device": base["device"],
           "model_dir": base["model_dir"]}
    t0 = time.monotonic()
    if base["device"] == "cpu":
        _job_save_model(job)
    else:
        res = _collect(_start(args, [job]), [job], timeout=min(args.worker_timeout, max(1.0, _time_left(args))))[0]
        if "error" in res:
            raise RuntimeError(f"saving the random-weight {base['model']} failed: {res['error']}")
    print(f"[e2e] saved random-weight {base['model']} to {base['model_dir']} in {time.monotonic() - t0:.0f} s",
          file=sys.stderr, flush=True)


def _plan(args, run: dict, providers: list, device: str, base: dict, offloads: list):
    """Rows for the providers that cannot run here, and (provider, jobs) groups, one subprocess each."""
    from .e2e_providers import PROVIDERS

    rows, groups = [], []
    for name in providers:
        jobs = []
        if run["max_context"] is not True:
            jobs.append(dict(base, task="throughput", provider=name))
        if run["max_context"] is not False:
            jobs += [dict(base, task="max_context", provider=name, offload=o, grad_ckpt=True) for o in offloads]
        reason = PROVIDERS[name].unavailable(device)
        if not reason and name == "unsloth":
            # its "unsloth" gradient checkpointing already keeps the checkpointed activations on the CPU
            own = [j for j in jobs if j["task"] == "max_context" and j["offload"]]
            rows += [{"provider": name, "task": j["task"], "offload": True, "skipped": "Unsloth's own gradient "
                      "checkpointing offloads to the CPU already: see its ckpt row"} for j in own]
            jobs = [j for j in jobs if j not in own]
        if reason:
            print(f"[e2e] {name}: skipped ({reason})", file=sys.stderr)
            rows += [{"provider": name, "task": j["task"], "offload": j["offload"], "skipped": reason} for j in jobs]
        # one subprocess per job, one at a time, on a GPU (clean memory, undisturbed timing); the smoke run
        # gives each provider one subprocess and runs them side by side (its timings mean nothing)
        elif args.smoke:
            groups.append((name, jobs))
        else:
            groups += [(name, [j]) for j in jobs]
    return rows, groups


def _execute(args, groups: list, measured: dict) -> list:
    """Run the job groups in worker subprocesses; one row per job."""
    if args.smoke:
        if groups and measured["environment"] is None:
            # the versions need transformers & co. imported: a worker has them anyway
            groups[0] = (groups[0][0], groups[0][1] + [{"task": "environment"}])
        started = [(name, jobs, _start(args, jobs)) for name, jobs in groups]
        finished = [(name, jobs, _collect(proc, jobs, args.worker_timeout)) for name, jobs, proc in started]
    else:
        finished = []
        for name, jobs in groups:
            left = _time_left(args)
            if left < 15:  # not even a model load fits
                why = f"out of time: {max(0.0, left):.0f} s of --time-budget left"
                print(f"[e2e] {name}: skipped ({why})", file=sys.stderr, flush=True)
                finished.append((name, jobs, [{"skipped": why} for _ in jobs]))
                continue
            finished.append((name, jobs, _collect(_start(args, jobs), jobs, min(args.worker_timeout, left))))
    rows = []
    for name, jobs, results in finished:
        for job, res in zip(jobs, results):
            if job["task"] == "environment":
                measured["environment"] = res.get("environment")
                continue
            rows.append({**res, "provider": name, "task": job["task"], "offload": job["offload"]})
    return rows


def _job_label(job: dict) -> str:
    if job["task"] == "max_context":
        return "max context" + (" + offload" if job["offload"] else "")
    return job["task"]


def _start(args, jobs: list) -> subprocess.Popen:
    """Start `python -m benchmarks.e2e --worker` on `jobs`."""
    if jobs[0]["task"] not in ("peaks", "save_model"):
        print(f"[e2e] {jobs[0]['provider']}: {', '.join(_job_label(j) for j in jobs)}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    # fewer, larger free blocks after an OOM probe; identical for every provider
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.smoke:
        env["FASTSFT_TRITON_ON_CPU"] = "0"  # CPU tensors take the PyTorch reference ops
        # tiny matmuls on a shared CPU: extra threads only spin against the other workers
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.e2e", "--worker", json.dumps(jobs)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.started = time.monotonic()
    return proc


def _collect(proc: subprocess.Popen, jobs: list, timeout: float) -> list:
    """Wait for a worker; one result dict per job (an error for each job it did not report)."""
    remaining = max(1.0, timeout - (time.monotonic() - proc.started))
    try:
        stdout, stderr = proc.communicate(timeout=remaining)
        why = f"worker exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        why = f"worker timed out after {timeout:.0f} s"
    found = _parse_results(stdout)
    if len(found) < len(jobs):
        err = f"{why} after {time.monotonic() - proc.started:.0f} s; stderr: {_tail(stderr)}"
        found += [{"error": err} for _ in range(len(jobs) - len(found))]
    return found


def _parse_results(stdout) -> list:
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    return [json.loads(line[len(RESULT_MARK):]) for line in (stdout or "").splitlines() if line.startswith(RESULT_MARK)]


def _tail(text, n: int = 1500) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:].strip()


def _throughput_config(run: dict, args) -> dict:
    from .e2e_data import LENGTH_SIGMA
    from .e2e_models import FLOPS_FORMULA, get_arch
    from .e2e_providers import PROVIDERS

    arch = get_arch(run["model"])
    return {"task": "throughput", "architecture_source": arch.source,
            "lora_targets": None if run["mode"] == "full" else "q,k,v,o,gate,up,down",
            "data": f"synthetic SFT documents, log-normal lengths (median {args.doc_median} tokens, "
                    f"sigma {LENGTH_SIGMA}), 10-60% prompt (loss-masked); each step's documents are packed into "
                    f"{args.seq} tokens (fastsft, hf-packed, unsloth) or padded into one row per document "
                    f"(hf, hf+liger)",
            "model": "random weights from the published config, saved once to a local folder; every provider "
                     "loads that folder (fastsft through fastsft.train.model.load_model)",
            "providers": {name: p.description for name, p in PROVIDERS.items()},
            "optimizer": "torch AdamW (foreach) on the trainable parameters, lr 1e-5",
            "timing": "wall clock with device synchronisation around each measured step, after warm-up",
            "memory": "torch.cuda.max_memory_allocated over the measured steps (weights, optimizer state and "
                      "activations), after reset_peak_memory_stats",
            "flops_formula": FLOPS_FORMULA}


def _throughput_records(rows: list, run: dict, args, peaks) -> list:
    from .e2e_providers import BASELINE

    case = f"{run['model']}/{run['mode']}/seq{args.seq}"
    peak_tflops = (peaks or {}).get("bf16_matmul_tflops")
    results = []
    for row in rows:
        if "skipped" in row or "error" in row:
            extra = {"skipped": row["skipped"]} if "skipped" in row else {}
            results.append(common.Result(case, row["provider"], "train_step", error=row.get("error"), extra=extra))
            continue
        extra = {k: v for k, v in row.items() if k not in ("provider", "task", "ms", "tflops", "peak_mb")}
        if peak_tflops:
            extra["mfu"] = row["tflops"] / peak_tflops
        results.append(common.Result(case, row["provider"], "train_step", ms=row["ms"], tflops=row["tflops"],
                                     peak_mb=row.get("peak_mb"), extra=extra))
    records = common.add_ratios(results, BASELINE)
    flat = []
    for record in records:
        extra = record.pop("extra", {})
        flat.append({**record, **extra})
    fingerprints = {r["data_fingerprint"] for r in flat if "data_fingerprint" in r}
    if len(fingerprints) > 1:
        raise RuntimeError(f"providers trained on different data (fingerprints {sorted(fingerprints)})")
    return flat


def _max_context_records(rows: list, run: dict) -> list:
    from .e2e_providers import BASELINE

    case = f"{run['model']}/{run['mode']}/max_context"
    records = []
    for row in rows:
        mode = "ckpt+offload" if row.get("offload") else "ckpt"
        record = {"case": case, "provider": row["provider"], "mode": mode}
        for key in ("skipped", "error"):
            if key in row:
                record[key] = row[key]
        if "search" in row:
            s = row["search"]
            record.update(max_seq=s["max_ok"], first_oom=s["min_failed"], stopped_by=s["stopped_by"],
                          search=s, peak_mb=row.get("peak_mb"))
            if s.get("error"):
                record["error"] = s["error"]
        for key in ("attn_implementation", "fastsft_patched", "checkpointing_effective", "model_mb", "versions",
                    "builder"):
            if key in row:
                record[key] = row[key]
        records.append(record)
    base = {r["mode"]: r.get("max_seq") for r in records if r["provider"] == BASELINE}
    for r in records:
        if r.get("max_seq") and base.get(r["mode"]):
            r["context_vs_" + BASELINE] = r["max_seq"] / base[r["mode"]]
    return records


def _check(records: list, args) -> int:
    """Exit status: in --smoke every provider that is not skipped must have run."""
    failed = [r for r in records if r.get("error") and not r.get("skipped")]
    for r in failed:
        print(f"[e2e] {r['provider']} ({r.get('mode')}) failed: {r['error']}", file=sys.stderr)
    return 1 if (args.smoke and failed) else 0


def _write(args, name: str, kind: str, config: dict, records: list, env_info: dict, peaks) -> None:
    if args.smoke and not args.out:
        return
    out_dir = args.out or os.path.join(common.RESULTS_DIR, (peaks or {}).get("device_slug") or common.device_slug())
    os.makedirs(out_dir, exist_ok=True)
    payload = {"benchmark": name, "kind": kind, "environment": env_info, "config": config,
               "peaks": {k: v for k, v in (peaks or {}).items() if k != "device_slug"} or None,
               "smoke": bool(args.smoke), "results": records}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    if not args.no_plot:
        from .render_table import plot

        print(f"wrote {plot(path)}")


# ====================================================================== worker side
def _worker_main(spec: str) -> int:
    jobs = json.loads(spec)
    from .e2e_providers import PROVIDERS

    for name in dict.fromkeys(j["provider"] for j in jobs if "provider" in j):
        try:
            PROVIDERS[name].first_import()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            for _ in jobs:
                print(RESULT_MARK + json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}), flush=True)
            return 0
    for job in jobs:
        try:
            result = JOBS[job["task"]](job)
        except Exception as exc:  # recorded in the results; the parent carries on with the next provider
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        result["worker_clock_s"] = time.monotonic() - _T0
        print(RESULT_MARK + json.dumps(result), flush=True)
        gc.collect()
    return 0


def _job_peaks(job: dict) -> dict:
    return {"environment": common.environment(), "peaks": dict(common.device_peaks()),
            "device_slug": common.device_slug()}


def _job_environment(job: dict) -> dict:
    return {"environment": common.environment()}


def _job_save_model(job: dict) -> dict:
    import torch

    from .e2e_models import get_arch, save_random_model

    dtype = torch.float32 if job["device"] == "cpu" else torch.bfloat16
    save_random_model(get_arch(job["model"]), job["model_dir"], seed=job["seed"], device=job["device"], dtype=dtype)
    return {"model_dir": job["model_dir"]}


def _setup(job: dict):
    """The provider's model (built from the saved checkpoint, its own way) + optimizer, and facts about them."""
    import torch

    from .e2e_models import enable_gradient_checkpointing, parameter_counts
    from .e2e_providers import PROVIDERS, make_optimizer, versions

    provider = PROVIDERS[job["provider"]]
    model = provider.build(job)
    if job["grad_ckpt"] and job["offload"]:
        # the same offloading checkpoint for every provider (Unsloth runs no offload job: its own offloads)
        enable_gradient_checkpointing(model, offload=True)
    model.train()
    config = getattr(model, "config", None)
    info = {"attn_implementation": getattr(config, "_attn_implementation", None),
            "batch_format": provider.batch_format, "builder": provider.description,
            "versions": versions(provider.packages), **parameter_counts(model)}
    if job["provider"] == "fastsft":
        from fastsft.patch import COMPONENTS, patch_state

        # what patch_model swapped in (a component with nothing to patch, e.g. LoRA in full mode, is absent)
        info["fastsft_patched"] = sorted(patch_state(model))
        info["fastsft_not_patched"] = sorted(set(COMPONENTS) - set(info["fastsft_patched"]))
    if job["device"] == "cuda":
        torch.cuda.synchronize()
        info["model_mb"] = torch.cuda.memory_allocated() / 2**20
    return model, make_optimizer(model), info


def _job_throughput(job: dict) -> dict:
    import torch

    from .e2e_data import fingerprint, layout, make_steps, to_device
    from .e2e_models import arch_shape, build_config, count_recomputes, get_arch, model_flops, pad_token_id
    from .e2e_providers import PROVIDERS, train_step

    config = build_config(get_arch(job["model"]))
    n_total = job["warmup"] + job["steps"]
    steps = make_steps(n_total, seq=job["seq"], vocab_size=config.vocab_size, seed=job["seed"],
                       median=job["doc_median"])
    fmt = PROVIDERS[job["provider"]].batch_format
    batches = [to_device(layout(s, fmt, pad_token_id=pad_token_id(config)), job["device"]) for s in steps]
    t_setup = time.monotonic()
    model, optimizer, info = _setup(job)
    info["setup_s"] = time.monotonic() - t_setup
    cuda = job["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    read_calls = count_recomputes(model)
    losses, times = [], []
    for i, batch in enumerate(batches):
        if i == job["warmup"] and cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, batch, device=job["device"], precision=job["precision"])
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if i == 0:
            calls = read_calls()
    measured = steps[job["warmup"]:]
    seconds = sum(times[job["warmup"]:])
    shape = arch_shape(job["model"])
    flops = sum(model_flops(shape, job["mode"], s.lengths, job["lora_rank"]) for s in measured)
    tokens = sum(s.tokens for s in measured)
    trained = sum(s.trained_tokens for s in measured)
    padded = sum(len(s.lengths) * max(s.lengths) for s in measured)
    out = {
        "ms": 1e3 * seconds / len(measured),
        "tflops": flops / seconds / 1e12,
        "tokens_per_s": tokens / seconds,
        "trained_tokens_per_s": trained / seconds,
        "tokens_per_step": tokens / len(measured),
        "trained_tokens_per_step": trained / len(measured),
        "docs_per_step": sum(len(s.lengths) for s in measured) / len(measured),
        "padded_fraction_if_padded": 1.0 - tokens / padded,
        "step_ms": [round(1e3 * t, 3) for t in times[job["warmup"]:]],
        "warmup_ms": [round(1e3 * t, 3) for t in times[:job["warmup"]]],
        "losses": losses,
        "data_fingerprint": fingerprint(steps),
        "layer_calls_first_step": calls,
        "checkpointing_effective": (calls >= 2) if job["grad_ckpt"] else None,
        "grad_ckpt": job["grad_ckpt"], "offload": job["offload"], "precision": job["precision"],
        **info,
    }
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _job_max_context(job: dict) -> dict:
    import torch

    from .e2e_data import layout, single_document_step, to_device
    from .e2e_models import build_config, count_recomputes, get_arch, pad_token_id
    from .e2e_providers import PROVIDERS, train_step

    config = build_config(get_arch(job["model"]))
    fmt = PROVIDERS[job["provider"]].batch_format
    t_setup = time.monotonic()
    model, optimizer, info = _setup(job)
    info["setup_s"] = time.monotonic() - t_setup
    cuda = job["device"] == "cuda"
    peaks = {}
    calls = {}

    def probe(length: int) -> bool:
        step = single_document_step(length, vocab_size=config.vocab_size, seed=job["seed"])
        batch = layout(step, fmt, pad_token_id=pad_token_id(config))
        failure = None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        read = count_recomputes(model) if not calls else None
        try:
            train_step(model, optimizer, to_device(batch, job["device"]), device=job["device"],
                       precision=job["precision"])
            if cuda:
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            failure = "oom"
        except Exception as exc:  # a kernel that cannot take this length fails the probe, and the search
            # some extensions report an allocation failure as a plain RuntimeError
            failure = "oom" if "out of memory" in str(exc).lower() else f"{type(exc).__name__}: {exc}"[:500]
        if read is not None:
            n_calls = read()
            if failure is None:  # a probe that failed part-way says nothing about recomputation
                calls["first_probe"] = n_calls
        if failure is not None:
            # the exception (and its frames holding activations) is gone here; free what is left
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if failure != "oom":
                raise ProbeError(failure)
            return False
        if cuda:
            peaks[length] = torch.cuda.max_memory_allocated() / 2**20
        return True

    search = search_max_length(probe, start=job["max_context_start"], cap=job["max_context_cap"],
                               granularity=job["max_context_granularity"], budget_s=job["max_context_budget"])
    out = {"search": search, **info}
    if search["max_ok"] in peaks:
        out["peak_mb"] = peaks[search["max_ok"]]
    if "first_probe" in calls:
        out["checkpointing_effective"] = calls["first_probe"] >= 2
    return out


JOBS = {"peaks": _job_peaks, "environment": _job_environment, "save_model": _job_save_model,
        "throughput": _job_throughput, "max_context": _job_max_context}

if __name__ == "__main__":
    sys.exit(main())
