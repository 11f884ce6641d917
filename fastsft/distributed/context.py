"""The one object the training loop asks about processes: SingleProcess or Distributed.

Under torchrun (``WORLD_SIZE`` > 1) :func:`setup_distributed` joins the process
group (gloo on CPU, NCCL on CUDA, one GPU per local rank) and returns a
:class:`Distributed`; otherwise a :class:`SingleProcess` whose methods are the
single-device behaviour, so the loop has one code path.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
from typing import Callable, List, Optional, Sequence

import torch

from fastsft.errors import ConfigError
from fastsft.train import checkpoint as ckpt

logger = logging.getLogger("fastsft.distributed")


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


class NullMetrics:
    """metrics.jsonl is written by rank 0 only."""

    path = os.devnull

    def write(self, record) -> None:
        pass

    def records(self) -> list:
        return []


class SingleProcess:
    world_size = 1
    data_parallel_size = 1  # ranks that take different micro-batches (world_size / sequence_parallel)
    rank = 0
    is_main = True
    strategy = None
    sequence = None  # sequence_parallel > 1: this rank's ulysses.SequenceGroup

    def device_for(self, device: torch.device) -> torch.device:
        return device

    @contextlib.contextmanager
    def main_first(self):
        yield

    def wrap_model(self, model, config, device, compute_dtype):
        return model

    def unwrap(self, model):
        return model

    def check_data(self, num_micro_batches: int, dataset: str) -> None:
        pass

    def local_batches(self, window: Sequence, collate: Callable) -> List[dict]:
        return [collate(indices) for indices in window]

    def window_counts(self, batches: Sequence[dict]) -> tuple:
        """(tokens, trained tokens) of the window."""
        return sum(_tokens(b) for b in batches), sum(b["num_trained_tokens"] for b in batches)

    def grad_sync(self, model, last: bool):
        return contextlib.nullcontext()

    def sequence_exchange(self):
        """Around a window's forwards and backwards: attention runs the Ulysses exchange (sequence_parallel)."""
        from fastsft.distributed.ulysses import exchanging

        return exchanging(self.sequence)

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def clip_grad_norm(self, params, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def agreed_signal(self, received: Optional[int]) -> Optional[int]:
        return received

    def save_checkpoint(self, output_dir: str, **kwargs) -> str:
        return ckpt.save_checkpoint(output_dir, **kwargs)

    def load_checkpoint(self, path: str, **kwargs) -> dict:
        from fastsft.distributed.checkpoint import check_world_size

        check_world_size(path, 1)
        return ckpt.load_checkpoint(path, **kwargs)

    def save_model_files(self, model, tokenizer, directory: str) -> None:
        ckpt.save_model_files(model, tokenizer, directory)


class Distributed(SingleProcess):
    """One rank of a torchrun job."""

    def __init__(self, rank: int, world_size: int, local_rank: int, sequence_parallel: int = 1,
                 device_type: str = "cpu"):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.is_main = rank == 0
        self.strategy = None
        self._fillers: set = set()
        self._shard_tokens: dict = {}
        self.data_parallel_size = world_size // sequence_parallel
        self.mesh = self.sequence = None  # sequence_parallel: the (data, sequence) DeviceMesh and this rank's group
        if sequence_parallel > 1:
            from fastsft.distributed.sequence import build_mesh

            self.mesh, self.sequence = build_mesh(sequence_parallel, torch.device(device_type))

    # ------------------------------------------------------------------ setup
    def device_for(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it may write files the others then read)."""
        import torch.distributed as dist

        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def wrap_model(self, model, config, device, compute_dtype):
        from fastsft.distributed.wrap import wrap_model

        if self.sequence is not None:
            from fastsft.distributed.sequence import prepare_model

            prepare_model(model, config)
        wrapped, self.strategy = wrap_model(model, config, device, compute_dtype)
        if self.is_main:
            logger.info("distributed: %d processes, %s (%s)", self.world_size, self.strategy.upper(),
                        "parameters, gradients and optimizer state sharded" if self.strategy == "fsdp"
                        else "model replicated, gradients all-reduced")
            if self.sequence is not None:
                logger.info("sequence_parallel: %d data x %d sequence ranks; each micro-batch split into %d "
                            "shards (Ulysses all-to-all around attention)", self.data_parallel_size,
                            self.sequence.size, self.sequence.size)
        return wrapped

    def unwrap(self, model):
        from fastsft.distributed.wrap import unwrap

        return unwrap(model)

    def check_data(self, num_micro_batches: int, dataset: str) -> None:
        from fastsft.distributed.shard import check_enough_batches

        check_enough_batches(num_micro_batches, self.data_parallel_size, dataset)

    # ------------------------------------------------------------------ one step
    def local_batches(self, window: Sequence, collate: Callable) -> List[dict]:
        from fastsft.distributed.shard import local_batches

        if self.sequence is None:
            batches, fillers = local_batches(window, collate, self.rank, self.world_size)
            self._fillers = {id(b) for b in fillers}
            return batches
        from fastsft.distributed.sequence import shard_batch

        # the data slot's micro-batches (as a DDP rank's), then this rank's shard of each
        slot = self.rank // self.sequence.size
        whole, fillers = local_batches(window, collate, slot, self.data_parallel_size)
        filler_ids = {id(b) for b in fillers}
        batches, self._fillers, self._shard_tokens = [], set(), {}
        for batch in whole:
            # token 0 pads a batch to a multiple of N: its own document, never trained, seen by no other
            shard, tokens = shard_batch(batch, self.sequence.rank, self.sequence.size, pad_token_id=0)
            if id(batch) in filler_ids:
                self._fillers.add(id(shard))
            self._shard_tokens[id(shard)] = tokens
            batches.append(shard)
        return batches

    def window_counts(self, batches: Sequence[dict]) -> tuple:
        """The window's global (tokens, trained tokens): one all-reduce per optimizer step."""
        import torch.distributed as dist

        real = [b for b in batches if id(b) not in self._fillers]
        tokens = sum(self._shard_tokens[id(b)] if id(b) in self._shard_tokens else _tokens(b) for b in real)
        counts = torch.tensor([tokens, sum(b["num_trained_tokens"] for b in real)],
                              dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(counts)
        tokens, trained = counts.tolist()
        return tokens, trained

    def grad_sync(self, model, last: bool):
        """DDP: all-reduce the gradients after the window's last micro-batch only."""
        if self.strategy == "ddp" and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def clip_grad_norm(self, params, max_norm: float) -> float:
        from fastsft.distributed.wrap import full_tensor

        # DDP: every rank holds the same summed gradients; FSDP2: DTensor shards, the norm is global
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    def agreed_signal(self, received: Optional[int]) -> Optional[int]:
        """The signal any rank received, so that every rank stops after the same step."""
        import torch.distributed as dist

        flag = torch.tensor([received or 0], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        return value or None

    def _collective_device(self) -> torch.device:
        return torch.device("cpu")  # small counters: gloo on CPU (the CUDA group also has a gloo backend)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, output_dir: str, **kwargs) -> str:
        from fastsft.distributed import checkpoint as dckpt

        return dckpt.save_checkpoint(output_dir, rank=self.rank, world_size=self.world_size,
                                     strategy=self.strategy, **kwargs)

    def load_checkpoint(self, path: str, **kwargs) -> dict:
        from fastsft.distributed import checkpoint as dckpt

        return dckpt.load_checkpoint(path, rank=self.rank, world_size=self.world_size, **kwargs)

    def save_model_files(self, model, tokenizer, directory: str) -> None:
        from fastsft.distributed import checkpoint as dckpt

        dckpt.save_model_files(model, tokenizer, directory, rank=self.rank, strategy=self.strategy)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed(config) -> SingleProcess:
    """SingleProcess, or this rank's Distributed under torchrun (joining the process group if needed)."""
    from fastsft.distributed.sequence import check_config

    world_size = _env_int("WORLD_SIZE", 1)
    check_config(config, world_size, launched=world_size > 1)  # sequence_parallel, before any weight loads
    if world_size <= 1:
        return SingleProcess()
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
            dist.init_process_group("cuda:nccl,cpu:gloo", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
        atexit.register(_destroy)
    elif use_cuda:
        torch.cuda.set_device(local_rank)
    if rank != 0:  # one copy of the run's log lines: rank 0's
        logging.getLogger("fastsft").setLevel(logging.WARNING)
    if dist.get_world_size() != world_size:  # pragma: no cover - a group set up by the caller
        raise ConfigError(f"WORLD_SIZE is {world_size} but the process group has {dist.get_world_size()} ranks")
    return Distributed(rank, world_size, local_rank, sequence_parallel=config.sequence_parallel,
                       device_type="cuda" if use_cuda else "cpu")


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
