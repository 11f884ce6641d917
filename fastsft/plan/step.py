"""One optimizer step of a config, traced under FakeTensorMode: peak device memory and its parts.

What runs is what `fastsft train` runs (Trainer.compute_loss / accumulate / train_step): the forward
under autocast (and, with offload_activations, fastsft's overlapped offload: fastsft.train.offload), backward, gradient clipping, the optimizer's
step, zero_grad. The trace is the steady state of a run: the optimizer state exists before the step (as
from step 2 on), and with gradient accumulation the gradients of the window's earlier micro-batches
are alive while the last one runs.

Fake tensors are CPU tensors (a fake CUDA tensor aborts the first backward without a CUDA build); the
planned run is a GPU's, so two things CPU tensors would change are set back: transformers treats a fake
tensor as tracing (it would build a full L x L causal mask and leave its causal / GQA fast paths), and
save_on_cpu sees CPU tensors already (it would neither copy them out nor back).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch

from fastsft.errors import ConfigError

GiB = 1024 ** 3


@dataclass
class StepPlan:
    recipe: str
    mode: str
    seq_len: int
    batch: int  # documents (rows) of seq_len tokens per micro-batch
    accumulation: int
    tokens_per_step: int
    peak_bytes: int
    weights_bytes: int  # frozen parameters (4-bit data and quant states included) and buffers
    trainable_bytes: int  # trainable parameters + their gradients + optimizer state
    trainable_params_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int  # allocated in forward, alive at the peak (what backward needs)
    transient_bytes: int  # the backward / optimizer working set at the peak
    peak_op: str
    peak_module: str
    peak_phase: str
    peak_op_output_bytes: int
    host_bytes: int  # offloaded activations (pinned host memory)
    flops_model: int  # forward + backward of one step (all micro-batches), no recompute
    flops_recompute: int
    flops_optimizer: int
    trace_seconds: float
    flops_uncounted_ops: list = field(default_factory=list)  # custom operators without a FLOP formula
    largest_2d: Dict[str, list] = field(default_factory=dict)  # op -> largest output shape (tests)
    sequence_parallel: dict = field(default_factory=dict)  # N > 1: one rank's layout (fastsft.plan.sequence)
    mlp_tiles_folded: int = 0  # identical MLP tile bodies accounted without being re-run (fold.py)
    breakdown: Optional[dict] = None  # what is alive at the peak, per token (trace(..., breakdown=True))

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("largest_2d")
        return out


def compute_dtype(precision: str) -> torch.dtype:
    """The planned GPU run's compute dtype: 'auto' is bf16 (what `fastsft train` picks on a bf16 GPU)."""
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp32": torch.float32}[precision]


@contextlib.contextmanager
def real_run_paths(recipe: str):
    """transformers takes fake tensors for tracing (is_tracing): in a real run it skips the mask and uses
    SDPA's is_causal / GQA paths. The planner traces what a real run executes. A padded batch's rows are
    single documents: the packed-sequence check (a read of the position ids) finds none, as in a real run
    (fastsft's packed rows register their host position ids instead: fastsft.patch.attention)."""
    from transformers import masking_utils
    from transformers.utils import import_utils

    stock = import_utils.is_fake_tensor, masking_utils.find_packed_sequence_indices
    import_utils.is_fake_tensor = lambda x: False
    if recipe != "fastsft":
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        import_utils.is_fake_tensor, masking_utils.find_packed_sequence_indices = stock


def make_batch(recipe: str, seq_len: int, batch: int, vocab: int) -> dict:
    """A micro-batch of `batch` documents of `seq_len` tokens, as the recipe's collator lays it out.
    fastsft: one packed row (position ids, cu_seqlens; fastsft.data.collate); hf: a padded batch whose rows
    are all full (the worst case: no padding, so transformers drops the all-ones mask, as a real run does)."""
    if recipe != "fastsft":
        ids = torch.zeros((batch, seq_len), dtype=torch.long)
        return {"input_ids": ids, "labels": torch.zeros_like(ids)}
    from fastsft.data.collate import collate
    from fastsft.data.example import Example

    examples = [Example(input_ids=[1] * seq_len, labels=[1] * seq_len, source_index=i) for i in range(batch)]
    host = collate(examples, packing=True, pad_token_id=0)
    host.pop("num_trained_tokens", None)
    return host


