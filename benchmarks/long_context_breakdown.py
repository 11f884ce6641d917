"""Per-token memory of issue 22's settings, traced by `fastsft plan` (FakeTensorMode, on the CPU).

For a plan config, the step's traced peak at two context lengths under each setting -- gradient
checkpointing alone, + MLP tiles, + offloaded checkpoints -- and the per-token slope of each line:
the bytes per token that tiling and offload remove. Written to benchmarks/results/plan/ as JSON.

    python -m benchmarks.long_context_breakdown examples/plan/llama-3.1-8b-qlora.yaml --tile 8192 \
        --lengths 65536 131072 [--set key=value]

With the last setting (tiles + offload) it also records what is alive at the peak of the longer
trace, grouped, with each group's bytes per token (`fastsft plan --breakdown`'s table). Figures are
CPU traces of allocations (the fastsft kernels traced as torch.library operators), not GPU measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--tile", type=int, default=8192)
    parser.add_argument("--lengths", type=int, nargs=2, default=(65536, 131072))
    parser.add_argument("--set", action="append", default=[], help="key=value config overrides")
    parser.add_argument("--out", default="benchmarks/results/plan")
    args = parser.parse_args(argv)
    from fastsft.plan import load_plan_config
    from fastsft.train.long_context import PlannerPeaks

    overrides = []
    for item in args.set:
        key, value = item.split("=", 1)
        overrides += [f"--{key}", value]
    config = load_plan_config(args.config, overrides)
    started = time.perf_counter()
    peaks = PlannerPeaks(config, 80 * 2**30)
    rows = {}
    for name, tile, offload in (("checkpointing", None, False), ("tiled_mlp", args.tile, False),
                                ("tiled_mlp+offload", args.tile, True)):
        traced = []
        for n in args.lengths:
            peak = peaks.peak(n, tile, offload, None)
            plan = peaks.last
            traced.append((n, peak, {"tokens": n, "peak_bytes": peak, "peak_op": plan.peak_op,
                                     "peak_module": plan.peak_module, "peak_phase": plan.peak_phase,
                                     "activations_bytes": plan.activations_bytes, "host_bytes": plan.host_bytes}))
        (n1, p1, _), (n2, p2, _) = traced
        rows[name] = {"traces": [t for _, _, t in traced], "bytes_per_token": (p2 - p1) / (n2 - n1)}
        print(f"{name:20s} peaks {[p for _, p, _ in traced]}  {rows[name]['bytes_per_token'] / 1024:.1f} KiB/token "
              f"at {traced[-1][2]['peak_phase']} {traced[-1][2]['peak_op']} {traced[-1][2]['peak_module']}", flush=True)
    alive = peaks.state.trace(args.lengths[1], 1, breakdown=True).breakdown  # tiles + offload are set
    from fastsft.plan.breakdown import lines

    print("\n".join(lines(alive["rows"], alive["tokens"])))
    result = {
        "what": "traced peak of one training step (fastsft plan, FakeTensorMode on CPU), not a GPU measurement",
        "config": args.config, "overrides": args.set, "tile_tokens": args.tile, "lengths": list(args.lengths),
        "settings": rows,
        "saved_bytes_per_token": {
            "tiled_mlp": rows["checkpointing"]["bytes_per_token"] - rows["tiled_mlp"]["bytes_per_token"],
            "offload": rows["tiled_mlp"]["bytes_per_token"] - rows["tiled_mlp+offload"]["bytes_per_token"],
        },
        "alive_at_peak": alive,
        "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.config))[0]
    path = os.path.join(args.out, f"{name}-long-context-breakdown.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
