"""Kernel benchmarks: `python -m benchmarks.kernels --op OP [--smoke]`.

Each op's cases and providers live in benchmarks/ops/<module>.py, which defines
    run(op, args)   -> (config: dict, results: list[common.Result], baseline: str)   [GPU]
    smoke(op, args) -> list[common.Result]   tiny CPU case exercising every provider path
On a machine without CUDA, the full benchmark says it needs a GPU and exits 0;
--smoke runs the tiny case instead (used by the test suite so the code never rots).
Results go to benchmarks/results/<gpu>/<op>.json (+ .png), or to --out; a smoke run writes
files only with --out (its JSON says "smoke": true).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import common

# op name -> module under benchmarks/ops
OPS = {
    "cross_entropy": "cross_entropy",
    "linear_cross_entropy": "cross_entropy",
    "lora_linear": "lora",
    "varlen_attention": "attention",
    "rms_norm": "norm",
    "rope": "rope",
    "swiglu": "swiglu",
}
ALIASES = {"lora": "lora_linear"}  # --op lora runs the lora_linear benchmark


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", choices=sorted(OPS) + sorted(ALIASES) + ["all"], required=True,
                   help="op to benchmark (repeatable; 'all' for every op)")
    p.add_argument("--smoke", action="store_true", help="run a tiny case on CPU (checks the plumbing, times nothing meaningful)")
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions (GPU)")
    p.add_argument("--no-plot", action="store_true", help="write JSON only")
    p.add_argument("--providers", default=None, help="comma-separated subset of providers to run")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<gpu>/)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ops = sorted(OPS) if "all" in args.op else list(dict.fromkeys(ALIASES.get(op, op) for op in args.op))
    if args.providers:
        args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if not args.smoke and not common.has_cuda():
        print("benchmarks.kernels needs a CUDA GPU; none found. Use --smoke for a tiny CPU run.")
        return 0
    for op in ops:
        module = importlib.import_module(f".ops.{OPS[op]}", __package__)
        if args.smoke:
            results = module.smoke(op, args)
            records = [r.as_dict() for r in results]
            print(f"== {op} (smoke, CPU)")
            common.print_table([{**r, "skipped": r.get("extra", {}).get("skipped")} for r in records],
                               columns=("case", "provider", "mode", "ms", "error", "skipped"))
            if args.out:
                path = common.write_results(op, {"op": op, "smoke": True}, records, plot=False,
                                            out_dir=args.out, smoke=True)
                print(f"wrote {path}")
            failed = [r for r in records if r.get("error")]
            if failed:
                print(f"{len(failed)} provider(s) failed in the smoke run", file=sys.stderr)
                return 1
            continue
        config, results, baseline = module.run(op, args)
        records = common.add_ratios(results, baseline)
        print(f"== {op} on {common.environment()['device']}")
        common.print_table(records)
        path = common.write_results(op, dict(config, baseline=baseline), records, plot=not args.no_plot,
                                    out_dir=args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
