"""What a run's output_dir holds (checkpoints, a finished model), without importing torch.

fastsft.train.checkpoint writes checkpoints; this module only reads the folder, so the CLI can
refuse to write into a finished run before any heavy import.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import List, Optional, Set, Tuple

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
MANIFEST_FILE = ".fastsft-manifest.json"  # the top-level names this folder's runs wrote
LOCK_FILE = ".fastsft.lock"  # fastsft.run_lock
STAGING_PREFIX = ".tmp-"  # a write in progress (checkpoints/.tmp-step-N, .tmp-final); stale after a crash


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


def checkpoint_problem(path: str) -> Optional[str]:
    """Why a checkpoint cannot be loaded (a file cut short by a full disk or a kill), or None when its
    files are whole. Cheap: zip and safetensors headers and sizes, no torch."""
    import zipfile

    state = os.path.join(path, STATE_FILE)
    try:
        with zipfile.ZipFile(state) as archive:
            archive.infolist()
    except FileNotFoundError:
        return f"{state} is missing"
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{state} is damaged ({exc})"
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(path, name))
            if problem:
                return problem
    return None


def _safetensors_problem(path: str) -> Optional[str]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                return f"{path} is damaged (truncated header)"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path} is damaged ({exc})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        return f"{path} is damaged (cut short: {size} of {8 + header_len + end} bytes)"
    return None


def newest_intact(output_dir: str, before: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint whose files are whole (older than `before` when given)."""
    found = list_checkpoints(output_dir)
    if before is not None:
        found = [(step, path) for step, path in found if os.path.abspath(path) != os.path.abspath(before)]
    for _, path in reversed(found):
        if checkpoint_problem(path) is None:
            return path
    return None


def damaged_message(checkpoint: str, problem: str) -> str:
    """One line: the damaged file, and the newest intact checkpoint to resume from instead."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    run = os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS_DIR else None
    other = newest_intact(run, before=checkpoint) if run else None
    offer = (f"; the newest intact checkpoint is {other}: resume with --resume {other}" if other
             else "; no intact checkpoint is left: start over with --overwrite")
    if not problem.startswith(checkpoint):
        problem = f"{os.path.join(checkpoint, STATE_FILE)} {problem}"
    return f"resume: {problem}{offer}"


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


def _own(name: str) -> bool:
    """fastsft's bookkeeping files and staging folders, never the user's."""
    return name.startswith((MANIFEST_FILE, LOCK_FILE, STAGING_PREFIX))


def manifest(output_dir: str) -> Set[str]:
    """The top-level names fastsft wrote here. A folder from before the manifest (a fastsft config or
    checkpoints in it) counts fastsft's usual names as its own."""
    path = os.path.join(output_dir, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return set(json.load(handle))
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return set()
    if os.path.isfile(os.path.join(output_dir, CONFIG_FILE)) or list_checkpoints(output_dir):
        return set(RUN_FILES) | set(RUN_DIRS)
    return set()


def record(output_dir: str, names) -> None:
    """Add top-level names to the manifest before they are written (a crash leaves them listed)."""
    names = {os.path.basename(os.path.normpath(n)) for n in names}
    current = manifest(output_dir) if os.path.isfile(os.path.join(output_dir, MANIFEST_FILE)) else set()
    if names <= current:
        return
    tmp = os.path.join(output_dir, MANIFEST_FILE + ".new")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(sorted(current | names), handle)
    os.replace(tmp, os.path.join(output_dir, MANIFEST_FILE))


def foreign_files(output_dir: str) -> List[str]:
    """Names in output_dir that no fastsft run wrote (sorted)."""
    if not os.path.isdir(output_dir):
        return []
    ours = manifest(output_dir)
    return sorted(n for n in os.listdir(output_dir) if not _own(n) and n not in ours)


def stale_staging(output_dir: str) -> List[str]:
    """.tmp-* folders a crashed or failed write left behind (top level and under checkpoints/)."""
    found = []
    for folder in (output_dir, os.path.join(output_dir, CHECKPOINTS_DIR)):
        if os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(STAGING_PREFIX)]
    return found


def clear_run(output_dir: str) -> List[str]:
    """--overwrite: remove what earlier runs wrote here (the manifest's names, nothing else); returns them."""
    removed = []
    for name in sorted(manifest(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, MANIFEST_FILE))
    return removed
