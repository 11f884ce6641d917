"""The training loop: accumulation windows normalised by trained tokens, eval, checkpoints, signals."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from fastsft import run_dir
from fastsft.errors import ConfigError, DataError
from fastsft.train import checkpoint as ckpt
from fastsft.train.batch import batch_to_device, output_vocab_size
from fastsft.train.evaluate import autocast_factory, evaluate_loss, generate_replies, reference_replies
from fastsft.train.metrics import (LOSS_CURVE_FILE, MetricsWriter, Progress, open_reporters, peak_memory_mb,
                                   plot_loss_curve, summary_lines)
from fastsft.train.model import (BASE_MODEL_DIR, TINY_MODEL, build_tiny_base, count_parameters, load_model,
                                 load_tokenizer, resolve_device, resolve_precision)
from fastsft.train.optim import build_optimizer, build_scheduler

logger = logging.getLogger("fastsft.train")


def _repoint(model, tokenizer, path: str) -> None:
    """The base was loaded from its staging folder: record where it now lives (adapter_config.json's
    base_model_name_or_path, the configs' name_or_path) so the saved adapter finds it."""
    for peft_config in getattr(model, "peft_config", {}).values():
        peft_config.base_model_name_or_path = path
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for obj in (inner, getattr(inner, "config", None), model, getattr(model, "config", None)):
        if obj is None:
            continue
        for attr in ("_name_or_path", "name_or_path"):
            if hasattr(obj, attr):
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(obj, attr, path)
    with contextlib.suppress(AttributeError, TypeError):
        tokenizer.name_or_path = path


from fastsft.errors import TrainingError  # noqa: E402,F401 - defined there so checkpoint.py can raise it


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

    def __init__(self, lengths: List[int], config, *, epochs_limit: Optional[int], mixture=None,
                 epochs: Optional[float] = None):
        from fastsft.data import plan_batches

        self._plan_batches = plan_batches
        self.mixture = mixture  # several sources: which examples each epoch holds (fastsft.data.mix)
        self.lengths = lengths
        self.config = config
        self.epochs_limit = epochs_limit  # None: cycle through epochs until max_steps
        # num_epochs 1.5: the last epoch counts its first half (None: max_steps decides)
        self.epochs = None if epochs_limit is None else float(epochs_limit if epochs is None else epochs)
        self.epoch = 0
        self.index = 0
        self._plans: Dict[int, List[List[int]]] = {}

    def plan(self, epoch: int) -> List[List[int]]:
        if epoch not in self._plans:
            chosen = self.mixture.epoch_indices(epoch) if self.mixture is not None else None
            lengths = self.lengths if chosen is None else [self.lengths[i] for i in chosen]
            plan = self._plan_batches(
                lengths, batch_tokens=self.config.batch_tokens, packing=self.config.packing,
                batch_size=self.config.batch_size, seed=self.config.seed, epoch=epoch,
            )
            self._plans = {epoch: plan if chosen is None else [[chosen[i] for i in batch] for batch in plan]}
            if not self._plans[epoch]:
                raise DataError(f"{self.config.dataset or 'datasets'}: no training examples left to batch")
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

    def epochs_passed(self) -> int:
        """Whole epochs consumed (an epoch whose last micro-batch was taken counts as passed)."""
        if self.epochs_limit is not None and self.epoch >= self.epochs_limit:
            return self.epoch
        return self.epoch + (1 if self.index >= len(self.plan(self.epoch)) else 0)

    def progress(self) -> float:
        """Epochs done, as a fraction."""
        plan = self.plan(self.epoch) if self.epochs_limit is None or self.epoch < self.epochs_limit else None
        return self.epoch + (self.index / len(plan) if plan else 0.0)

    def count_steps(self, window: int) -> int:
        whole = int(self.epochs)
        micro_batches = sum(len(self.plan(e)) for e in range(whole))
        if self.epochs > whole:  # a fractional last epoch: its first share of micro-batches
            micro_batches += math.ceil((self.epochs - whole) * len(self.plan(whole)))
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

    def agreed(self, dist) -> Optional[int]:
        """The signal any rank received (every process stops after the same step)."""
        self.received = dist.agreed_signal(self.received)
        return self.received

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

    def __init__(self, config, *, callbacks: Sequence[Callable] = (), stream=None,
                 command: Optional[Sequence[str]] = None):
        self.config = config
        self.command = list(command) if command is not None else None  # the CLI's argv, for the resume hint
        self.callbacks = list(callbacks)
        self.stream = stream or sys.stderr
        self.output_dir = os.path.abspath(config.output_dir)

    # ------------------------------------------------------------------ setup
    def say(self, text: str) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def preflight(self) -> None:
        """Everything about the output folder, the resume point and the model that can fail, checked
        before anything is written (the CLI has read the data already)."""
        from fastsft import preflight

        config = self.config
        self.output_state, self.resume_from, self.resume_changes = preflight.check_run(
            config, self.output_dir, lock=self.dist.is_main)
        preflight.check_model_config_keys(config)
        if self.dist.is_main:  # this run owns output_dir from here on (the other ranks follow rank 0)
            from fastsft import run_lock

            self._made_output_dir = not os.path.isdir(self.output_dir)
            run_lock.acquire(self.output_dir)
            self._locked = True
        if config.resume not in (False, None, "") and self.resume_from is None:
            self.say(f"resume: no checkpoint in {self.output_dir}; starting from scratch")

    def _stage_base(self) -> tuple:
        """(directory or hub name to load from, staging folder or None). tiny-llama is built in a
        temporary folder and moved into output_dir/base_model only once everything has loaded; the base of
        a resumed run is reused as it is (its adapter points at it)."""
        config = self.config
        if config.model != TINY_MODEL:
            return config.model, None
        final = os.path.join(self.output_dir, BASE_MODEL_DIR)
        reuse = self.resume_from is not None or not self.dist.is_main  # other ranks: rank 0 published it
        if reuse and os.path.isfile(os.path.join(final, "config.json")):
            return final, None
        staging = tempfile.mkdtemp(prefix="fastsft-base-")
        try:
            build_tiny_base(config, self._tokenizer_source(), os.path.join(staging, BASE_MODEL_DIR))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return os.path.join(staging, BASE_MODEL_DIR), staging

    def _tokenizer_source(self) -> str:
        """The data the tiny tokenizer is trained on: the (first) training source."""
        config = self.config
        return config.dataset if config.dataset else config.datasets[0]["path"]

    def _commit_output(self, base: str, staging: Optional[str]) -> str:
        """The run is known to start: clear an overwritten run, publish the staged base, create output_dir.
        Rank 0 only (torchrun): the other ranks run after it and find the folder ready."""
        if not self.dist.is_main:
            return base
        stale = run_dir.stale_staging(self.output_dir)
        for path in stale:  # a checkpoint or final save cut short (disk full, a kill): never complete
            shutil.rmtree(path, ignore_errors=True)
        if stale:
            self.say(f"output_dir: removed {len(stale)} unfinished write{'s' if len(stale) > 1 else ''} left by an "
                     f"earlier run ({', '.join(os.path.relpath(p, self.output_dir) for p in stale[:3])})")
        if self.config.overwrite_output_dir and self.resume_from is None and self.output_state != "new":
            removed = run_dir.clear_run(self.output_dir)
            kept = run_dir.foreign_files(self.output_dir)
            self.say(f"overwrite: removed the earlier run in {self.output_dir} ({len(removed)} entries fastsft wrote"
                     + (f"; kept {len(kept)} it did not write)" if kept else ")"))
        os.makedirs(self.output_dir, exist_ok=True)
        from fastsft.config import reporters

        run_dir.record(self.output_dir, [run_dir.CHECKPOINTS_DIR, "metrics.jsonl", LOSS_CURVE_FILE, run_dir.CONFIG_FILE]
                       + ([BASE_MODEL_DIR] if staging is not None else [])
                       + [run_dir.TENSORBOARD_DIR if name == "tensorboard" else name for name in reporters(self.config)])
        self._write_dedup_report()
        cache = self.config.cache_dir
        if cache and os.path.dirname(os.path.abspath(cache)) == os.path.abspath(self.output_dir):
            run_dir.record(self.output_dir, [cache])  # a tokenised-data cache kept inside the run folder
        if staging is None:
            return base
        final = os.path.join(self.output_dir, BASE_MODEL_DIR)
        if os.path.isdir(final):  # an earlier run stopped before any checkpoint: nothing points at it
            if run_dir.holds_adapter(self.output_dir):  # pragma: no cover - refused by check_output_dir
                raise ConfigError(f"{final} belongs to an adapter in {self.output_dir}; not replacing it")
            shutil.rmtree(final)
        shutil.move(base, final)
        ckpt.apply_umask(final)
        shutil.rmtree(staging, ignore_errors=True)
        _repoint(self.model, self.tokenizer, os.path.abspath(final))
        return os.path.abspath(final)

    def _prepare_data(self) -> tuple:
        """(PreparedData, Mixture or None): one dataset, or several mixed by weight (config key datasets)."""
        from fastsft.data import prepare_data

        if self.config.datasets:
            from fastsft.data.mix import prepare_mixture

            return prepare_mixture(self.config, self.tokenizer)
        return prepare_data(self.config.data_options(), self.tokenizer), None

    def _no_examples_message(self) -> str:
        stats = self.data.stats
        reasons = []
        if stats.dropped_too_long:
            reasons.append(f"{stats.dropped_too_long} longer than max_seq_length {self.config.max_seq_length} "
                           f"(truncation: drop)")
        if stats.dropped_no_trained_tokens:
            reasons.append(f"{stats.dropped_no_trained_tokens} with no trained token under mask "
                           f"{self.config.mask!r} (after truncation to {self.config.max_seq_length} tokens)")
        why = "; ".join(reasons) or "none were loaded"
        source = self.config.dataset or ", ".join(d["path"] for d in self.config.datasets)
        return f"{source}: no training examples left after preparation: {stats.loaded} loaded, dropped {why}"

    def setup(self) -> None:
        try:
            self._setup()
        except BaseException:
            self.release_output_dir()
            raise

    def release_output_dir(self) -> None:
        """Give up the lock; a folder this run created and left empty is removed again."""
        if not getattr(self, "_locked", False):
            return
        from fastsft import run_lock

        run_lock.release(self.output_dir)
        self._locked = False
        if getattr(self, "_made_output_dir", False):
            with contextlib.suppress(OSError):
                os.rmdir(self.output_dir)  # only when empty

    def _setup(self) -> None:
        from fastsft.distributed import NullMetrics, setup_distributed

        config = self.config
        self.dist = setup_distributed(config)  # torchrun: this rank; else a single process
        if not self.dist.is_main:
            self.stream = open(os.devnull, "w")  # logs and metrics come from rank 0
        with self.dist.main_first():  # rank 0 checks, builds and publishes output_dir before the others read it
            self._setup_model()
        for line in self.data.summary_lines():
            self.say(line)
        if self.mixture is not None:
            from fastsft.data.mix import mixture_lines

            for line in mixture_lines(config, self.mixture):
                self.say(line)
        trainable, total = count_parameters(self.model)
        self.say(f"model: {config.model} ({config.mode}, {self.precision.name} on {self.device.type}): "
                 f"{trainable:,} trainable of {total:,} parameters")
        self.model = self.dist.wrap_model(self.model, config, self.device, self.precision.compute_dtype)
        from fastsft.train.compile import compile_model  # issue 29: torch_compile

        compile_model(self.model, config, self.device, self.say)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config)
        lengths = [len(e.input_ids) for e in self.data.train]
        self.stream_data = DataStream(lengths, config, epochs_limit=None if config.max_steps > 0 else
                                      math.ceil(config.num_epochs), mixture=self.mixture, epochs=config.num_epochs)
        self.dist.check_data(len(self.stream_data.plan(0)), config.dataset or "the training data")
        window = config.gradient_accumulation_steps * self.dist.data_parallel_size  # micro-batches per step
        self.total_steps = config.max_steps if config.max_steps > 0 else self.stream_data.count_steps(window)
        self.say(self._batch_line(window))
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.scaler else None
        self.autocast = autocast_factory(self.device, self.precision.compute_dtype, self.precision.autocast)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.global_step = 0
        self.last_eval_step: Optional[int] = None
        self.totals = {"tokens": 0, "trained_tokens": 0, "skipped_steps": 0, "elapsed": 0.0}
        self.eval_history: Dict[str, Optional[float]] = {}
        from fastsft.early_stopping import BestModel  # issue 25

        self.best = BestModel.from_config(config)
        self.stopped_early: Optional[int] = None
        self.best_restored: Optional[int] = None
        self._last_saved_step: Optional[int] = None
        if self.resume_from is not None:
            state = self.dist.load_checkpoint(self.resume_from, model=self.model, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler)
            self.global_step = state["global_step"]
            self.stream_data.epoch, self.stream_data.index = state["epoch"], state["batch_index"]
            self.totals.update(state.get("totals", {}))
            self.eval_history.update(state.get("eval_history", {}))
            self.last_eval_step = state.get("last_eval_step")
            if self.best is not None:  # issue 25: the best score and step, and the patience counter
                self.best.load_state(state.get("best_model"))
            self.say(f"resumed from {self.resume_from} at step {self.global_step}")
            if self.resume_changes:
                self._honour_changes()
            else:
                self._sync_lr()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.metrics = (MetricsWriter(self.output_dir, resume_step=self.global_step if self.resume_from else None)
                        if self.dist.is_main else NullMetrics())
        if self.resume_from is not None and self.dist.is_main:
            self._note_final_eval()
        self.reporters = (open_reporters(config, self.output_dir, resumed=self.resume_from is not None,
                                         resume_step=self.global_step) if self.dist.is_main else [])

    def _setup_model(self) -> None:
        config = self.config
        self.preflight()
        seed_everything(config.seed)
        self.device = self.dist.device_for(resolve_device(config))
        if self.device.type == "cpu":
            self._set_cpu_threads()
        self.precision = resolve_precision(config, self.device)
        base, staging = self._stage_base()
        try:
            # tiny-llama: base holds the tokenizer the model was sized for (trained on the data, or config.tokenizer)
            self.tokenizer = load_tokenizer(base if config.model == TINY_MODEL else (config.tokenizer or base), config)
            if config.chat_template not in (None, "tokenizer"):  # the saved tokenizer carries what it was trained on
                from fastsft.data.templates import resolve_chat_template

                self.tokenizer.chat_template = resolve_chat_template(config.chat_template, self.tokenizer)
            self.data, self.mixture = self._prepare_data()
            if not self.data.train:
                raise DataError(self._no_examples_message())
            from fastsft.data.audit import config_audit_lines  # issue 25: shown before training

            self._audit_lines = config_audit_lines(config, self.data, self.tokenizer)
            self._find_duplicates()  # issue 25: duplicates and train/eval overlap (dedup: drop removes them)
            self._setup_quality()  # issue 25: eval_metrics and the forgetting probe, before anything is written
            needs_eval = (config.eval_steps > 0 and config.eval_strategy == "steps") or config.eval_exact_match \
                or config.eval_strategy == "epoch" or bool(config.eval_metrics)
            if needs_eval and not self.data.eval and (self.forgetting is None or config.eval_exact_match
                                                      or config.eval_metrics):
                raise ConfigError(
                    "evaluation (eval_steps / eval_exact_match / eval_metrics) needs a held-out split: set "
                    "'eval_dataset' or 'eval_fraction'"
                )
            from fastsft.train import long_context

            element_size = self.precision.compute_dtype.itemsize
            model_config = _model_config(base, config)
            long_context.check_positions(config, model_config)  # both before any weight is loaded
            planned = long_context.plan_before_load(config, model_config, self.device, element_size)
            self.model = load_model(base, config, self.device, self.precision)
            self.vocab_size = output_vocab_size(self.model)
            long_line = long_context.apply(config, self.model, self.device, element_size, planned)
            base = self._commit_output(base, staging)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        for note in getattr(config, "_notes", []):  # once the run starts: an error stays the only line
            self.say(note)
        if long_line:
            self.say(long_line)
        if getattr(self, "_threads_line", None):
            self.say(self._threads_line)
        for line in getattr(self, "_audit_lines", []):  # issue 25: the supervision audit
            self.say(line)
        if getattr(self, "_dedup", None) is not None:
            from fastsft.data.dedup import REPORT_FILE

            self.say(self._dedup.summary_line(config.dedup, REPORT_FILE))

    def _setup_quality(self) -> None:
        """issue 25: the eval metrics (python ones called on every held-out reference first, so one that raises
        or returns a non-number stops the run here) and the forgetting probe's data."""
        from fastsft.eval_metrics import check_python_metrics, config_metrics

        config = self.config
        self.eval_metric_list = config_metrics(config) if self.data.eval else []
        examples = self.data.eval[: config.eval_max_examples or None]
        check_python_metrics(self.eval_metric_list, reference_replies(self.tokenizer, examples))
        self.forgetting = None
        if config.forgetting_dataset:
            from fastsft.train.forgetting import prepare_probe

            self.forgetting = prepare_probe(config, self.tokenizer)

    def _set_cpu_threads(self) -> None:
        """cpu_threads, or by default the cores no other work keeps busy (never more than torch's default,
        the physical cores): on a busy machine extra threads only spin against the other work."""
        from fastsft.distributed.launch import usable_cores

        if self.config.cpu_threads > 0:
            torch.set_num_threads(self.config.cpu_threads)
            return
        cores = usable_cores()
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - Windows
            load = 0.0
        free = max(1, int(cores - load + 0.5) // max(1, self.dist.world_size))
        threads = max(1, min(torch.get_num_threads(), free))
        torch.set_num_threads(threads)
        # said once the model has loaded, so that a config error stays the only line
        self._threads_line = f"cpu threads: {threads} ({cores} cores, load {load:.1f}; cpu_threads: N chooses)"

    def _batch_line(self, window: int) -> str:
        """What one optimizer step trains on, in the units users size batches in."""
        config = self.config
        if config.packing:
            per_micro = f"{config.batch_tokens} tokens per packed micro-batch"
            step = f"up to {config.batch_tokens * window:,} tokens per optimizer step"
        else:
            per_micro = f"{config.batch_size} examples per micro-batch (up to {config.max_seq_length} tokens each)"
            step = f"up to {config.batch_size * config.max_seq_length * window:,} tokens per optimizer step"
        ranks = f" x {self.dist.world_size} processes" if self.dist.world_size > 1 else ""
        return (f"batch: {per_micro} x {config.gradient_accumulation_steps} accumulation{ranks} = {step}, "
                f"{self.total_steps} steps")

    def _note_final_eval(self) -> None:
        """A resumed finished run already evaluated its last step after the checkpoint: do not do it twice."""
        for record in self.metrics.records():
            if record.get("type") == "eval" and record.get("step") == self.global_step:
                self.last_eval_step = self.global_step
                self.eval_history["eval_loss"] = record.get("eval_loss")
                self.eval_history["exact_match"] = record.get("eval_exact_match")
                self._remember_eval(record)  # issue 25: every eval metric and forgetting

    def _sync_lr(self) -> None:
        """The learning rate of the next update (number global_step, 0-based) from the schedule of *this*
        config: a resumed run with a larger max_steps continues on the stretched schedule at once, not
        with the rate its checkpoint ended on."""
        self.scheduler.last_epoch = self.global_step
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["lr"] = group["initial_lr"] * factor(self.global_step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _honour_changes(self) -> None:
        """--resume_changed_config: the optimizer hyper-parameters and the schedule take the new values
        from the resumed step (the checkpoint's own were restored with its state)."""
        from fastsft import preflight

        config = self.config
        fresh = build_optimizer(self.model, config)  # the groups the new config gives (same order)
        for group, new in zip(self.optimizer.param_groups, fresh.param_groups):
            for key, value in new.items():
                if key not in ("params", "initial_lr"):
                    group[key] = value
            group["initial_lr"] = new["lr"]
        del fresh
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self._sync_lr()
        self.say(f"resume: continuing with the changed config ({preflight.describe_changes(self.resume_changes)}) "
                 f"from step {self.global_step}; the learning-rate schedule is rebuilt")

    # ------------------------------------------------------------------ one step
    def collate(self, indices: List[int]) -> dict:
        from fastsft.data import collate

        return collate([self.data.train[i] for i in indices], packing=self.config.packing,
                       pad_token_id=self.pad_token_id, pad_to_multiple_of=self.config.pad_to_multiple_of)

    def compute_loss(self, batch: dict, num_items: int) -> torch.Tensor:
        """Loss of one micro-batch = its trained-token loss sum / trained tokens of the whole window."""
        # host label check, then one device copy per batch (cu_seqlens pre-validated, max lengths as ints)
        inputs = batch_to_device(batch, self.device, vocab_size=self.vocab_size)
        offload = contextlib.nullcontext()
        if self.config.offload_activations:  # to pinned host memory on a side stream, prefetched a layer ahead
            from fastsft.train.offload import OverlappedOffload, decoder_layers

            offload = OverlappedOffload(self.device, decoder_layers(self.model))
        with self.autocast(), offload:
            out = self.model(**inputs, num_items_in_batch=num_items, use_cache=False)
        return out.loss

    def accumulate(self, batches: List[dict], num_items: Optional[int] = None) -> tuple:
        """Forward + backward of every micro-batch in the window; returns (window loss, trained tokens).

        `num_items`: the trained tokens of the whole window (all ranks); default: those of `batches`."""
        if num_items is None:
            num_items = sum(b["num_trained_tokens"] for b in batches)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        if num_items == 0:
            return total, 0
        for i, batch in enumerate(batches):
            with self.dist.grad_sync(self.model, last=i == len(batches) - 1), self.dist.sequence_exchange():
                loss = self.compute_loss(batch, num_items)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().float()
        return self.dist.sum_over_ranks(total), num_items

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
        windows = self.stream_data.next_window(self.config.gradient_accumulation_steps * self.dist.data_parallel_size)
        if not windows:
            return None
        started = time.perf_counter()
        batches = self.dist.local_batches(windows, self.collate)  # whole window first: its trained-token count
        tokens, trained = self.dist.window_counts(batches)  # of every rank
        lr = self.optimizer.param_groups[0]["lr"]
        loss, trained = self.accumulate(batches, trained)
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
            grad_norm = self.dist.clip_grad_norm(self.params, max_norm)
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
    def eval_batches(self, examples: Optional[list] = None) -> List[dict]:
        from fastsft.train.evaluate import held_out_batches

        return held_out_batches(self.data.eval if examples is None else examples, self.config, self.pad_token_id)

    def evaluate(self) -> dict:
        from fastsft import eval_metrics

        record = {"type": "eval", "step": self.global_step}
        parts = []
        if self.data.eval:
            record["eval_loss"] = evaluate_loss(self.model, self.eval_batches(), device=self.device,
                                                autocast=self.autocast)
            parts.append(f"loss {record['eval_loss']:.4f}")
        if self.eval_metric_list:  # one generation per example, shared by every metric
            config = self.config
            replies = generate_replies(
                self.dist.unwrap(self.model), self.tokenizer, self.data.eval[: config.eval_max_examples or None],
                device=self.device, autocast=self.autocast, max_new_tokens=config.eval_max_new_tokens,
                batch_size=config.eval_batch_size, do_sample=config.eval_do_sample,
                temperature=config.eval_temperature, top_p=config.eval_top_p, seed=config.seed)
            scored = eval_metrics.score_replies(self.eval_metric_list, replies)
            for metric in self.eval_metric_list:
                value = scored["means"][metric.name]
                record[f"eval_{metric.name}"] = value
                shown = f"{value:.4g}" if metric.kind == "python" else f"{100 * value:.1f}%"
                parts.append(f"{metric.name.replace('_', ' ')} {shown}")
            record["eval_examples"] = len(replies)
            parts[-1] += f" of {len(replies)} replies"
            if replies:
                parts[-1] += f"  (e.g. expected {replies[0].reference!r}, generated {replies[0].reply!r})"
            self._write_worst(replies, scored["per_reply"])
        if self.forgetting is not None:
            parts.append(self._probe_forgetting(record))
        self.log(record)
        self.say(f"eval @ step {self.global_step}: " + ", ".join(parts))
        self.last_eval_step = self.global_step
        if self.global_step == 0:  # the untrained model's baseline (eval_at_start)
            self.eval_history["eval_loss_start"] = record.get("eval_loss")
            self.eval_history["exact_match_start"] = record.get("eval_exact_match")
        self._remember_eval(record)
        self._track_best(record)  # issue 25
        return record

    def _remember_eval(self, record: dict) -> None:
        """The latest eval's values under their plain names (eval_loss, exact_match, contains, forgetting):
        the summary and the gates read them."""
        for key, value in record.items():
            if key.startswith("eval_") and key != "eval_examples":
                self.eval_history[key if key == "eval_loss" else key[len("eval_"):]] = value

    def _probe_forgetting(self, record: dict) -> str:
        """issue 25: the probe's loss now; at step 0 it is the baseline every later eval is compared with."""
        from fastsft.train.forgetting import describe, relative_increase

        if getattr(self, "_forgetting_batches", None) is None:
            self._forgetting_batches = self.eval_batches(self.forgetting)
        loss = evaluate_loss(self.model, self._forgetting_batches, device=self.device, autocast=self.autocast)
        if self.global_step == 0:
            self.eval_history["forgetting_loss_start"] = loss
        record["eval_forgetting_loss"] = loss
        increase = relative_increase(loss, self.eval_history.get("forgetting_loss_start"))
        if increase is not None:
            record["eval_forgetting"] = increase
        return describe(loss, increase)

    def _forgetting_baseline(self) -> None:
        """The probe before the first step when no eval runs at step 0 (eval_at_start: false)."""
        record = {"type": "eval", "step": 0}
        text = self._probe_forgetting(record)
        self.log(record)
        self.say(f"forgetting probe @ step 0 (baseline): {text}")

    def _write_worst(self, replies: list, per_reply: list) -> None:
        """eval_worst.md / .jsonl next to the model: the N lowest-scoring replies by the first metric."""
        from fastsft import eval_metrics

        count = self.config.eval_worst_examples
        if not self.dist.is_main or count <= 0 or not replies:
            return
        run_dir.record(self.output_dir, [eval_metrics.WORST_MD, eval_metrics.WORST_JSONL])
        rows = eval_metrics.worst_rows(self.eval_metric_list, replies, per_reply, count)
        eval_metrics.write_worst(self.output_dir, rows, self.eval_metric_list, self.global_step)

    def train_state(self) -> dict:
        return {
            "global_step": self.global_step, "epoch": self.stream_data.epoch, "batch_index": self.stream_data.index,
            "totals": dict(self.totals), "eval_history": dict(self.eval_history), "total_steps": self.total_steps,
            "last_eval_step": self.last_eval_step,
            **({"best_model": self.best.state()} if getattr(self, "best", None) is not None else {}),
        }

    def log(self, record: dict) -> None:
        """One record to metrics.jsonl and to every report_to tool."""
        self.metrics.write(record)
        for reporter in self.reporters:
            reporter.write(record)

    def save_checkpoint(self) -> str:
        if self.dist.is_main:
            ckpt.check_free_space(self.output_dir, self.global_step, self.model, self.optimizer)
        keep_best = self._keeps_best()  # issue 25: save_total_limit never removes the best checkpoint
        path = self.dist.save_checkpoint(
            self.output_dir, step=self.global_step, model=self.model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            train_state=self.train_state(), config_dict=self._config_dict(),
            keep=0 if keep_best else self.config.save_total_limit,
        )
        if keep_best and self.dist.is_main:
            from fastsft.early_stopping import rotate_checkpoints

            rotate_checkpoints(ckpt.list_checkpoints(self.output_dir), self.config.save_total_limit,
                               protect=self.best.best_step)
        self._last_saved_step = self.global_step
        self.say(f"checkpoint: {path}")
        return path

    def _config_dict(self) -> dict:
        values = self.config.to_dict()
        values["resume"] = False  # a saved config starts a run, it does not resume one
        values["resume_changed_config"] = values["overwrite_output_dir"] = False
        return values

    def save_final(self) -> None:
        """The final model, written into .tmp-final first: its names join the manifest before they land."""
        import yaml

        staging = os.path.join(self.output_dir, run_dir.STAGING_PREFIX + "final")
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            self.dist.save_model_files(self.model, self.tokenizer, staging)
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ckpt.write_failure(f"the final model in {self.output_dir}", exc,
                                     ckpt.latest_checkpoint(self.output_dir)) from None
        if not self.dist.is_main:
            return
        names = sorted(os.listdir(staging))
        run_dir.record(self.output_dir, names)
        for name in names:
            target = os.path.join(self.output_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging, ignore_errors=True)
        with open(os.path.join(self.output_dir, "fastsft_config.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(self._config_dict(), handle, sort_keys=False)

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        try:
            return self._train()
        finally:
            self.release_output_dir()

    def _train(self) -> TrainResult:
        if not hasattr(self, "model"):
            self.setup()
        config = self.config
        has_eval = bool(self.data.eval) or self.forgetting is not None
        self.progress = Progress(total=self.total_steps, initial=self.global_step, mode=config.progress_bar,
                                 logging_steps=config.logging_steps, stream=self.stream)
        result = TrainResult(status="completed", global_step=self.global_step, output_dir=self.output_dir)
        self.model.train()
        try:
            with _SignalCatcher() as signals:
                if has_eval and config.eval_at_start and self.global_step == 0:
                    self.evaluate()
                elif self.forgetting is not None and self.global_step == 0:
                    self._forgetting_baseline()  # issue 25: forgetting needs the untrained model's probe loss
                epochs_before = self.stream_data.epochs_passed()
                if self.best is not None and self.best.should_stop():  # issue 25: resumed after an early stop
                    self.stopped_early = self.global_step
                    self.say(f"early stopping: the run stopped at step {self.global_step} (no improvement for "
                             f"{self.best.evals_without_improvement} evals); nothing to train")
                while self.global_step < self.total_steps and self.stopped_early is None \
                        and signals.agreed(self.dist) is None:
                    record = self.train_step()
                    if record is None:
                        break  # the data ran out (num_epochs)
                    result.losses.append(record["loss"])
                    self.log(record)  # every step; logging_steps paces the console only
                    self.progress.update(self.global_step, record)
                    for callback in self.callbacks:
                        callback(self, record)
                    epoch_done = self.stream_data.epochs_passed() > epochs_before
                    epochs_before = self.stream_data.epochs_passed()
                    if has_eval and self._due(config.eval_strategy, config.eval_steps, epoch_done):
                        self.evaluate()
                    if self._due(config.save_strategy, config.save_steps, epoch_done) or self._best_unsaved():
                        self.save_checkpoint()
                    if self._stop_early():  # issue 25
                        break
                if signals.agreed(self.dist) is not None:
                    result.status, result.signal = "interrupted", signals.received
                    name = signal.Signals(signals.received).name
                    existing = dict(ckpt.list_checkpoints(self.output_dir)).get(self.global_step)
                    result.checkpoint = existing or self.save_checkpoint()
                    self.say(f"{name} received: stopped after step {self.global_step}; checkpoint {result.checkpoint}. "
                             f"Continue with: {self.resume_command()}")
                else:
                    if has_eval and self.last_eval_step != self.global_step:
                        self.evaluate()
                    self._restore_best()  # issue 25: load_best_model_at_end
                    self.save_final()
        finally:
            self.progress.close()
            for reporter in self.reporters:
                reporter.close()
        result.global_step = self.global_step
        if os.path.isfile(self.metrics.path):
            plot_loss_curve(self.metrics.path, os.path.join(self.output_dir, LOSS_CURVE_FILE))
        result.summary = self.summary(result)
        for line in summary_lines(result.summary):
            print(line, file=self.stream, flush=True)
        return result

    # ------------------------------------------------------------------ issue 25: best model, early stopping, dedup
    def _find_duplicates(self) -> None:
        from fastsft.data import dedup

        self._dedup = dedup.dedup_run(self.config, self.data, self.mixture)
        if self._dedup is not None and self.config.dedup == "drop":
            self.data, self.mixture = dedup.drop_duplicates(self.data, self.mixture, self._dedup)

    def _write_dedup_report(self) -> None:
        """dedup_report.jsonl: one JSON object per pair (rewritten by every run of the folder)."""
        if getattr(self, "_dedup", None) is None:
            return
        from fastsft.data.dedup import REPORT_FILE, report_path

        run_dir.record(self.output_dir, [REPORT_FILE])
        self._dedup.write(report_path(self.output_dir))

    def _keeps_best(self) -> bool:
        return getattr(self, "best", None) is not None and self.config.load_best_model_at_end

    def _track_best(self, record: dict) -> None:
        if self.best is None:
            return
        value = record.get(self.best.metric)
        if value is None:
            known = ", ".join(k for k, v in record.items() if k.startswith("eval_") and isinstance(v, (int, float)))
            raise TrainingError(f"metric_for_best_model: the eval at step {self.global_step} measured no "
                                f"{self.best.metric!r} (it measured {known})")
        if getattr(self.dist, "world_size", 1) > 1:  # every rank decides alike: the mean over ranks
            value = float(self.dist.sum_over_ranks(torch.tensor(float(value), dtype=torch.float64))) \
                / self.dist.world_size
        self.best.update(self.global_step, value, record)

    def _best_unsaved(self) -> bool:
        """load_best_model_at_end: an eval that set a new best writes a checkpoint at its step."""
        return self._keeps_best() and self.best.best_step == self.global_step \
            and self._last_saved_step != self.global_step

    def _stop_early(self) -> bool:
        if self.best is None or not self.best.should_stop():
            return False
        self.stopped_early = self.global_step
        self.say(self.best.stop_line(self.global_step))
        if self.config.save_strategy != "no" and self._last_saved_step != self.global_step:
            self.save_checkpoint()  # a resume of this run starts here and trains nothing more
        return True

    def _restore_best(self) -> None:
        """The final model becomes the best eval's: its checkpoint's weights are loaded before save_final."""
        if not self._keeps_best():
            return
        best = self.best
        if best.best_step is None:
            self.say(f"load_best_model_at_end: no eval after step 0 measured {best.metric}; the final model is the "
                     f"last one")
            return
        if best.best_step != self.global_step:
            from fastsft.early_stopping import checkpoint_of

            path = checkpoint_of(ckpt.list_checkpoints(self.output_dir), best.best_step)
            if path is None:
                self.say(f"load_best_model_at_end: the checkpoint of step {best.best_step} is gone; the final model "
                         f"is the last one (step {self.global_step})")
                return
            self.dist.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      scaler=self.scaler)
        self.best_restored = best.best_step
        for key in list(self.eval_history):  # the end-of-run values (and gates) describe the saved model
            if not key.endswith("_start"):
                for name in (key, f"eval_{key}"):
                    if name in best.best_record:
                        self.eval_history[key] = best.best_record[name]
                        break
        if not any(r.get("type") == "best_model" and r.get("step") == self.global_step
                   for r in self.metrics.records()):  # a resumed finished run logged it already
            self.log({"type": "best_model", "step": self.global_step, "best_step": best.best_step,
                      "metric_for_best_model": best.metric, "best_metric": best.best_value})
        self.say(f"load_best_model_at_end: the saved model is step {best.best_step}'s ({best.metric} "
                 f"{best.best_value:.4g}, the best of {best.evals} evals)")

    def _best_summary(self) -> dict:
        if getattr(self, "best", None) is None:
            return {}
        return {"metric_for_best_model": self.best.metric, "best_metric": self.best.best_value,
                "best_step": self.best.best_step, "stopped_early_at": self.stopped_early,
                "saved_model_step": self.best_restored if self.best_restored is not None else self.global_step}

    def _due(self, strategy: str, every: int, epoch_done: bool) -> bool:
        """save_strategy / eval_strategy: is a checkpoint (an eval) due after this step?"""
        if strategy == "epoch":
            return epoch_done
        return strategy == "steps" and every > 0 and self.global_step % every == 0

    def resume_command(self) -> str:
        """The command that continues this run: the one that started it plus --resume (the CLI's argv),
        else the run folder alone (its checkpoint holds the config)."""
        if self.command is not None:
            words = [w for w in self.command if w not in ("--resume", "--overwrite", "--overwrite_output_dir")]
            world = getattr(getattr(self, "dist", None), "world_size", 1)
            if world > 1 and not any(w == "--nproc" or w.startswith("--nproc=") for w in words):
                words += ["--nproc", str(world)]  # a rank's argv lacks the launch flag: the run needs it back
            return shlex.join(["fastsft", *words, "--resume"])
        return shlex.join(["fastsft", "train", "--resume", self.output_dir])

    def summary(self, result: TrainResult) -> dict:
        train_records = [r for r in self.metrics.records() if r.get("type") == "train"]
        elapsed = self.totals["elapsed"]
        return {
            "status": result.status, "steps": self.global_step,
            "first_loss": train_records[0]["loss"] if train_records else None,
            "final_loss": train_records[-1]["loss"] if train_records else None,
            **self.eval_history, "eval_metric_kinds": {m.name: m.kind for m in self.eval_metric_list},
            **self._best_summary(),
            "skipped_steps": self.totals["skipped_steps"], "tokens": self.totals["tokens"],
            "trained_tokens": self.totals["trained_tokens"],
            "tokens_per_s": self.totals["tokens"] / elapsed if elapsed > 0 else None,
            "peak_memory_mb": peak_memory_mb(self.device), "elapsed": elapsed, "output_dir": self.output_dir,
        }


def train(config, *, callbacks: Sequence[Callable] = (), stream=None,
          command: Optional[Sequence[str]] = None) -> TrainResult:
    """Run a whole training job described by a TrainConfig (`command`: the CLI's argv, for messages)."""
    return Trainer(config, callbacks=callbacks, stream=stream, command=command).train()


def _model_config(base: str, config):
    """The model's config.json alone (issue 22: the context check runs before the weights load)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base, trust_remote_code=config.trust_remote_code)
