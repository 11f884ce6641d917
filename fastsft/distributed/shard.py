"""Each rank's share of an accumulation window of packed micro-batches.

An optimizer step of a run on N ranks consumes ``gradient_accumulation_steps * N``
consecutive micro-batches of the global (seeded, deterministic) plan; rank r
takes micro-batches r, r + N, r + 2N ... of that window. The shares are disjoint,
the same on every run, and the data position stays the global (epoch, index),
so a resume on the same world size continues exactly. Every rank must run the
same number of forward/backward passes (DDP and FSDP collectives pair up), so a
rank whose share of a short last window is smaller runs all-ignored copies:
loss 0, gradient 0.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

from fastsft.data.example import IGNORE_INDEX
from fastsft.errors import ConfigError


def rank_share(window: Sequence, rank: int, world_size: int) -> list:
    """Micro-batches rank, rank + world_size, ... of the window."""
    return list(window[rank::world_size])


def share_length(window_length: int, world_size: int) -> int:
    """Micro-batches every rank runs for a window (the largest share)."""
    return -(-window_length // world_size)


def all_ignored(batch: dict) -> dict:
    """A copy of a collated micro-batch that trains no token (a lockstep filler)."""
    filler = dict(batch)
    filler["labels"] = batch["labels"].clone().fill_(IGNORE_INDEX)
    filler["num_trained_tokens"] = 0
    return filler


def local_batches(window: Sequence, collate: Callable, rank: int, world_size: int) -> tuple:
    """(this rank's collated micro-batches, padded to the largest share; the fillers among them)."""
    mine = [collate(indices) for indices in rank_share(window, rank, world_size)]
    fillers: List[dict] = []
    while len(mine) < share_length(len(window), world_size):
        source = mine[0] if mine else collate(window[0])
        filler = all_ignored(source)
        fillers.append(filler)
        mine.append(filler)
    return mine, fillers


def check_enough_batches(num_micro_batches: int, world_size: int, dataset: str) -> None:
    if num_micro_batches < world_size:
        raise ConfigError(
            f"{dataset}: {world_size} processes need at least {world_size} micro-batches per epoch, but the data "
            f"packs into {num_micro_batches}: use at most {max(1, num_micro_batches)} processes, a smaller "
            f"'batch_tokens' (or 'batch_size'), or more data"
        )
