"""The planner against the GPU: for every end-to-end run that measured torch.cuda.max_memory_allocated,
the peak `fastsft plan` traces on the CPU for the same model, mode, recipe and batch shape.

    python -m benchmarks.plan_check --e2e-dir WORK/e2e --out WORK/plan_check.json [--budget 120]

The GPU suite runs it after its end-to-end stages (stage p) and puts the rows in suite.json and summary.md
("plan vs measured"). Recipes: provider fastsft -> fastsft (the kernels' allocations once they are
torch.library operators; until then that row says why it is not planned), hf -> hf. hf's padded rows are
planned as `docs_per_step` rows of the padded length with no padding mask (the mask of a padded batch,
rows x L x L booleans, is not modelled: the planned peak is low by that much).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time
from typing import List, Optional

RECIPE_OF = {"fastsft": "fastsft", "hf": "hf"}


def plan_config(model: str, mode: str, seq: int, config: dict, row: dict):
    """The TrainConfig the e2e job's trainer_config gives, the architecture from the e2e model table."""
    from fastsft.config import TrainConfig

    from .e2e_models import LORA_TARGETS, build_config, get_arch

    arch = build_config(get_arch(model)).to_dict()
    return TrainConfig(model=model, model_config=arch, dataset="(plan)", mode=mode,
                       lora_r=int(config.get("lora_rank", 16)), lora_alpha=float(config.get("lora_alpha", 32)),
                       lora_target_modules=list(LORA_TARGETS), precision=row.get("precision", "bf16"),
                       gradient_checkpointing=bool(row.get("grad_ckpt")), max_seq_length=seq, batch_tokens=seq,
                       max_grad_norm=0.0)  # the benchmark's train_step clips nothing


def batch_shape(row: dict, recipe: str, seq: int) -> tuple:
    """(tokens per row, rows) of the measured steps' micro-batch."""
    if recipe == "fastsft":
        return seq, 1
    docs = max(1, round(row.get("docs_per_step") or 1))
    padded = (row.get("tokens_per_step") or seq) / max(1e-9, 1.0 - (row.get("padded_fraction_if_padded") or 0.0))
    return max(2, round(padded / docs)), docs


def check_payload(payload: dict, deadline: float) -> List[dict]:
    from fastsft.errors import ConfigError
    from fastsft.plan import prepare

    rows = []
    for row in payload.get("results", []):
        recipe = RECIPE_OF.get(row.get("provider"))
        measured = row.get("peak_mb")
        if recipe is None or measured is None:
            continue
        model, mode, seq = row["case"].split("/")
        seq = int(seq.replace("seq", ""))
        out = {"benchmark": payload.get("benchmark"), "case": row["case"], "provider": row["provider"],
               "measured_peak_mb": measured}
        if time.monotonic() > deadline:
            out["skipped"] = "out of time"
            rows.append(out)
            continue
        try:
            config = plan_config(model, mode, seq, payload.get("config") or {}, row)
            tokens, docs = batch_shape(row, recipe, seq)
            step = prepare(config, recipe).trace(tokens, docs)
            out.update(plan_peak_mb=step.peak_bytes / 2 ** 20, plan_over_measured=step.peak_bytes / 2 ** 20 / measured,
                       planned_shape=[docs, tokens], label="plan: traced on CPU; measured: torch.cuda.max_memory_allocated")
        except ConfigError as exc:
            out["skipped"] = str(exc)
        except Exception as exc:  # one row's failure must not cost the others
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(out)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--e2e-dir", required=True, help="the folder of the e2e_*.json payloads")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds; rows left are marked skipped")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    rows = []
    for path in sorted(glob.glob(os.path.join(args.e2e_dir, "e2e_*.json"))):
        with open(path) as handle:
            payload = json.load(handle)
        if payload.get("kind", "throughput") != "throughput":
            continue
        rows += check_payload(payload, deadline)
    with open(args.out, "w") as handle:
        json.dump({"rows": rows}, handle, indent=1)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
