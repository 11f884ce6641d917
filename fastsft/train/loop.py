"""The training loop: accumulation windows normalised by trained tokens, eval, checkpoints, signals."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from fastsft.errors import ConfigError, DataError
from fastsft.train import checkpoint as ckpt
from fastsft.train.batch import batch_to_device, output_vocab_size
from fastsft.train.evaluate import autocast_factory, evaluate_loss, exact_match
from fastsft.train.metrics import LOSS_CURVE_FILE, MetricsWriter, Progress, peak_memory_mb, plot_loss_curve, summary_lines
from fastsft.train.model import TINY_MODEL, count_parameters, load_model, load_tokenizer, prepare_base, resolve_device, resolve_precision
from fastsft.train.optim import build_optimizer, build_scheduler

logger = logging.getLogger("fastsft.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says why and what to do."""


@dataclass
class TrainResult:
    status: str  # "completed" | "interrupted"
    global_step: int
    output_dir: str
    checkpoint: Optional[str] = None  # the checkpoint written on interruption
    signal: Optional[int] = None
    summary: Dict = field(default_factory=dict)
    losses: List[float] = field(default_factory=list)  # per-step training loss (this process only)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class DataStream:
    """Micro-batches in a deterministic per-(seed, epoch) plan; the position is (epoch, index)."""

    def __init__(self, lengths: List[int], config, *, epochs_limit: Optional[int]):
        from fastsft.data import plan_batches

        self._plan_batches = plan_batches
        self.lengths = lengths
        self.config = config
        self.epochs_limit = epochs_limit  # None: cycle through epochs until max_steps
        self.epoch = 0
        self.index = 0
        self._plans: Dict[int, List[List[int]]] = {}

    def plan(self, epoch: int) -> List[List[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: self._plan_batches(
                self.lengths, batch_tokens=self.config.batch_tokens, packing=self.config.packing,
                batch_size=self.config.batch_size, seed=self.config.seed, epoch=epoch,
            )}
            if not self._plans[epoch]:
                raise DataError(f"{self.config.dataset}: no training examples left to batch")
        return self._plans[epoch]

    def next_window(self, size: int) -> List[List[int]]:
        window: List[List[int]] = []
        while len(window) < size:
            if self.epochs_limit is not None and self.epoch >= self.epochs_limit:
                break
            plan = self.plan(self.epoch)
            if self.index >= len(plan):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            window.append(plan[self.index])
            self.index += 1
        return window

    def progress(self) -> float:
        """Epochs done, as a fraction."""
        plan = self.plan(self.epoch) if self.epochs_limit is None or self.epoch < self.epochs_limit else None
        return self.epoch + (self.index / len(plan) if plan else 0.0)

    def count_steps(self, window: int) -> int:
        micro_batches = sum(len(self.plan(e)) for e in range(self.epochs_limit))
        return max(1, math.ceil(micro_batches / window))


class _SignalCatcher:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """``Trainer(config).train()``; `callbacks` are called as ``cb(trainer, record)`` after every step."""

    def __init__(self, config, *, callbacks: Sequence[Callable] = (), stream=None):
        self.config = config
        self.callbacks = list(callbacks)
        self.stream = stream or sys.stderr
        self.output_dir = os.path.abspath(config.output_dir)

    # ------------------------------------------------------------------ setup
    def _resume_path(self) -> Optional[str]:
        resume = self.config.resume
        if resume is False or resume is None or resume == "":
            if ckpt.list_checkpoints(self.output_dir):
                if not self.config.overwrite_output_dir:
                    raise ConfigError(
                        f"output_dir {self.config.output_dir!r} already holds checkpoints: pass --resume to continue "
                        f"that run, --overwrite_output_dir true to start over, or choose another output_dir"
                    )
                shutil.rmtree(os.path.join(self.output_dir, ckpt.CHECKPOINTS_DIR))
            return None
        if resume is True or resume == "latest":
            path = ckpt.latest_checkpoint(self.output_dir)
            if path is None:
                self.say(f"resume: no checkpoint in {self.output_dir}; starting from scratch")
            return path
        if not os.path.isfile(os.path.join(resume, ckpt.STATE_FILE)):
            raise ConfigError(f"config key 'resume': {resume!r} is not a fastsft checkpoint directory")
        return resume

    def say(self, text: str) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def setup(self) -> None:
        from fastsft.data import prepare_data

        config = self.config
        os.makedirs(self.output_dir, exist_ok=True)
        self.resume_from = self._resume_path()
        seed_everything(config.seed)
        self.device = resolve_device(config)
        if self.device.type == "cpu" and config.cpu_threads > 0:
            torch.set_num_threads(config.cpu_threads)
        self.precision = resolve_precision(config, self.device)
        base = prepare_base(config, self.output_dir, resuming=self.resume_from is not None)
        # tiny-llama: base holds the tokenizer the model was sized for (trained on the data, or config.tokenizer)
        self.tokenizer = load_tokenizer(base if config.model == TINY_MODEL else (config.tokenizer or base), config)
        self.data = prepare_data(config.data_options(), self.tokenizer)
        if not self.data.train:
            raise DataError(f"{config.dataset}: no training examples left after preparation")
        for line in self.data.summary_lines():
            self.say(line)
        needs_eval = config.eval_steps > 0 or config.eval_exact_match
        if needs_eval and not self.data.eval:
            raise ConfigError(
                "evaluation (eval_steps / eval_exact_match) needs a held-out split: set 'eval_dataset' or 'eval_fraction'"
            )
        self.model = load_model(base, config, self.device, self.precision)
        self.vocab_size = output_vocab_size(self.model)
        trainable, total = count_parameters(self.model)
        self.say(f"model: {config.model} ({config.mode}, {self.precision.name} on {self.device.type}): "
                 f"{trainable:,} trainable of {total:,} parameters")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config)
        lengths = [len(e.input_ids) for e in self.data.train]
        self.stream_data = DataStream(lengths, config, epochs_limit=None if config.max_steps > 0 else config.num_epochs)
        window = config.gradient_accumulation_steps
        self.total_steps = config.max_steps if config.max_steps > 0 else self.stream_data.count_steps(window)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.scaler else None
        self.autocast = autocast_factory(self.device, self.precision.compute_dtype, self.precision.autocast)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.global_step = 0
        self.totals = {"tokens": 0, "trained_tokens": 0, "skipped_steps": 0, "elapsed": 0.0}
        self.eval_history: Dict[str, Optional[float]] = {}
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, model=self.model, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler)
            self.global_step = state["global_step"]
            self.stream_data.epoch, self.stream_data.index = state["epoch"], state["batch_index"]
            self.totals.update(state.get("totals", {}))
            self.eval_history.update(state.get("eval_history", {}))
            self.say(f"resumed from {self.resume_from} at step {self.global_step}")
            self._warn_config_changes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.metrics = MetricsWriter(self.output_dir, resume_step=self.global_step if self.resume_from else None)

    # keys that may change between a run and its resumption without breaking exactness
    _RESUME_FREE_KEYS = {"resume", "output_dir", "save_steps", "save_total_limit", "eval_steps",
                         "eval_at_start", "eval_exact_match", "eval_max_new_tokens", "eval_max_examples",
                         "eval_batch_size", "logging_steps", "progress_bar", "cpu_threads", "overwrite_output_dir"}

    def _warn_config_changes(self) -> None:
        import yaml

        path = os.path.join(self.resume_from, "fastsft_config.yaml")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as handle:
            saved = yaml.safe_load(handle) or {}
        current = self._config_dict()
        changed = sorted(k for k in current if k not in self._RESUME_FREE_KEYS and k in saved and saved[k] != current[k])
        if changed:
            listing = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
            self.say(f"warning: resuming with a changed config ({listing}); the run will not match an uninterrupted one")

    # ------------------------------------------------------------------ one step
    def collate(self, indices: List[int]) -> dict:
        from fastsft.data import collate

        return collate([self.data.train[i] for i in indices], packing=self.config.packing,
                       pad_token_id=self.pad_token_id, pad_to_multiple_of=self.config.pad_to_multiple_of)

    def compute_loss(self, batch: dict, num_items: int) -> torch.Tensor:
        """Loss of one micro-batch = its trained-token loss sum / trained tokens of the whole window."""
        # host label check, then one device copy per batch (cu_seqlens pre-validated, max lengths as ints)
        inputs = batch_to_device(batch, self.device, vocab_size=self.vocab_size)
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
                   if self.config.offload_activations else contextlib.nullcontext())
        with self.autocast(), offload:
            out = self.model(**inputs, num_items_in_batch=num_items, use_cache=False)
        return out.loss

    def accumulate(self, batches: List[dict]) -> tuple:
        """Forward + backward of every micro-batch in the window; returns (window loss, trained tokens)."""
        num_items = sum(b["num_trained_tokens"] for b in batches)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        if num_items == 0:
            return total, 0
        for batch in batches:
            loss = self.compute_loss(batch, num_items)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().float()
        return total, num_items

    def _skip_or_stop(self, what: str, value: float) -> None:
        if self.config.nonfinite_loss == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.totals["skipped_steps"] += 1
            self.say(f"step {self.global_step + 1}: non-finite {what} ({value}); skipping the update "
                     f"(nonfinite_loss: skip)")
            return
        latest = ckpt.latest_checkpoint(self.output_dir)
        where = f"the last checkpoint is {latest}" if latest else "no checkpoint was written"
        raise TrainingError(
            f"non-finite {what} ({value}) at step {self.global_step + 1}; stopping ({where}). "
            f"Lower learning_rate, check the data, or set nonfinite_loss: skip to skip such steps."
        )

    def train_step(self) -> Optional[dict]:
        windows = self.stream_data.next_window(self.config.gradient_accumulation_steps)
        if not windows:
            return None
        started = time.perf_counter()
        batches = [self.collate(indices) for indices in windows]  # whole window first: its trained-token count
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
        lr = self.optimizer.param_groups[0]["lr"]
        loss, trained = self.accumulate(batches)
        loss_value = float(loss)
        grad_norm = float("nan")
        if trained == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.totals["skipped_steps"] += 1
            self.say(f"step {self.global_step + 1}: no trained tokens in this window; skipping the update")
        elif not math.isfinite(loss_value):
            self._skip_or_stop("loss", loss_value)
        else:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            if self.scaler is not None:
                # fp16: an overflow is expected now and then; the scaler skips the step and lowers the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif not math.isfinite(grad_norm):
                self._skip_or_stop("gradient norm", grad_norm)
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        self.totals["tokens"] += tokens
        self.totals["trained_tokens"] += trained
        self.totals["elapsed"] += elapsed
        return {
            "type": "train", "step": self.global_step, "epoch": round(self.stream_data.progress(), 4),
            "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "trained_tokens": trained,
            "tokens_per_s": tokens / elapsed, "trained_tokens_per_s": trained / elapsed,
            "peak_memory_mb": peak_memory_mb(self.device), "step_time_s": elapsed,
        }

    # ------------------------------------------------------------------ eval / save
    def eval_batches(self) -> List[dict]:
        from fastsft.data import collate, plan_batches

        lengths = [len(e.input_ids) for e in self.data.eval]
        plan = plan_batches(lengths, batch_tokens=self.config.batch_tokens, packing=self.config.packing,
                            batch_size=self.config.batch_size, seed=self.config.seed, epoch=0)
        return [collate([self.data.eval[i] for i in idx], packing=self.config.packing, pad_token_id=self.pad_token_id,
                        pad_to_multiple_of=self.config.pad_to_multiple_of) for idx in plan]

    def evaluate(self) -> dict:
        record = {"type": "eval", "step": self.global_step}
        record["eval_loss"] = evaluate_loss(self.model, self.eval_batches(), device=self.device, autocast=self.autocast)
        text = f"eval @ step {self.global_step}: loss {record['eval_loss']:.4f}"
        if self.config.eval_exact_match:
            examples = self.data.eval[: self.config.eval_max_examples or None]
            score, samples = exact_match(self.model, self.tokenizer, examples, device=self.device,
                                         autocast=self.autocast, max_new_tokens=self.config.eval_max_new_tokens,
                                         batch_size=self.config.eval_batch_size)
            record["eval_exact_match"] = score
            record["eval_examples"] = len(samples)
            text += f", exact match {100 * score:.1f}% of {len(samples)}"
            if samples:
                s = samples[0]
                text += f"  (e.g. expected {s['expected']!r}, generated {s['generated']!r})"
        self.metrics.write(record)
        self.say(text)
        if "eval_loss_start" not in self.eval_history:
            self.eval_history["eval_loss_start"] = record["eval_loss"]
            self.eval_history["exact_match_start"] = record.get("eval_exact_match")
        self.eval_history["eval_loss"] = record["eval_loss"]
        self.eval_history["exact_match"] = record.get("eval_exact_match")
        return record

    def train_state(self) -> dict:
        return {
            "global_step": self.global_step, "epoch": self.stream_data.epoch, "batch_index": self.stream_data.index,
            "totals": dict(self.totals), "eval_history": dict(self.eval_history), "total_steps": self.total_steps,
        }

    def save_checkpoint(self) -> str:
        path = ckpt.save_checkpoint(
            self.output_dir, step=self.global_step, model=self.model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            train_state=self.train_state(), config_dict=self._config_dict(), keep=self.config.save_total_limit,
        )
        self.say(f"checkpoint: {path}")
        return path

    def _config_dict(self) -> dict:
        values = self.config.to_dict()
        values["resume"] = False  # a saved config starts a run, it does not resume one
        return values

    def save_final(self) -> None:
        import yaml

        ckpt.save_model_files(self.model, self.tokenizer, self.output_dir)
        with open(os.path.join(self.output_dir, "fastsft_config.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(self._config_dict(), handle, sort_keys=False)

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        if not hasattr(self, "model"):
            self.setup()
        config = self.config
        has_eval = bool(self.data.eval)
        self.progress = Progress(total=self.total_steps, initial=self.global_step, mode=config.progress_bar,
                                 logging_steps=config.logging_steps, stream=self.stream)
        result = TrainResult(status="completed", global_step=self.global_step, output_dir=self.output_dir)
        self.model.train()
        last_eval_step = None
        try:
            with _SignalCatcher() as signals:
                if has_eval and config.eval_at_start and self.global_step == 0:
                    self.evaluate()
                    last_eval_step = 0
                while self.global_step < self.total_steps and signals.received is None:
                    record = self.train_step()
                    if record is None:
                        break  # the data ran out (num_epochs)
                    result.losses.append(record["loss"])
                    self.metrics.write(record)  # every step; logging_steps paces the console only
                    self.progress.update(self.global_step, record)
                    for callback in self.callbacks:
                        callback(self, record)
                    if has_eval and config.eval_steps > 0 and self.global_step % config.eval_steps == 0:
                        self.evaluate()
                        last_eval_step = self.global_step
                    if config.save_steps > 0 and self.global_step % config.save_steps == 0:
                        self.save_checkpoint()
                if signals.received is not None:
                    result.status, result.signal = "interrupted", signals.received
                    name = signal.Signals(signals.received).name
                    existing = dict(ckpt.list_checkpoints(self.output_dir)).get(self.global_step)
                    result.checkpoint = existing or self.save_checkpoint()
                    self.say(f"{name} received: stopped after step {self.global_step}; checkpoint {result.checkpoint}. "
                             f"Continue with: fastsft train CONFIG --output_dir {config.output_dir} --resume")
                else:
                    if has_eval and last_eval_step != self.global_step:
                        self.evaluate()
                    self.save_final()
        finally:
            self.progress.close()
        result.global_step = self.global_step
        if os.path.isfile(self.metrics.path):
            plot_loss_curve(self.metrics.path, os.path.join(self.output_dir, LOSS_CURVE_FILE))
        result.summary = self.summary(result)
        for line in summary_lines(result.summary):
            print(line, file=self.stream, flush=True)
        return result

    def summary(self, result: TrainResult) -> dict:
        train_records = [r for r in self.metrics.records() if r.get("type") == "train"]
        elapsed = self.totals["elapsed"]
        return {
            "status": result.status, "steps": self.global_step,
            "first_loss": train_records[0]["loss"] if train_records else None,
            "final_loss": train_records[-1]["loss"] if train_records else None,
            **self.eval_history,
            "skipped_steps": self.totals["skipped_steps"], "tokens": self.totals["tokens"],
            "trained_tokens": self.totals["trained_tokens"],
            "tokens_per_s": self.totals["tokens"] / elapsed if elapsed > 0 else None,
            "peak_memory_mb": peak_memory_mb(self.device), "elapsed": elapsed, "output_dir": self.output_dir,
        }


def train(config, *, callbacks: Sequence[Callable] = (), stream=None) -> TrainResult:
    """Run a whole training job described by a TrainConfig."""
    return Trainer(config, callbacks=callbacks, stream=stream).train()
