"""Peak memory and max context of 8B fine-tuning recipes, traced on the CPU by `fastsft plan`:

    python -m benchmarks.plan_table [--out benchmarks/results/plan] [--readme README.md] [--quick]

Llama-3.1-8B (QLoRA r=32, LoRA r=16 in bf16, full bf16 fine-tuning) and Qwen3-8B (QLoRA r=32), fastsft vs
hf, at 24 / 40 / 80 GB, from the configs in examples/plan/. Writes plan_table.json, plan_table.png and
README.md (the table) under --out, and the same table between the plan-table markers of --readme. Every
figure is traced on the CPU (FakeTensorMode), not measured on a GPU. The calibration rows put the hf
recipe (today's transformers) and hf2024 (its 2024 loss) next to Unsloth's published HF + FA2 figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL = "traced on CPU, not measured on a GPU"
GPUS = ("24GB", "40GB", "80GB")
PEAK_AT = 4096  # the peak-memory column: one 4096-token document
CASES = (  # (name, config file)
    ("Llama-3.1-8B QLoRA r=32", "examples/plan/llama-3.1-8b-qlora.yaml"),
    ("Llama-3.1-8B LoRA r=16 bf16", "examples/plan/llama-3.1-8b-lora.yaml"),
    ("Llama-3.1-8B full bf16", "examples/plan/llama-3.1-8b-full.yaml"),
    ("Qwen3-8B QLoRA r=32", "examples/plan/qwen3-8b-qlora.yaml"),
)
# issue 22: fastsft's long-context settings (overlapped offload of the checkpoints + MLP tiles), QLoRA r=32
LONG_CONTEXT = ["--offload_activations", "true", "--mlp_tile_tokens", "8192"]
LONG_CASES = (  # (name, config file, the 2x-Unsloth targets in tokens per GPU size, or None)
    ("Llama-3.1-8B QLoRA r=32", "examples/plan/llama-3.1-8b-qlora.yaml", {"24GB": 157000, "80GB": 685000}),
    ("Qwen3-8B QLoRA r=32", "examples/plan/qwen3-8b-qlora.yaml", None),
)
LONG_LABEL = "fastsft long context (offload + MLP tiles of 8192)"
UNSLOTH_PUBLISHED = {"24GB": 78475, "80GB": 342733}  # unsloth.ai/blog/llama3-3, Unsloth column
# Unsloth's published HF + FA2 max context for Llama-3.1-8B QLoRA (r=32, all linear, batch 1), in tokens
PUBLISHED_HF_FA2 = {"80GB": 28454, "24GB": 5789}
PUBLISHED_SOURCE = ("unsloth.ai/blog/llama3-3 (Dec 2024): Llama 3.1 8B max context, HF + FA2 column; 4-bit QLoRA "
                    "r=32 on all linear layers, batch 1, sequences padded to the length")
BEGIN, END = "<!-- plan-table: begin (python -m benchmarks.plan_table) -->", "<!-- plan-table: end -->"


def fastsft_recipe_note() -> Optional[str]:
    """None when the kernels trace as themselves; else why the fastsft column runs without them."""
    from fastsft.plan.step import kernels_traceable

    if kernels_traceable():
        return None
    return ("fastsft_kernels' ops are not yet torch.library operators with fake implementations: the fastsft "
            "column is fastsft's builder and packed batches with patch_kernels: false (the kernels' own memory "
            "is not in it)")


class Cached:
    """One prepared model; each length traced once across the searches."""

    def __init__(self, config, recipe):
        from fastsft.plan import prepare

        self.state = prepare(config, recipe)
        self.peaks: Dict[int, int] = {}
        self.steps = {}

    def peak(self, n: int) -> int:
        if n not in self.peaks:
            step = self.state.trace(n, 1)
            self.peaks[n], self.steps[n] = step.peak_bytes, step
        return self.peaks[n]


def run_case(path: str, recipe: str, margin, overrides=()) -> dict:
    from fastsft.plan import load_plan_config, parse_size
    from fastsft.plan.search import search_max

    config = load_plan_config(os.path.join(REPO, path), list(overrides))
    started = time.perf_counter()
    cached = Cached(config, recipe)
    cached.peak(PEAK_AT)
    step = cached.steps[PEAK_AT]
    out = {"recipe": recipe, "overrides": list(overrides), "peak_at": PEAK_AT, "step": step.to_dict(),
           "max_context": {}}
    out["host_bytes"] = {}
    for gpu in GPUS:
        found = search_max(cached.peak, margin.budget(parse_size(gpu)), start=(1024, 2048), low=2)
        out["max_context"][gpu] = found.best
        # host memory the run needs there (offloaded checkpoints: pinned host memory)
        out["host_bytes"][gpu] = cached.steps[found.best].host_bytes if found.best else 0
    out["traces"] = sorted(cached.peaks.items())
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


# --- issue 23: sequence parallelism (one GPU of an N-way Ulysses group), kept apart from the single-GPU rows
SP_CASE = ("Llama-3.1-8B QLoRA r=32", "examples/plan/llama-3.1-8b-qlora.yaml",
           ("--sequence_parallel", "8", "--offload_activations", "true", "--mlp_tile_tokens", "8192"))
SP_GPU = "80GB"
SP_FIT_AT = (16384, 32768)  # tokens per rank of the two traces the line a + b * L goes through
SP_JSON = "sequence_parallel.json"
ALST_PUBLISHED = {"tokens": 3_700_000, "gpus": "8 x H100 80GB (one node)",
                  "source": "Arctic Long Sequence Training (ALST), Snowflake, arXiv 2506.13996 (June 2025): Llama-8B, "
                            "Ulysses SP + tiled MLP / loss + activation checkpoint offload, DeepSpeed"}


def run_sequence_parallel(margin) -> dict:
    """Max context of the SP case at 8 x SP_GPU. A trace at millions of tokens takes minutes (MLP tiles x
    layers), and the traced peak is linear in the length: two short traces give a + b * L per rank, the
    crossing with the budget is traced once to confirm it fits (a traced answer, not the line's)."""
    from fastsft.plan import load_plan_config, parse_size, prepare

    name, path, overrides = SP_CASE
    config = load_plan_config(os.path.join(REPO, path), list(overrides))
    n = config.sequence_parallel
    started = time.perf_counter()
    state = prepare(config, "fastsft")
    fit = [state.trace(r * n) for r in SP_FIT_AT]
    slope = (fit[1].peak_bytes - fit[0].peak_bytes) / (SP_FIT_AT[1] - SP_FIT_AT[0])
    intercept = fit[0].peak_bytes - slope * SP_FIT_AT[0]
    budget = margin.budget(parse_size(SP_GPU))
    per_rank = int((budget - intercept) // slope)
    confirm = state.trace(per_rank * n)
    while confirm.peak_bytes > budget:  # the line was optimistic: 1% shorter until a trace fits
        per_rank = int(per_rank * 0.99)
        confirm = state.trace(per_rank * n)
    from fastsft.plan.step import kernels_traceable

    kernels = "traced as operators" if config.patch_kernels and kernels_traceable() else "off"
    return {"name": name, "config": path, "overrides": list(overrides), "sequence_parallel": n, "gpu": SP_GPU,
            "kernels": kernels,
            "budget_bytes": budget, "max_context": per_rank * n, "tokens_per_rank": per_rank,
            "linear_fit": {"a_bytes": intercept, "b_bytes_per_rank_token": slope,
                           "traces": [{"total_tokens": s.seq_len, "peak_bytes": s.peak_bytes} for s in fit]},
            "line_error_at_max": (confirm.peak_bytes - (intercept + slope * per_rank)) / confirm.peak_bytes,
            "step": confirm.to_dict(), "published": ALST_PUBLISHED, "seconds": round(time.perf_counter() - started, 1)}


def sequence_parallel_markdown(sp: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.1f}"  # noqa: E731
    step, pub = sp["step"], sp["published"]
    settings = ", ".join(f"{k.lstrip('-')}: {v}" for k, v in zip(sp["overrides"][::2], sp["overrides"][1::2]))
    settings += f", fastsft kernels {sp['kernels']}"
    host_per_token = step["sequence_parallel"]["host_bytes_all_ranks"] / step["sequence_parallel"]["total_tokens"]
    return "\n".join([
        "", f"Sequence parallelism (Ulysses): one GPU of a group of {sp['sequence_parallel']}, the longest sequence "
            f"the group fits (batch 1). **{LABEL}** (`python -m benchmarks.plan_table --cases sp`: a line through "
            f"two traces, the crossing traced to confirm it fits; same margin).", "",
        "| model / method | GPUs | settings | max context (tokens) | per-GPU peak there (GiB) | host memory, all "
        "ranks (GiB) | published |", "|---|---|---|---:|---:|---:|---|",
        f"| {sp['name']} | {sp['sequence_parallel']} x {sp['gpu']} | {settings} | {sp['max_context']:,} | "
        f"{gib(step['peak_bytes'])} | {gib(step['sequence_parallel']['host_bytes_all_ranks'])} | ALST: "
        f"{pub['tokens']:,} on {pub['gpus']} |", "",
        f"Published: {pub['source']}; not the same recipe (ALST's Llama-8B run is DeepSpeed's, not QLoRA), so the "
        f"figures are side by side, not a like-for-like ratio. Per GPU: {gib(sp['linear_fit']['a_bytes'])} GiB + "
        f"{sp['linear_fit']['b_bytes_per_rank_token'] / 1024:.1f} KiB per token of its shard (the traced peak at the "
        f"max context is {100 * sp['line_error_at_max']:+.2f}% off that line). The offloaded checkpoints take "
        f"{host_per_token / 1024:.0f} KiB of pinned host memory per token of the sequence (all ranks): a node with "
        f"less host memory than the column shows reaches its limit there first.", ""])


def markdown(report: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.1f}"  # noqa: E731
    lines = [f"Peak memory at one {PEAK_AT}-token document (GiB) and the longest document that fits (tokens, "
             f"batch 1), per GPU memory. **{LABEL}** (`python -m benchmarks.plan_table`, "
             f"{report['margin']}).", "",
             "| model / method | recipe | peak GiB @4096 | " + " | ".join(f"max context {g}" for g in GPUS) + " |",
             "|---|---|---:|" + "---:|" * len(GPUS)]
    for case in report["cases"]:
        for row in case["rows"]:
            ctx = " | ".join(f"{row['max_context'][g]:,}" if row["max_context"][g] else "does not fit" for g in GPUS)
            lines.append(f"| {case['name']} | {row['label']} | {gib(row['step']['peak_bytes'])} | {ctx} |")
    if report.get("fastsft_note"):
        lines += ["", f"fastsft column: {report['fastsft_note']}."]
    if report.get("long_context"):
        lines += [""] + long_context_markdown(report["long_context"])
    cal = report.get("calibration")
    if cal:
        lines += ["", f"Calibration, Llama-3.1-8B QLoRA r=32 all linear, batch 1, padded (tokens; {LABEL}; "
                      f"published: {PUBLISHED_SOURCE}):", "",
                  "| | " + " | ".join(PUBLISHED_HF_FA2) + " |", "|---|" + "---:|" * len(PUBLISHED_HF_FA2),
                  "| published HF + FA2 | " + " | ".join(f"{v:,}" for v in PUBLISHED_HF_FA2.values()) + " |"]
        for row in cal:
            lines.append(f"| {row['label']} | " + " | ".join(
                f"{row['max_context'][g]:,} ({row['max_context'][g] / PUBLISHED_HF_FA2[g]:.2f}x)"
                for g in PUBLISHED_HF_FA2) + " |")
    return "\n".join(lines) + "\n"


def long_context_markdown(cases: list) -> List[str]:
    """Issue 22's table: the long-context rows' max context, host memory there, and the 2x-Unsloth targets."""
    gib = lambda b: f"{b / 2 ** 30:.0f}"  # noqa: E731
    lines = [f"Long context on one GPU (issue 22), batch 1, {LABEL}: `{' '.join(LONG_CONTEXT)}`; the host "
             f"memory is the pinned memory the offloaded checkpoints take at that length. Targets: twice "
             f"Unsloth's published Llama-3.1-8B QLoRA figures ({UNSLOTH_PUBLISHED['24GB']:,} on 24 GB, "
             f"{UNSLOTH_PUBLISHED['80GB']:,} on 80 GB).", "",
             "| model / method | GPU | max context (tokens) | host memory (GiB) | per token at the peak | target | |",
             "|---|---|---:|---:|---:|---:|---|"]
    for case in cases:
        row = case["row"]
        for gpu in ("24GB", "80GB"):
            best = row["max_context"][gpu]
            target = (case.get("targets") or {}).get(gpu)
            verdict = "" if not target else ("met" if best >= target else f"gap {target - best:,}")
            per_token = row.get("per_token_bytes", {}).get(gpu)
            lines.append(f"| {case['name']} | {gpu} | {best:,} | {gib(row['host_bytes'][gpu])} | "
                         f"{f'{per_token / 1024:.1f} KiB' if per_token else '-'} | "
                         f"{f'{target:,}' if target else '-'} | {verdict} |")
    return lines


def run_long_context(margin, picked=LONG_CASES) -> list:
    """fastsft with its long-context settings: max context, host memory, the peak's bytes per token."""
    out = []
    for name, path, targets in picked:
        row = run_case(path, "fastsft", margin, LONG_CONTEXT)
        row["label"] = LONG_LABEL
        # the slope of the traced peak at the longest contexts found (linear there: MLP tiles are fixed)
        peaks = sorted(row["traces"])
        row["per_token_bytes"] = {}
        for gpu in ("24GB", "80GB"):
            best = row["max_context"][gpu]
            near = [(n, p) for n, p in peaks if n > 8192 and n != best]
            if best and near:
                n0, p0 = min(near, key=lambda t: abs(t[0] - best))
                pb = dict(peaks)[best]
                row["per_token_bytes"][gpu] = (pb - p0) / (best - n0)
        print(f"{name} / {row['label']}: max context {row['max_context']}, host "
              f"{ {g: round(b / 2 ** 30, 1) for g, b in row['host_bytes'].items()} } GiB ({row['seconds']} s)", flush=True)
        out.append({"name": name, "config": path, "targets": targets, "row": row})
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        width = 0.8 / max(1, len(case["rows"]))
        for k, row in enumerate(case["rows"]):
            xs = [i + k * width for i in range(len(GPUS))]
            ax.bar(xs, [row["max_context"][g] / 1000 for g in GPUS], width, label=row["label"])
        ax.set_xticks([i + width * (len(case["rows"]) - 1) / 2 for i in range(len(GPUS))], list(GPUS))
        if not any(row["max_context"][g] for row in case["rows"] for g in GPUS):
            peaks = ", ".join(f"{row['label']} {row['step']['peak_bytes'] / 2 ** 30:.0f} GiB" for row in case["rows"])
            ax.text(0.5, 0.5, f"does not fit 80 GB\n(peak at {PEAK_AT} tokens:\n{peaks})", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)
            ax.set_yticks([])
        ax.set_title(case["name"], fontsize=9)
        ax.set_ylabel("max context (k tokens)")
        ax.legend(fontsize=7)
    fig.suptitle(f"fastsft plan: {LABEL}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(path: str, table: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(head + BEGIN + "\n" + table + END + tail)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "plan"))
    parser.add_argument("--readme", default=os.path.join(REPO, "README.md"),
                        help="README whose plan-table markers receive the table ('' to leave it)")
    parser.add_argument("--cases", default="all", help="comma list of case numbers (1-based), 'all', or 'sp' "
                        "(only the sequence-parallel row: 8 GPUs, written to sequence_parallel.json)")
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--no-long-context", action="store_true", help="leave out issue 22's long-context rows")
    parser.add_argument("--render-only", action="store_true",
                        help="re-write the table, PNG and README from --out's plan_table.json (no tracing)")
    args = parser.parse_args(argv)
    if args.render_only:
        with open(os.path.join(args.out, "plan_table.json")) as handle:
            return write_outputs(json.load(handle), args)
    from fastsft.plan import Margin

    margin = Margin()
    if args.cases == "sp":  # issue 23: only the sequence-parallel row; the single-GPU rows are re-rendered
        sp = run_sequence_parallel(margin)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, SP_JSON), "w") as handle:
            json.dump(sp, handle, indent=1)
        print(f"{sp['name']}, sequence_parallel {sp['sequence_parallel']}: max context {sp['max_context']:,} tokens "
              f"at {sp['sequence_parallel']} x {sp['gpu']} ({sp['seconds']} s)", flush=True)
        args.keep_plot = True  # the single-GPU rows are only re-rendered: their PNG stays as committed
        with open(os.path.join(args.out, "plan_table.json")) as handle:
            return write_outputs(json.load(handle), args)
    picked = CASES if args.cases == "all" else [CASES[int(i) - 1] for i in args.cases.split(",")]
    note = fastsft_recipe_note()
    report = {"label": LABEL, "margin": margin.describe(), "fastsft_note": note, "cases": [],
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for name, path in picked:
        rows = []
        for recipe in ("fastsft", "hf"):
            overrides = ["--patch_kernels", "false"] if recipe == "fastsft" and note else []
            row = run_case(path, recipe, margin, overrides)
            row["label"] = recipe + (" (kernels off)" if overrides else "")
            rows.append(row)
            print(f"{name} / {row['label']}: peak@{PEAK_AT} {row['step']['peak_bytes'] / 2 ** 30:.2f} GiB, "
                  f"max context {row['max_context']} ({row['seconds']} s)", flush=True)
        report["cases"].append({"name": name, "config": path, "rows": rows})
    if not args.no_long_context:
        names = {name for name, _ in picked}
        report["long_context"] = run_long_context(margin, [c for c in LONG_CASES if c[0] in names])
        by_name = {case["name"]: case for case in report["cases"]}
        for long_case in report["long_context"]:  # the same row in the main table, under its model
            if long_case["name"] in by_name:
                by_name[long_case["name"]]["rows"].append(long_case["row"])
    if not args.no_calibration:
        report["calibration"] = []
        for recipe in ("hf", "hf2024"):
            row = run_case(CASES[0][1], recipe, margin)
            row["label"] = {"hf": "hf (transformers 5 loss, prepare_model_for_kbit_training fp32 casts, AdamW)",
                            "hf2024": "hf2024 (+ fp32 logits in forward, shifted copy, outputs held)"}[recipe]
            report["calibration"].append(row)
            print(f"calibration {recipe}: {row['max_context']}", flush=True)
    return write_outputs(report, args)


def write_outputs(report: dict, args) -> int:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan_table.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    table = markdown(report)
    sp_path = os.path.join(args.out, SP_JSON)  # issue 23: the sequence-parallel row, traced apart (--cases sp)
    if os.path.isfile(sp_path):
        with open(sp_path) as handle:
            table += sequence_parallel_markdown(json.load(handle))
    with open(os.path.join(args.out, "README.md"), "w") as handle:
        handle.write("# fastsft plan: memory and max context of 8B recipes\n\n" + table)
    if not getattr(args, "keep_plot", False):  # --cases sp leaves the single-GPU plot as it is
        plot(report, os.path.join(args.out, "plan_table.png"))
    if args.readme and update_readme(args.readme, table):
        print(f"table written into {args.readme}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
