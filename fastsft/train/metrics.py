"""metrics.jsonl, the loss-curve PNG, the progress display and the end-of-run summary."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory (CUDA), or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - not on Linux/macOS
        return float("nan")


def _clean(value):
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per line; on resume, drops records past the checkpoint's step."""

    def __init__(self, output_dir: str, *, resume_step: Optional[int]):
        self.path = os.path.join(output_dir, METRICS_FILE)
        os.makedirs(output_dir, exist_ok=True)
        kept: List[str] = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    if record.get("step", 0) <= resume_step:
                        kept.append(json.dumps(record))
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in kept))

    def write(self, record: Dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def records(self) -> List[Dict]:
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]


def plot_loss_curve(metrics_path: str, png_path: str) -> Optional[str]:
    """Training loss per step (and eval loss where measured) -> PNG. Returns the path, or None if no points."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("type") == "eval" and isinstance(r.get("eval_loss"), float)]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A tqdm bar (loss, tokens/s, peak memory, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, *, total: int, initial: int, mode: str, logging_steps: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.logging_steps = logging_steps
        use_bar = mode == "on" or (mode == "auto" and getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=self.stream, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.initial = initial

    def update(self, step: int, record: Dict) -> None:
        text = (
            f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {rate(record['tokens_per_s'])} tok/s  "
            f"peak {record['peak_memory_mb']:,.0f} MB"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if step % self.logging_steps == 0 or step == self.total:
            done = step - self.initial
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
            eta_text = _fmt_duration(eta) if math.isfinite(eta) else "?"
            self.write(f"step {step}/{self.total}  {text}  eta {eta_text}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def rate(value: float) -> str:
    """A per-second rate: whole numbers, but a rate below 1 keeps its decimals (0.35, not 0)."""
    return f"{value:.2g}" if 0 < value < 1 else f"{value:,.0f}"


def summary_lines(summary: Dict) -> List[str]:
    """The end-of-run summary, one fact per line."""
    lines = ["", "=== fastsft run summary ==="]
    order = [
        ("status", "status"), ("steps", "steps"), ("first_loss", "first loss"), ("final_loss", "final loss"),
        ("eval_loss_start", "eval loss (start)"), ("eval_loss", "eval loss (end)"),
        ("exact_match_start", "exact match (start)"), ("exact_match", "exact match (end)"),
        ("metric_for_best_model", "best-model metric"), ("best_metric", "best value"), ("best_step", "best step"),
        ("stopped_early_at", "stopped early at"), ("saved_model_step", "saved model step"),  # issue 25
        ("skipped_steps", "skipped steps"), ("tokens", "tokens"), ("trained_tokens", "trained tokens"),
        ("tokens_per_s", "tokens/s"), ("peak_memory_mb", "peak memory MB"), ("elapsed", "time"),
        ("output_dir", "output"),
    ]
    for key, label in order:
        if key not in summary or summary[key] is None:
            continue
        value = summary[key]
        if key.startswith("exact_match"):
            value = f"{100 * value:.1f}%"
        elif key == "elapsed":
            value = _fmt_duration(value)
        elif isinstance(value, float):
            value = rate(value) if key == "tokens_per_s" else f"{value:,.4f}" if value < 100 else f"{value:,.0f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"  {label:<20} {value}")
    # issue 25: the other eval metrics and the forgetting probe, after the fixed facts
    kinds = dict(summary.get("eval_metric_kinds") or {}, forgetting="forgetting")
    for name, kind in kinds.items():
        value = summary.get(name)
        if name == "exact_match" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        shown = f"{value:.4g}" if kind == "python" else f"{100 * value:+.1f}%" if kind == "forgetting" \
            else f"{100 * value:.1f}%"
        lines.append(f"  {name + ' (end)':<20} {shown}")
    return lines


class TensorBoardReporter:
    """report_to: tensorboard -- every metrics.jsonl number as a scalar `train/loss`, `eval/eval_loss`, ..."""

    def __init__(self, log_dir: str, *, purge_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        # on resume, events past the checkpoint's step (written before the stop) are dropped
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def write(self, record: Dict) -> None:
        kind, step = record.get("type", "train"), int(record.get("step", 0))
        for key, value in record.items():
            if key in ("type", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{kind}/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbReporter:
    """report_to: wandb -- the same records through wandb.log (WANDB_MODE=offline works without network)."""

    def __init__(self, config, output_dir: str, *, resumed: bool):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastsft"), dir=output_dir,
                              config=config.to_dict(), name=os.path.basename(output_dir.rstrip("/")),
                              reinit=True, resume="allow" if resumed else None)

    def write(self, record: Dict) -> None:
        values = {f"{record.get('type', 'train')}/{k}": v for k, v in record.items()
                  if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


REPORTER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def open_reporters(config, output_dir: str, *, resumed: bool, resume_step: Optional[int] = None) -> list:
    from fastsft.config import reporters

    opened = []
    for name in reporters(config):
        if name == "tensorboard":
            from fastsft.run_dir import TENSORBOARD_DIR

            opened.append(TensorBoardReporter(os.path.join(output_dir, TENSORBOARD_DIR),
                                              purge_step=(resume_step + 1) if resumed and resume_step is not None else None))
        elif name == "wandb":
            opened.append(WandbReporter(config, output_dir, resumed=resumed))
    return opened
