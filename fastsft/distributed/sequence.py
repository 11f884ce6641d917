"""Sequence parallelism (``sequence_parallel: N``): the checks, the 2-D mesh and each rank's shard.

World size W = D x N ranks form a (data, sequence) mesh: rank = d * N + s. The D
data-parallel slots take the micro-batches of a window as DDP / FSDP2 ranks do;
the N ranks of a slot share each micro-batch, one contiguous shard of its packed
token stream each. Documents may straddle shards: the cu_seqlens and their
maximum stay the global ones (attention sees all tokens after the Ulysses
exchange), the position ids are the global positions of the shard's tokens (RoPE),
and the labels are shifted *before* the split (``shift_labels``), so the token
after a shard's last one is still its target.

Gradients: every rank's loss is its shard's summed token loss divided by the
trained tokens of the whole window of all ranks (one all-reduce), so the sum over
the N ranks of a slot is the micro-batch's loss and the sum over all W ranks is
the step's. DDP's SUM all-reduce and FSDP2's SUM reduce-scatter over the world
therefore reduce the replicated parameters across both mesh dimensions at once.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from fastsft.data.example import IGNORE_INDEX
from fastsft.errors import ConfigError

logger = logging.getLogger("fastsft.distributed")


# ------------------------------------------------------------------ checks (before any weight is loaded)
def check_layout(config, world_size: int, launched: bool) -> None:
    """sequence_parallel against the world size and the batch layout: one line (ConfigError)."""
    n = config.sequence_parallel
    if n < 1:
        raise ConfigError(f"config key 'sequence_parallel' must be >= 1, got {n}")
    if n == 1:
        return
    if not launched or world_size <= 1:
        raise ConfigError(f"config key 'sequence_parallel': {n} needs {n} processes or a multiple: start the run "
                          f"with --nproc {n} (or torchrun --nproc_per_node {n})")
    if world_size % n:
        raise ConfigError(f"config key 'sequence_parallel': {n} does not divide the {world_size} processes "
                          f"(--nproc / torchrun); use a divisor of {world_size}")
    if not config.packing:
        raise ConfigError("config key 'sequence_parallel' needs packing: true (the packed token stream is split)")


def _model_type(config) -> Optional[str]:
    """The model family from config.json (no weights); None when it cannot be read here."""
    if config.model == "tiny-llama":
        return "llama"
    path = os.path.join(config.model, "config.json")
    if os.path.isfile(path):
        import json

        with open(path, encoding="utf-8") as handle:
            return json.load(handle).get("model_type")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code).model_type
    except Exception:  # offline / unknown: the check after loading (wrap) decides
        return None


def check_model(config) -> None:
    """The family's attention is patched (the exchange runs inside it) and N splits its heads."""
    if config.sequence_parallel <= 1:
        return
    from fastsft.patch.families import _FAMILIES

    family = _model_type(config)
    if family is not None and family not in _FAMILIES:
        raise ConfigError(f"config key 'sequence_parallel': the {family} model family's attention is not patched "
                          f"by fastsft (patched: {', '.join(_FAMILIES)}), so the sequence exchange cannot run")
    if config.model == "tiny-llama":  # the trainer's own builder: its defaults (4 heads, 2 KV), not LlamaConfig's
        from fastsft.tiny import tiny_llama_config

        llama = tiny_llama_config(config.tokenizer_vocab_size, **(config.model_config or {}))
        check_heads(config, llama.num_attention_heads, llama.num_key_value_heads or llama.num_attention_heads)


def check_heads(config, n_heads: int, n_kv_heads: int) -> None:
    from fastsft.distributed.ulysses import heads_problem

    problem = heads_problem(n_heads, n_kv_heads, config.sequence_parallel)
    if problem:
        raise ConfigError(f"config key 'sequence_parallel': {problem}")


def check_config(config, world_size: int, launched: bool) -> None:
    check_layout(config, world_size, launched)
    check_model(config)


