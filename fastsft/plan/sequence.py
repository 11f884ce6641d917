"""`sequence_parallel: N` in a plan: what ONE rank of an N-way Ulysses group holds during a step.

The trace runs the trainer's own code: `fastsft.distributed.sequence.shard_batch` cuts the packed micro-batch
of L tokens and the planner traces rank 0's shard (L/N tokens through embeddings, norms, MLP, LoRA and the
loss, with the global cu_seqlens, positions and trained-token count); attention runs inside
`fastsft.distributed.ulysses.exchanging`, so its two all-to-alls (all L tokens x heads/N around the kernel)
and their autograd backward are traced as training runs them. No peers are needed: torch's fake process
group (`dist.init_process_group("fake")`, world size N, rank 0) gives every collective its output shape,
and under FakeTensorMode nothing moves. Every rank of the group holds the same shapes (L is a multiple of
N), so rank 0's peak is the per-GPU peak.

Also on each GPU: DDP's gradient buckets (LoRA / QLoRA are wrapped in DDP; its buckets are a copy of the
trainable gradients, allocated at wrap time), added to the gradients. FSDP2 (full fine-tuning, or
`distributed: fsdp`: weights sharded over the world) is not modelled and is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from fastsft.errors import ConfigError


def size_of(config) -> int:
    return int(getattr(config, "sequence_parallel", 1))


def check(config, arch, recipe: str) -> None:
    """What the trainer refuses, refused here too (one line each), plus what the plan cannot model."""
    n = size_of(config)
    if n < 1:
        raise ConfigError(f"config key 'sequence_parallel' must be >= 1, got {n}")
    if n == 1:
        return
    if recipe != "fastsft":
        raise ConfigError(f"config key 'sequence_parallel': the {recipe} recipe has no sequence exchange; "
                          f"trace sequence parallelism with --recipe fastsft")
    if not config.packing:
        raise ConfigError("config key 'sequence_parallel' needs packing: true (the packed token stream is split)")
    if config.mode == "full" or config.distributed == "fsdp":
        raise ConfigError("config key 'sequence_parallel': fastsft plan models it for lora / qlora under DDP (weights "
                          "replicated on every GPU); FSDP2's sharding (full fine-tuning, distributed: fsdp) is not "
                          "modelled")
    from fastsft.distributed.sequence import check_heads
    from fastsft.patch.families import _FAMILIES

    if arch.model_type not in _FAMILIES:
        raise ConfigError(f"config key 'sequence_parallel': the {arch.model_type} model family's attention is not "
                          f"patched by fastsft (patched: {', '.join(_FAMILIES)}), so the sequence exchange cannot run")
    text = getattr(arch, "get_text_config", lambda: arch)()
    n_heads = text.num_attention_heads
    check_heads(config, n_heads, getattr(text, "num_key_value_heads", None) or n_heads)


def prepare_model(model, config) -> None:
    """The trainer's wrap step for sequence parallelism: attention through fastsft's varlen backend."""
    if size_of(config) > 1:
        from fastsft.distributed.sequence import prepare_model as switch_attention

        switch_attention(model, config)


def rank_shard(host: dict, size: int, rank: int = 0) -> dict:
    """Rank `rank`'s shard of a packed host micro-batch, as `Distributed.local_batches` cuts it."""
    from fastsft.distributed.sequence import shard_batch

    shard, _ = shard_batch(host, rank, size, pad_token_id=0)
    shard.pop("num_trained_tokens", None)
    # rank 0's slices can be views of the whole batch; the device holds only the shard (as .to(device) copies),
    # one copy per tensor (labels and shift_labels are one)
    copies = {}
    return {k: copies.setdefault(id(v), v.clone()) if torch.is_tensor(v) else v for k, v in shard.items()}


@contextlib.contextmanager
def fake_group(size: int):
    """A SequenceGroup of `size` ranks over torch's fake process group (this process is rank 0).

    In a process of its own (`fastsft plan`) the fake group is the default one; inside a distributed run
    (the trainer's long_context planner on a torchrun rank) the default group is the run's, so the fake
    group stands beside it, registered under a name of its own (torch's private c10d registry)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastsft.distributed.ulysses import SequenceGroup

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
        try:
            yield SequenceGroup(dist.group.WORLD, size, 0)
        finally:
            dist.destroy_process_group()
        return
    from torch._C._distributed_c10d import (FakeProcessGroup, ProcessGroup, _register_process_group,
                                            _unregister_process_group)

    name = f"fastsft_plan_fake_{size}_{id(object())}"
    group = ProcessGroup(FakeStore(), 0, size)
    group._register_backend(torch.device("cpu"), ProcessGroup.BackendType.CUSTOM,
                            FakeProcessGroup._create_internal(0, size))
    group._set_default_backend(ProcessGroup.BackendType.CUSTOM)
    group._set_group_name(name)
    _register_process_group(name, group)
    try:
        yield SequenceGroup(group, size, 0)
    finally:
        _unregister_process_group(name)


@contextlib.contextmanager
def exchange(config, group=None):
    """Around a traced step: the Ulysses exchange over `group` (default: a fake group of N ranks)."""
    from fastsft.distributed.ulysses import exchanging

    if size_of(config) == 1:
        yield
        return
    with contextlib.ExitStack() as stack:
        if group is None:
            group = stack.enter_context(fake_group(size_of(config)))
        stack.enter_context(exchanging(group))
        yield


def per_rank(step, config, params, *, ddp_buckets: bool = True):
    """The traced rank's StepPlan with DDP's gradient buckets added and the layout recorded."""
    n = size_of(config)
    buckets = sum(p.numel() * p.element_size() for p in params) if ddp_buckets else 0
    info = {"size": n, "rank_tokens": -(-step.seq_len * step.batch // n), "total_tokens": step.seq_len * step.batch,
            "ddp_bucket_bytes": buckets, "host_bytes_all_ranks": step.host_bytes * n}
    return dataclasses.replace(step, peak_bytes=step.peak_bytes + buckets, grads_bytes=step.grads_bytes + buckets,
                               trainable_bytes=step.trainable_bytes + buckets, sequence_parallel=info)


def scale_search(found, unit: int):
    """A search over tokens per rank, restated in total tokens (L = unit x tokens per rank): both fits' slopes
    become one GPU's bytes per token of the whole sequence."""
    if unit == 1:
        return found
    found.best *= unit
    found.traces = [(v * unit, p) for v, p in found.traces]
    if found.fit:
        found.fit = (found.fit[0], found.fit[1] / unit)
    if found.local_fit:
        found.local_fit = (found.local_fit[0], found.local_fit[1] / unit)
    found.unit = f"a token of the whole sequence (peak bytes are one GPU's of {unit})"
    return found


def describe(step) -> Optional[str]:
    info = getattr(step, "sequence_parallel", None)
    if not info:
        return None
    return (f"  sequence parallel: {info['size']} ranks; the figures above are one GPU's (one rank): "
            f"{info['rank_tokens']:,} of the "
            f"{info['total_tokens']:,} tokens outside attention, all {info['total_tokens']:,} tokens x "
            f"heads/{info['size']} inside it (Ulysses all-to-all); DDP gradient buckets "
            f"{info['ddp_bucket_bytes'] / 2 ** 30:.2f} GiB included; host memory of all {info['size']} ranks "
            f"{info['host_bytes_all_ranks'] / 2 ** 30:.2f} GiB")


__all__ = ["check", "prepare_model", "rank_shard", "fake_group", "exchange", "per_rank", "scale_search",
           "describe", "size_of"]
