"""Atomic checkpoints (temp dir + fsync + rename) and exact resume.

A checkpoint ``output_dir/checkpoints/step-N`` holds the adapter (peft) or the
full model (transformers ``save_pretrained``), the tokenizer, the config, and
``training_state.pt``: optimizer, scheduler and grad-scaler states, the global
step, the data position (epoch, micro-batch index) and the python / numpy /
torch / CUDA RNG states. Restoring all of them makes a resumed run produce the
same losses as an uninterrupted one.
"""
from __future__ import annotations

import glob
import os
import random
import shutil

import numpy as np
import torch

from fastsft.errors import ConfigError, TrainingError

from fastsft.run_dir import CHECKPOINTS_DIR, STATE_FILE, latest_checkpoint, list_checkpoints  # noqa: F401


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config")


def _fsync_tree(root: str) -> None:
    """Flush every file and directory under root to disk before the rename publishes it."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(fd)


def save_model_files(model, tokenizer, directory: str) -> None:
    """The adapter (peft) or the full model, plus the tokenizer, as safetensors."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    apply_umask(directory)


def apply_umask(directory: str) -> None:
    """safetensors writes through a private temp file (mode 0600): give the saved files the mode any
    other file gets here (0666 less the umask), so a group can read the run."""
    mask = os.umask(0)
    os.umask(mask)
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def estimate_checkpoint_bytes(output_dir: str, model, optimizer) -> int:
    """The newest checkpoint's size, else the saved weights (trainable ones for an adapter) plus the
    optimizer's state, plus 1 MB for the tokenizer and config."""
    newest = latest_checkpoint(output_dir)
    if newest is not None:
        return _tree_bytes(newest)
    params = [p for p in model.parameters() if p.requires_grad or not is_peft_model(model)]
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    if not optimizer.state:  # before the first step: Adam's two moments, in fp32
        state = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + state + 2**20


def check_free_space(output_dir: str, step: int, model, optimizer) -> None:
    """Stop with one line before writing a checkpoint the disk cannot hold."""
    needed = estimate_checkpoint_bytes(output_dir, model, optimizer)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        newest = latest_checkpoint(output_dir)
        keep = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written"
        raise TrainingError(f"checkpoint step-{step}: not enough space in {output_dir}: it needs about {_mb(needed)}, "
                            f"{_mb(free)} free; stopping ({keep}). Free some space, then continue with --resume")


def write_failure(what: str, exc: BaseException, newest) -> TrainingError:
    """One line for a failed write: torch's zip writer reports a full disk as 'unexpected pos'."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError):
        text = exc.strerror or text
    elif "unexpected pos" in text or "inline_container" in text or "file write failed" in text:
        text = "the write stopped short (is the disk full?)"
    keep = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written"
    return TrainingError(f"could not write {what}: {text}; the partial files were removed; stopping ({keep})")


def save_checkpoint(output_dir: str, *, step: int, model, tokenizer, optimizer, scheduler, scaler,
                    train_state: dict, config_dict: dict, keep: int) -> str:
    """Write checkpoints/step-N atomically; keep the newest `keep` (0 = all). A failed write (a full disk)
    removes the partial .tmp-step-N and raises TrainingError, the earlier checkpoints untouched."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    tmp = os.path.join(root, f".tmp-step-{step}")
    try:
        return _write_checkpoint(output_dir, root, tmp, step=step, model=model, tokenizer=tokenizer,
                                 optimizer=optimizer, scheduler=scheduler, scaler=scaler, train_state=train_state,
                                 config_dict=config_dict, keep=keep)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(f"checkpoint {os.path.join(root, f'step-{step}')}", exc,
                            latest_checkpoint(output_dir)) from None


def _write_checkpoint(output_dir: str, root: str, tmp: str, *, step: int, model, tokenizer, optimizer, scheduler,
                      scaler, train_state: dict, config_dict: dict, keep: int) -> str:
    import yaml

    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash mid-write
    os.makedirs(tmp)
    save_model_files(model, tokenizer, tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "train_state": dict(train_state),
            "mode": "peft" if is_peft_model(model) else "full",
        },
        os.path.join(tmp, STATE_FILE),
    )
    with open(os.path.join(tmp, "fastsft_config.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_dict, handle, sort_keys=False)
    _fsync_tree(tmp)
    if os.path.exists(final):  # a rerun of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_model_weights(model, path: str) -> None:
    from safetensors.torch import load_file

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        adapter = os.path.join(path, "adapter_model.safetensors")
        if not os.path.isfile(adapter):
            raise ConfigError(f"resume: {path} has no adapter_model.safetensors (was it written by a full fine-tuning run?)")
        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ConfigError(f"resume: the adapter in {path} does not match the model (unexpected keys {unexpected[:3]})")
        return
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"resume: {path} has no model safetensors (was it written by a LoRA run?)")
    state = {}
    for name in files:
        state.update(load_file(name))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"resume: the model in {path} does not match (unexpected keys {result.unexpected_keys[:3]})")
    # keys left out by save_pretrained are tied weights (same tensor as a loaded one)
    loaded = {id(p) for n, p in model.named_parameters() if n in state}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state and id(p) not in loaded]
    if missing:
        raise ConfigError(f"resume: the checkpoint {path} lacks trainable weights {missing[:3]}")


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler) -> dict:
    """Restore everything save_checkpoint wrote; returns the train_state dict."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise ConfigError(f"resume: {path} is not a fastsft checkpoint (no {STATE_FILE})")
    # our own file, holding numpy RNG arrays and python tuples: not weights-only
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        _load_model_weights(model, path)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        from fastsft.run_dir import damaged_message

        raise ConfigError(damaged_message(path, f"cannot be read ({str(exc).strip().splitlines()[0][:120]})")) \
            from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["train_state"]