def _fake_inputs(host: dict, mode) -> dict:
    from fastsft.patch.attention import remember_packed_positions

    inputs = {}
    for key, value in host.items():
        if key == "cu_seq_lens_k":
            continue
        fake = mode is not None and torch.is_tensor(value)
        inputs[key] = mode.from_tensor(value) if fake else value
    if "cu_seq_lens_q" in inputs:
        inputs["cu_seq_lens_k"] = inputs["cu_seq_lens_q"]  # one device copy, as batch_to_device sends
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # host values, computed on the host as batch_to_device does
            remember_packed_positions(inputs["position_ids"], host["position_ids"])
    return inputs


def plan_step(config, seq_len: int, *, recipe: str = "fastsft", batch: int = 1, model_state=None) -> StepPlan:
    """Trace one optimizer step of `config` at `seq_len` tokens per document, `batch` documents per
    micro-batch. `model_state` (from `prepare`) reuses a built model across traces."""
    state = model_state or prepare(config, recipe)
    return state.trace(seq_len, batch)


class PreparedModel:
    """The fake model, its optimizer (state allocated) and fake mode, reusable across traces."""

    def __init__(self, config, recipe: str, *, fake: bool = True):
        from torch._subclasses.fake_tensor import FakeTensorMode

        from fastsft.plan.build import RECIPES, build_model

        if recipe not in RECIPES:
            raise ConfigError(f"--recipe {recipe!r}: choose from {', '.join(RECIPES)}")
        if config.optimizer != "adamw":
            raise ConfigError(f"config key 'optimizer': fastsft plan traces torch AdamW only, not "
                              f"{config.optimizer!r} (bitsandbytes' 8-bit / paged optimizers keep state it "
                              f"cannot see)")
        self.config, self.recipe = config, recipe
        self.compute = compute_dtype(config.precision)
        # fake=False: the same model and step on real CPU tensors (the validation test measures it)
        self.fake = fake
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        started = time.perf_counter()
        from fastsft.plan import sequence
        from fastsft.plan.build import architecture

        sequence.check(config, architecture(config), recipe)  # sequence_parallel: what the trainer refuses
        with self.mode, torch.device("cpu"), _quiet_logs():
            self.model, self.arch = build_model(config, recipe, self.compute)
            sequence.prepare_model(self.model, config)  # one rank's model: attention with the exchange
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            if not self.params:
                raise ConfigError("the model has no trainable parameters (check 'mode' and 'lora_target_modules')")
            from fastsft.train.optim import build_optimizer

            if recipe != "fastsft":  # the benchmark's train step: torch AdamW, foreach
                self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, foreach=True)
            else:
                self.optimizer = build_optimizer(self.model, config)
            for p in self.params:  # steady state: the optimizer state of the previous steps exists
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.build_seconds = time.perf_counter() - started
        self.vocab = int(getattr(self.arch, "vocab_size", 0) or 0)

    def _step(self, inputs: dict, num_items: int, autocast, offload, tracker) -> None:
        """Trainer.compute_loss + accumulate + train_step for one micro-batch (the hf recipe: the e2e
        benchmark's train_step)."""
        tracker.phase = "forward"
        held = None
        with autocast, offload:
            if self.recipe == "hf":
                loss = self.model(**inputs).loss
            elif self.recipe == "hf2024":
                loss, held = _loss_2024(self.model, inputs)
            else:
                loss = self.model(**inputs, num_items_in_batch=num_items, use_cache=False).loss
        tracker.phase = "backward"
        loss.backward()
        del loss, held
        tracker.phase = "optimizer_step"
        if self.recipe == "fastsft" and self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run_real(self, seq_len: int, batch: int = 1, around=contextlib.nullcontext, group=None) -> None:
        """The step on real tensors (fake=False), inside `around()` (e.g. a profiler); sequence_parallel:
        this rank's shard, exchanging over `group` (a real ulysses.SequenceGroup)."""
        from fastsft.plan import sequence

        if self.fake:
            raise ValueError("run_real needs PreparedModel(..., fake=False)")
        host = make_batch(self.recipe, seq_len, batch, self.vocab)
        if sequence.size_of(self.config) > 1:
            host = sequence.rank_shard(host, group.size, group.rank)
        inputs = _fake_inputs(host, None)
        autocast = (torch.autocast("cpu", dtype=self.compute) if self.compute != torch.float32
                    else contextlib.nullcontext())

        class _Phase:
            phase = ""

        with real_run_paths(self.recipe), _quiet_logs(), around(), sequence.exchange(self.config, group):
            self._step(inputs, seq_len * batch, autocast, contextlib.nullcontext(), _Phase())

    def _untraceable(self, exc) -> str:
        if self.recipe == "fastsft" and self.config.patch_kernels and not kernels_traceable():
            return ("the fastsft recipe cannot be traced yet: fastsft_kernels' ops "
                    f"{', '.join(missing_operators())} are not torch.library operators with fake implementations "
                    "(issue 29, items 1-2), and their launchers read host values; "
                    "trace --recipe hf, or patch_kernels: false for fastsft's builder without its kernels")
        return f"the step reads a tensor's value on the host ({exc.func}), which a fake tensor has not: untraceable"

    def _register_existing(self, tracker) -> None:
        from fastsft.plan.build import quant_state_tensors

        trainable = {id(p) for p in self.params}
        tracker.register((p for p in self.model.parameters() if id(p) in trainable), "trainable")
        tracker.register((p for p in self.model.parameters() if id(p) not in trainable), "weights")
        tracker.register(self.model.buffers(), "weights")
        tracker.register(quant_state_tensors(self.model), "weights")
        for state in self.optimizer.state.values():
            tracker.register((v for v in state.values() if torch.is_tensor(v)), "optimizer_state")

    def trace(self, seq_len: int, batch: int = 1, *, fold_tiles: bool = True, breakdown: bool = False) -> StepPlan:
        """`fold_tiles`: run each tiled MLP's identical tiles once (fold.py; same peak and FLOPs, a
        1M-token trace in seconds); False runs every tile (the test comparing both). `breakdown`: group
        what is alive at the peak, with its bytes per token (StepPlan.breakdown; fastsft/plan/breakdown.py)."""
        from torch.distributed._tools.mod_tracker import ModTracker

        from fastsft.plan import sequence
        from fastsft.plan.fold import folded_tiles
        from fastsft.plan.tracker import MemoryTracker, offload_to_host, overlapped_offload

        config, recipe = self.config, self.recipe
        if seq_len < 2 or batch < 1:
            raise ConfigError(f"a step needs seq_len >= 2 and batch >= 1 (got {seq_len}, {batch})")
        accumulation = max(1, config.gradient_accumulation_steps)
        started = time.perf_counter()
        host = make_batch(recipe, seq_len, batch, self.vocab)
        if sequence.size_of(config) > 1:  # rank 0's shard; the trained-token count stays the window's
            host = sequence.rank_shard(host, sequence.size_of(config))
        autocast = (torch.autocast("cpu", dtype=self.compute) if self.compute != torch.float32
                    else contextlib.nullcontext())
        mod_tracker = ModTracker()
        tracker = MemoryTracker(mod_tracker)
        tracker.record = breakdown
        with sequence.exchange(config), self.mode, torch.device("cpu"), real_run_paths(recipe), _quiet_logs():
            inputs = _fake_inputs(host, self.mode)
            if accumulation > 1:  # the window's earlier micro-batches left their gradients
                for p in self.params:
                    p.grad = torch.zeros_like(p)
            self._register_existing(tracker)
            tracker.register((v for v in inputs.values() if torch.is_tensor(v)), "activations")
            for p in self.params:
                if p.grad is not None:
                    tracker.reclassify(p.grad, "grads")
            handles = tracker.grad_hooks(self.params)
            num_items = seq_len * batch * accumulation
            if not config.offload_activations:
                offload = contextlib.nullcontext()
            elif recipe == "fastsft":  # the trainer's own offload (fastsft.train.loop)
                offload = overlapped_offload(tracker, self.model)
            else:  # transformers' save_on_cpu
                offload = offload_to_host(tracker)
            from torch._subclasses.fake_tensor import DataDependentOutputException

            folding = folded_tiles(tracker) if fold_tiles else contextlib.nullcontext()
            try:
                with mod_tracker, tracker, tracker.module_depth(), folding as folder:
                    self._step(inputs, num_items, autocast, offload, tracker)
            except DataDependentOutputException as exc:
                raise ConfigError(self._untraceable(exc)) from (exc if os.environ.get("FASTSFT_PLAN_DEBUG") else None)
            finally:
                for h in handles:
                    h.remove()
                for p in self.params:
                    p.grad = None
        peak = tracker.peak
        cats = peak.by_category
        flops = tracker.flops
        micro = flops["forward"] + flops["backward"]
        trainable = cats.get("trainable", 0) + cats.get("grads", 0) + cats.get("optimizer_state", 0)
        step = StepPlan(
            recipe=recipe, mode=config.mode, seq_len=seq_len, batch=batch, accumulation=accumulation,
            tokens_per_step=seq_len * batch * accumulation, peak_bytes=peak.bytes,
            weights_bytes=cats.get("weights", 0), trainable_bytes=trainable,
            trainable_params_bytes=cats.get("trainable", 0), grads_bytes=cats.get("grads", 0),
            optimizer_state_bytes=cats.get("optimizer_state", 0), activations_bytes=cats.get("activations", 0),
            transient_bytes=cats.get("backward", 0) + cats.get("optimizer_step", 0), peak_op=peak.op,
            peak_module=peak.module, peak_phase=peak.phase, peak_op_output_bytes=peak.op_output_bytes,
            host_bytes=tracker.host_peak, flops_model=micro * accumulation,
            flops_recompute=flops["recompute"] * accumulation, flops_optimizer=flops["optimizer_step"],
            trace_seconds=time.perf_counter() - started,
            flops_uncounted_ops=sorted(tracker.uncounted_ops),
            largest_2d={k: list(v) for k, v in tracker.max_numel_2d.items()},
            mlp_tiles_folded=folder.folded if folder is not None else 0,
            breakdown=_breakdown(tracker, seq_len * batch, sequence.size_of(config)) if breakdown else None,
        )
        return sequence.per_rank(step, config, self.params) if sequence.size_of(config) > 1 else step