# ------------------------------------------------------------------ the mesh
def build_mesh(size: int, device: torch.device):
    """(DeviceMesh (data, sequence), SequenceGroup of this rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fastsft.distributed.ulysses import SequenceGroup

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world // size, size), mesh_dim_names=("data", "sequence"))
    group = mesh.get_group("sequence")
    return mesh, SequenceGroup(group, size, dist.get_rank(group))


def prepare_model(model, config) -> None:
    """The loaded model attends through fastsft's varlen backend (applied here if patch_kernels is off)."""
    from fastsft.patch import attention, base_model_of

    base = base_model_of(model)
    if base.config._attn_implementation not in attention.IMPLEMENTATIONS.values():
        if not attention.apply(model):
            raise ConfigError(f"config key 'sequence_parallel': {type(base).__name__}'s attention cannot use "
                              f"fastsft's varlen backend, so the sequence exchange cannot run")
        logger.info("sequence_parallel: attention switched to fastsft's varlen backend (patch_kernels is off)")
    text = getattr(base.config, "get_text_config", lambda: base.config)()
    n_heads = text.num_attention_heads
    check_heads(config, n_heads, getattr(text, "num_key_value_heads", None) or n_heads)


# ------------------------------------------------------------------ each rank's shard
def pad_to_multiple(batch: dict, multiple: int, pad_token_id: int) -> dict:
    """A packed micro-batch whose length is a multiple of `multiple` (one more untrained document)."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if extra == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_full((1, extra), pad_token_id)], 1)
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, extra), IGNORE_INDEX)], 1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra).unsqueeze(0)], 1)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if key in batch:
            cu = batch[key]
            out[key] = torch.cat([cu, cu.new_tensor([int(cu[-1]) + extra])])
    for key in ("max_length_q", "max_length_k"):
        if key in batch:
            out[key] = max(batch[key], extra)
    return out


def shard_batch(batch: dict, rank: int, size: int, pad_token_id: int) -> tuple:
    """(this rank's shard of a packed micro-batch, its count of real tokens).

    The shard holds tokens [rank * S, (rank + 1) * S) of the (padded) stream: input_ids,
    position_ids and the pre-shifted labels (as both ``labels`` and ``shift_labels``), with
    the global cu_seqlens and max lengths; ``num_trained_tokens`` counts the shard's own."""
    if "attention_mask" in batch or batch["input_ids"].shape[0] != 1:
        raise ConfigError("config key 'sequence_parallel' needs packing: true (the packed token stream is split)")
    real = batch["input_ids"].shape[1]
    padded = pad_to_multiple(batch, size, pad_token_id)
    labels = padded["labels"]
    shifted = torch.cat([labels[:, 1:], labels.new_full((1, 1), IGNORE_INDEX)], 1)  # position t predicts t + 1
    width = labels.shape[1] // size
    span = slice(rank * width, (rank + 1) * width)
    shard = {key: value for key, value in padded.items()
             if key not in ("input_ids", "labels", "position_ids", "num_trained_tokens")}
    shard["input_ids"] = padded["input_ids"][:, span].contiguous()
    shard["position_ids"] = padded["position_ids"][:, span].contiguous()
    shard["labels"] = shifted[:, span].contiguous()
    shard["shift_labels"] = shard["labels"]
    shard["num_trained_tokens"] = int((shard["labels"] != IGNORE_INDEX).sum())
    tokens = max(0, min(real, span.stop) - span.start)
    return shard, tokens


def straddling_documents(cu_seqlens, length: int, size: int) -> int:
    """How many documents of a packed batch cross a shard boundary (for tests and logs)."""
    width = -(-length // size)
    cuts = [width * r for r in range(1, size)]
    bounds = [int(b) for b in cu_seqlens]
    return sum(1 for a, b in zip(bounds[:-1], bounds[1:]) if any(a < c < b for c in cuts))


__all__ = ["check_layout", "check_model", "check_config", "check_heads", "build_mesh", "prepare_model",
           "pad_to_multiple", "shard_batch", "straddling_documents"]
