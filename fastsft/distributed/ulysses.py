"""The Ulysses exchange around attention: (local tokens, all heads) <-> (all tokens, local heads).

Under sequence parallelism every rank of a group of N holds one contiguous shard
of a packed micro-batch. Everything but attention is per token, so it runs on the
shard as it is. Attention needs every token of a document: before the kernel one
``all_to_all_single`` sends head group j of this rank's tokens to rank j, so each
rank holds all tokens for H/N heads and runs the ordinary varlen kernel with the
*global* cu_seqlens; a second all-to-all after it sends the outputs back. The
collectives are torch.distributed.nn's autograd-aware ones: their backward is the
reverse all-to-all, so the gradients of q, k and v come back to the rank whose
tokens made them.

q, k and v travel in one all-to-all (concatenated along the head axis). Key/value
heads are replicated when N does not divide them (GQA with fewer KV heads than
ranks): each KV head is repeated r times, the smallest r with N | H_kv * r and
H_kv * r | H, which keeps every query head with its own KV head.

The exchange is active only inside :func:`exchanging` (the training forward and
backward, including an activation-checkpoint recompute); evaluation and
generation run whole sequences on every rank and see plain attention.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

_ACTIVE = None  # the sequence-parallel process group while a training step runs


class SequenceGroup:
    """One rank's sequence-parallel group: the process group, its size and this rank's place in it."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank


@contextlib.contextmanager
def exchanging(group: Optional[SequenceGroup]):
    """Attention calls inside the block run the Ulysses exchange over `group` (None: no-op)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, group
    try:
        yield
    finally:
        _ACTIVE = previous


def active() -> Optional[SequenceGroup]:
    return _ACTIVE


def kv_repeats(n_heads: int, n_kv_heads: int, size: int) -> Optional[int]:
    """How many times each KV head is repeated so that `size` ranks split q and kv heads alike
    (None: impossible, because `size` does not divide the query heads)."""
    if n_heads % size or n_heads % n_kv_heads:
        return None
    for repeats in range(1, n_heads // n_kv_heads + 1):
        kv = n_kv_heads * repeats
        if kv % size == 0 and n_heads % kv == 0:
            return repeats
    return None  # pragma: no cover - repeats = n_heads / n_kv_heads always qualifies


def heads_problem(n_heads: int, n_kv_heads: int, size: int) -> Optional[str]:
    """Why `size` ranks cannot split these heads (None when they can)."""
    if n_heads % size:
        return f"{size} must divide the model's {n_heads} attention heads (each rank attends with heads/N of them)"
    if kv_repeats(n_heads, n_kv_heads, size) is None:
        return f"the model's {n_kv_heads} key/value heads do not group its {n_heads} query heads"
    return None


def _all_to_all(tensor: torch.Tensor, group) -> torch.Tensor:
    """Chunk j of dim 0 goes to rank j; chunk j of the result came from rank j. torch's functional
    collective with autograd (its backward is the reverse all-to-all); also traceable by torch.compile."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(tensor, None, None, group))


def scatter_heads(parts, group: SequenceGroup) -> list:
    """[(S_local, H_i, D)] -> [(S_local * N, H_i / N, D)] in one all-to-all."""
    n = group.size
    tokens = parts[0].shape[0]
    split = [p.reshape(tokens, n, p.shape[1] // n, p.shape[2]) for p in parts]
    send = torch.cat(split, dim=2).transpose(0, 1).contiguous()  # (N, S_local, sum H_i/N, D)
    received = _all_to_all(send, group.group)  # chunk j: rank j's tokens, this rank's heads
    pieces = received.split([s.shape[2] for s in split], dim=2)
    return [p.reshape(n * tokens, p.shape[2], p.shape[3]) for p in pieces]


def gather_heads(out: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """(S_local * N, H / N, D) -> (S_local, H, D): the inverse of scatter_heads for one tensor."""
    n = group.size
    total, heads, dim = out.shape
    send = out.reshape(n, total // n, heads, dim).contiguous()  # chunk j: rank j's tokens
    received = _all_to_all(send, group.group)  # chunk j: head group j of this rank's tokens
    return received.transpose(0, 1).reshape(total // n, n * heads, dim)


def exchange(run, backend, module, query, key, value, attention_mask, **kwargs):
    """Ulysses attention: `run` is the varlen attention forward (called on all tokens, local heads).

    query (1, H, S_local, D), key/value (1, H_kv, S_local, D) -> ((1, S_local, H, D), None)."""
    from fastsft.patch.attention import compute_dtype

    group = _ACTIVE
    if query.shape[0] != 1 or attention_mask is not None:
        raise RuntimeError("sequence_parallel: attention got a padded batch; sequence parallelism needs "
                           "packed micro-batches (packing: true)")
    n_heads, n_kv = query.shape[1], key.shape[1]
    repeats = kv_repeats(n_heads, n_kv, group.size)
    if repeats is None:
        raise RuntimeError(heads_problem(n_heads, n_kv, group.size))
    dtype = compute_dtype(query, key, value)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (S_local, H, D)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    if q.shape[-1] == v.shape[-1]:
        q, k, v = scatter_heads([q, k, v], group)
    else:  # e.g. a value head size unlike the query's: separate exchanges
        q, k, v = (scatter_heads([t], group)[0] for t in (q, k, v))
    with exchanging(None):  # the kernel call itself is an ordinary one
        out, _ = run(backend, module, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), None, **kwargs)
    return gather_heads(out[0], group).unsqueeze(0), None


__all__ = ["SequenceGroup", "exchanging", "active", "kv_repeats", "heads_problem", "scatter_heads",
           "gather_heads", "exchange"]
