"""Sharded checkpoints through torch.distributed.checkpoint, and the consolidated final model.

``checkpoints/step-N`` of a run on N ranks holds:
  dcp/                 model and optimizer state, each rank writing its own shard (DCP);
                       frozen parameters (a LoRA / QLoRA base) are left out: the base is
                       rebuilt from the base model on resume
  rng/rank-R.pt        every rank's python / numpy / torch RNG states
  training_state.pt    scheduler, grad scaler, step and data position (rank 0)
  distributed.json     world size and strategy: a resume on another world size is refused
  tokenizer files, fastsft_config.yaml
Written atomically: every rank writes into ``.tmp-step-N``; after a barrier rank 0
fsyncs it and renames it to ``step-N``.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from fastsft.errors import ConfigError
from fastsft.train import checkpoint as ckpt

DIST_FILE = "distributed.json"
DCP_DIR = "dcp"
RNG_DIR = "rng"


def saved_world_size(path: str) -> int:
    """The number of processes that wrote a checkpoint (1 for a single-process one)."""
    marker = os.path.join(path, DIST_FILE)
    if not os.path.isfile(marker):
        return 1
    with open(marker, encoding="utf-8") as handle:
        return int(json.load(handle)["world_size"])


def check_world_size(path: str, world_size: int) -> None:
    saved = saved_world_size(path)
    if saved != world_size:
        how = f"--nproc {saved}" if saved > 1 else "one process (no --nproc / torchrun)"
        raise ConfigError(
            f"resume: {path} was written by {saved} process{'es' if saved > 1 else ''} and this run has "
            f"{world_size}; resuming on another world size is not supported (the data shares and sharded "
            f"state differ): resume with {how}, or start a new run"
        )


def _state_dict_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_checkpoint(output_dir: str, *, step: int, model, tokenizer, optimizer, scheduler, scaler,
                    train_state: dict, config_dict: dict, keep: int, rank: int, world_size: int,
                    strategy: str) -> str:
    import torch.distributed.checkpoint as dcp
    import yaml
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = os.path.join(output_dir, ckpt.CHECKPOINTS_DIR)
    tmp = os.path.join(root, f".tmp-step-{step}")
    final = os.path.join(root, f"step-{step}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash mid-write
        os.makedirs(os.path.join(tmp, RNG_DIR))
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(tmp, DCP_DIR))
    torch.save(ckpt.rng_state(), os.path.join(tmp, RNG_DIR, f"rank-{rank}.pt"))
    dist.barrier()  # every shard is written
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "train_state": dict(train_state), "mode": "distributed"},
                   os.path.join(tmp, ckpt.STATE_FILE))
        with open(os.path.join(tmp, DIST_FILE), "w", encoding="utf-8") as handle:
            json.dump({"world_size": world_size, "strategy": strategy}, handle)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "fastsft_config.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(config_dict, handle, sort_keys=False)
        ckpt._fsync_tree(tmp)
        if os.path.exists(final):  # a rerun of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpt._fsync_dir(root)
        if keep > 0:
            for _, old in ckpt.list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody goes on (or exits) before the checkpoint is published
    return final


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler, rank: int, world_size: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_world_size(path, world_size)
    state = torch.load(os.path.join(path, ckpt.STATE_FILE), map_location="cpu", weights_only=False)
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=os.path.join(path, DCP_DIR))
    # not strict: the frozen base is not in the checkpoint (dcp.load above already failed on any missing key)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=_state_dict_options(strict=False))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(torch.load(os.path.join(path, RNG_DIR, f"rank-{rank}.pt"), map_location="cpu",
                                  weights_only=False))
    return state["train_state"]


def save_model_files(model, tokenizer, directory: str, *, rank: int, strategy: str) -> None:
    """The final adapter or model in Hugging Face format, written by rank 0 (FSDP: consolidated first)."""
    from fastsft.distributed.wrap import unwrap

    state: Optional[dict] = None
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        peft = ckpt.is_peft_model(model)
        # a collective: every rank sends its shards; rank 0 gets the full tensors on CPU
        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=peft))
    if rank == 0:
        inner = unwrap(model)
        if state is None:
            ckpt.save_model_files(inner, tokenizer, directory)
        else:
            inner.save_pretrained(directory, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
    dist.barrier()
