"""One training step of the patched model, eager vs ``torch.compile`` (issue 29).

    python -m benchmarks.compile_step --out FILE.json          # a GPU: bf16, backend inductor
    python -m benchmarks.compile_step --smoke --out FILE.json  # CPU: tiny model, backend aot_eager (plumbing only)

The model comes from the trainer's own builder (the e2e benchmark's fastsft provider, as in
benchmarks.sync_step) and every step is a packed row of several documents. Per mode (qlora, lora):
``torch._dynamo.explain`` counts the graph breaks of the forward; then the eager step (forward +
backward, no optimizer) and the compiled step (``torch.compile(model, backend=...)``) are each timed
after warm-up steps (the compiled one's first call, timed apart, is the compile). The same batches run
in both, one shape throughout, so the compiled step does not recompile. The loss of the
compiled step next to the eager one is recorded as well. The smoke run uses aot_eager: inductor on a
CPU builds C++ for minutes, and a CPU time is not a figure of this benchmark anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

from .sync_step import SYNC_ARCH, _smoke_arch

MODES = ("qlora", "lora")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed_steps(fn, model, batches, autocast, device: str, n: int) -> float:
    """Median seconds of n forward + backward steps over the batches in turn."""
    times = []
    for i in range(n):
        batch = batches[i % len(batches)]
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with autocast():
            loss = fn(**batch).loss
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_mode(mode: str, model_dir: str, device: str, seq: int, backend: str, steps: int) -> dict:
    import contextlib

    import torch

    from .e2e_data import layout, make_steps, to_device
    from .e2e_models import build_config, pad_token_id
    from .e2e_providers import PROVIDERS

    job = dict(model="sync-llama", mode=mode, model_dir=model_dir, device=device, seed=0, seq=seq,
               lora_rank=16, lora_alpha=32, grad_ckpt=False, offload=False,
               precision="bf16" if device == "cuda" else "fp32")
    config = build_config(SYNC_ARCH if device == "cuda" else _smoke_arch())
    model = PROVIDERS["fastsft"].build(job)
    model.train()
    # one step's documents, laid out once: the same shapes every call (a new shape would recompile)
    step = make_steps(1, seq=seq, vocab_size=config.vocab_size, seed=0, median=max(16, seq // 6))[0]
    batches = [to_device(layout(step, "packed", pad_token_id=pad_token_id(config)), device)]

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    with autocast():
        explained = torch._dynamo.explain(model)(**batches[0])
    torch._dynamo.reset()
    row = {"mode": mode, "backend": backend, "tokens": int(batches[0]["input_ids"].numel()),
           "graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
           "break_reasons": [b.reason.splitlines()[0][:200] for b in explained.break_reasons][:5]}
    warm = 2
    _timed_steps(model, model, batches, autocast, device, warm)
    row["eager_step_s"] = _timed_steps(model, model, batches, autocast, device, steps)
    compiled = torch.compile(model, backend=backend)
    row["first_compiled_step_s"] = _timed_steps(compiled, model, batches, autocast, device, 1)  # traces, compiles
    _timed_steps(compiled, model, batches, autocast, device, warm)
    row["compiled_step_s"] = _timed_steps(compiled, model, batches, autocast, device, steps)
    row["speedup"] = row["eager_step_s"] / row["compiled_step_s"]
    with torch.no_grad(), autocast():
        eager_loss = model(**batches[0]).loss.float().item()
        compiled_loss = compiled(**batches[0]).loss.float().item()
    row["loss_eager"], row["loss_compiled"] = eager_loss, compiled_loss
    row["loss_rel_diff"] = abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12)
    torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, backend aot_eager (the plumbing)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--seq", type=int, default=None, help="tokens in the packed row (default 4096; smoke 96)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5; smoke 1)")
    p.add_argument("--out", required=True, help="JSON file for the rows")
    args = p.parse_args(argv)
    import torch

    from .e2e_models import save_random_model

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("benchmarks.compile_step times a GPU step; no CUDA GPU found. Use --smoke for the CPU plumbing.")
        return 0
    device = "cuda" if cuda else "cpu"
    seq = args.seq or (4096 if cuda else 96)
    backend = args.backend or ("inductor" if cuda else "aot_eager")
    steps = args.steps or (5 if cuda else 1)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="fastsft-compile-step-") as tmp:
        folder = os.path.join(tmp, "model")
        save_random_model(SYNC_ARCH if cuda else _smoke_arch(), folder, seed=0, device=device,
                          dtype=torch.bfloat16 if cuda else torch.float32)
        for mode in modes:
            try:
                row = run_mode(mode, folder, device, seq, backend, steps)
                status = "ok" if row["graph_breaks"] == 0 else f"{row['graph_breaks']} graph breaks"
            except Exception as exc:
                traceback.print_exc()
                row = {"mode": mode, "backend": backend}
                status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            row["status"] = status
            failed += status != "ok"
            rows.append(row)
            what = (f"eager {row['eager_step_s'] * 1e3:.1f} ms, {backend} {row['compiled_step_s'] * 1e3:.1f} ms "
                    f"(x{row['speedup']:.2f}), first compiled step {row['first_compiled_step_s']:.1f} s"
                    if "speedup" in row else "")
            print(f"compile_step {mode}: {status} {what} ({device}, {seq} packed tokens)", flush=True)
    payload = {"kind": "compile_step", "device": device, "smoke": not cuda, "backend": backend, "seq": seq,
               "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(payload, handle, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