def _breakdown(tracker, tokens: int, ranks: int = 1) -> dict:
    """Per token of all `tokens`; under sequence parallelism a rank's L/N-token tensors grow with them too."""
    from fastsft.plan.breakdown import group_live, summary

    live = tracker.live_at_peak()
    shard = -(-tokens // ranks) if ranks > 1 else None  # as sequence.per_rank's rank_tokens
    rows = group_live(live, tokens, shard, ranks)
    out = {"tokens": tokens, "live_bytes": sum(life.nbytes for life in live), **summary(rows), "rows": rows}
    if shard is not None:
        out.update(rank_tokens=shard, per_token_of="the whole sequence (one GPU's bytes)")
    return out


def _loss_2024(model, inputs: dict):
    """transformers <= 4.44's causal-LM loss: `logits = logits.float()` in the forward, then the shifted
    `.contiguous()` copies and CrossEntropyLoss; the outputs (fp32 logits) live until backward returns."""
    outputs = model(input_ids=inputs["input_ids"])
    logits = outputs.logits.float()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = inputs["labels"][..., 1:].contiguous()
    loss = torch.nn.functional.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1))
    return loss, (outputs, logits)


KERNEL_OPS = ("varlen_attention", "lora_linear", "lora_linear_ex", "rms_norm", "rope", "swiglu", "cross_entropy")


def missing_operators() -> list:
    """The public kernels not (yet) registered as torch.library operators in the `fastsft` namespace.
    A registered operator has a fake implementation: FakeTensorMode then allocates what the kernel
    allocates; an unregistered one runs kernels/reference.py on CPU tensors (and its launcher reads host
    values), whose memory is not the kernel's."""
    import importlib

    for module in ("fastsft_kernels", *(f"fastsft_kernels.{m}" for m in ("attention", "lora", "lora_dora", "norm",
                                                                       "rope", "swiglu", "cross_entropy"))):
        try:  # importing the kernel modules registers their operators, when they have them
            importlib.import_module(module)
        except ImportError:
            pass

    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastsft::")]
    return [op for op in KERNEL_OPS if not any(op in n for n in names)]


def kernels_traceable() -> bool:
    return not missing_operators()


def prepare(config, recipe: str = "fastsft") -> PreparedModel:
    return PreparedModel(config, recipe)


@contextlib.contextmanager
def _quiet_logs():
    """Per-layer INFO lines of the patch (224 at 8B) and library notices would bury the plan."""
    import logging
    import warnings

    names = ("fastsft", "fastsft.patch", "transformers", "peft", "bitsandbytes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
