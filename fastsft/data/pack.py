"""Batch planning: deterministic shuffle, then best-fit-decreasing packing.

plan_batches returns, per micro-batch, the indices of its examples. With
split_documents=True it fills every batch to exactly batch_tokens by cutting
documents at batch boundaries; the entries are then DocPiece(index, start, stop)
and `take` turns a batch into Examples for `collate`.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple, Sequence, Union

import numpy as np

from fastsft.data.example import Example
from fastsft.errors import ConfigError


class DocPiece(NamedTuple):
    """Tokens [start, stop) of example `index` (only with split_documents=True)."""

    index: int
    start: int
    stop: int


BatchEntry = Union[int, DocPiece]


def plan_batches(lengths: Sequence[int], *, batch_tokens: int, packing: bool = True, batch_size: int = 1,
                 seed: int, epoch: int, split_documents: bool = False) -> list[list[BatchEntry]]:
    """Micro-batches of example indices, the same for the same (lengths, seed, epoch).

    Bad arguments raise fastsft.errors.ConfigError (a ValueError).

    packing=True: best-fit-decreasing into bins of at most `batch_tokens` tokens;
    a document longer than batch_tokens is an error unless split_documents=True.
    packing=False: groups of `batch_size` examples in shuffled order (padded by collate).
    """
    _check_positive("batch_tokens", batch_tokens)
    _check_positive("batch_size", batch_size)
    lengths = [int(n) for n in lengths]
    for index, n in enumerate(lengths):
        if n <= 0:
            raise ConfigError(f"lengths[{index}] is {n}: every example needs at least one token")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF])
    order = rng.permutation(len(lengths)).tolist()
    if not packing:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if split_documents:
        return _chunk_stream(order, lengths, batch_tokens)
    too_long = [i for i in order if lengths[i] > batch_tokens]
    if too_long:
        i = min(too_long)
        raise ConfigError(
            f"example {i} has {lengths[i]} tokens, more than batch_tokens={batch_tokens} "
            f"({len(too_long)} such examples): raise batch_tokens, lower max_seq_length, or allow split_documents"
        )
    bins = _best_fit_decreasing(order, lengths, batch_tokens)
    bin_order = rng.permutation(len(bins)).tolist()  # BFD leaves full bins first; mix them
    return [bins[b] for b in bin_order]


def _best_fit_decreasing(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    # Stable sort keeps the shuffled order among equal lengths. Open bins are kept
    # by remaining capacity: `free` is the sorted list of distinct capacities with
    # at least one bin, `by_free` the bins at each, so best fit is one bisect.
    ranked = sorted(order, key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []
    by_free: dict[int, list[int]] = {}
    for i in ranked:
        need = lengths[i]
        slot = bisect.bisect_left(free, need)
        if slot < len(free):
            room = free[slot]
            b = by_free[room].pop()
            if not by_free[room]:
                del by_free[room]
                free.pop(slot)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = room - need
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free, left)
            by_free[left].append(b)
    return bins


def _chunk_stream(order: list[int], lengths: list[int], capacity: int) -> list[list[DocPiece]]:
    batches: list[list[DocPiece]] = [[]]
    room = capacity
    for i in order:
        start = 0
        while start < lengths[i]:
            if room == 0:
                batches.append([])
                room = capacity
            stop = min(lengths[i], start + room)
            batches[-1].append(DocPiece(i, start, stop))
            room -= stop - start
            start = stop
    return [b for b in batches if b]


def take(examples: Sequence[Example], batch: Sequence[BatchEntry]) -> list[Example]:
    """The Examples of one planned batch (slicing DocPieces)."""
    out = []
    for entry in batch:
        if isinstance(entry, DocPiece):
            example = examples[entry.index]
            out.append(Example(example.input_ids[entry.start:entry.stop], example.labels[entry.start:entry.stop],
                               example.source_index))
        else:
            out.append(examples[entry])
    return out


def packing_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[BatchEntry]], batch_tokens: int,
                       *, packing: bool = True) -> float:
    """Real tokens over token slots: slots are batch_tokens per packed batch, or
    batch size x longest example per padded batch (packing=False)."""
    _check_positive("batch_tokens", batch_tokens)
    used = slots = 0
    for batch in batches:
        sizes = [e.stop - e.start if isinstance(e, DocPiece) else lengths[e] for e in batch]
        used += sum(sizes)
        slots += batch_tokens if packing else len(sizes) * max(sizes, default=0)
    return used / slots if slots else 0.0


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
