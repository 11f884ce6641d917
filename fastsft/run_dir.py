"""What a run's output_dir holds (checkpoints, a finished model), without importing torch.

fastsft.train.checkpoint writes checkpoints; this module only reads the folder, so the CLI can
refuse to write into a finished run before any heavy import.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional, Tuple

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "fastsft_config.yaml"  # written last by a finished run (and into every checkpoint)
BASE_MODEL_DIR = "base_model"  # tiny-llama: the base the adapter's adapter_config.json points at
TENSORBOARD_DIR = "tensorboard"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# files a run writes at the top of output_dir (removed by --overwrite, and nothing else is)
RUN_FILES = ("metrics.jsonl", "loss_curve.png", CONFIG_FILE, "adapter_model.safetensors", "adapter_config.json",
             "model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "README.md", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
RUN_DIRS = (CHECKPOINTS_DIR, BASE_MODEL_DIR, TENSORBOARD_DIR, "wandb")


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of the complete checkpoints, oldest first (temp dirs are ignored)."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _STEP_DIR.match(name)
            path = os.path.join(root, name)
            if match and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE))


def is_finished(output_dir: str) -> bool:
    """A run that wrote its final model (the config file is written after the weights)."""
    return os.path.isfile(os.path.join(output_dir, CONFIG_FILE)) and any(
        os.path.isfile(os.path.join(output_dir, name)) for name in
        ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"))


def holds_adapter(output_dir: str) -> bool:
    """Is there an adapter here (final or in a checkpoint) whose adapter_config.json may name base_model/?"""
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
        return True
    return any(os.path.isfile(os.path.join(path, "adapter_config.json")) for _, path in list_checkpoints(output_dir))


def clear_run(output_dir: str) -> None:
    """--overwrite: remove what an earlier run wrote here (only fastsft's own files and folders)."""
    for name in RUN_DIRS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
