"""Checks before a run writes anything: the output folder, the resume point and the resumed config.

Nothing here imports torch; the CLI runs these (and the data check) first, so a mistake costs a
second and leaves whatever is on disk as it was.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

from fastsft import run_dir, run_lock
from fastsft.errors import ConfigError

# keys that may change between a run and its resumption: they do not shape the steps already taken
RESUME_FREE_KEYS = {
    "resume", "resume_changed_config", "output_dir", "overwrite_output_dir", "max_steps", "num_epochs",
    "save_steps", "save_strategy", "save_total_limit", "eval_steps", "eval_strategy", "eval_at_start", "eval_exact_match", "eval_max_new_tokens",
    "eval_max_examples", "eval_batch_size", "logging_steps", "progress_bar", "cpu_threads", "report_to",
    "cache_dir",
    "early_stopping_patience", "early_stopping_threshold",  # issue 25: a later stop or more patience
    # issue 25: how replies are scored changes no weight (forgetting_dataset is not free: its baseline is fixed)
    "eval_metrics", "eval_do_sample", "eval_temperature", "eval_top_p", "eval_worst_examples",
}
# keys that shape the weights in the checkpoint: they cannot change, whatever the flags
RESUME_FIXED_KEYS = {
    "model", "model_config", "tokenizer", "tokenizer_vocab_size", "mode", "lora_r", "lora_target_modules",
    "lora_bias", "lora_modules_to_save", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "trust_remote_code",
    "use_dora",
}


def check_run(config, output_dir: str, *, lock: bool = True) -> tuple:
    """(output_dir state, checkpoint to resume or None, config changes to honour): the folder can be written,
    a finished run is not overwritten by accident, the resumed config matches (or may change), the model
    and tokenizer exist locally or on a reachable hub, report_to's tools are installed."""
    from fastsft.sources import check_model_source

    resuming = config.resume not in (False, None, "")
    state = check_output_dir(output_dir, overwrite=config.overwrite_output_dir, resume=resuming, lock=lock)
    resume_from = resolve_resume(config.resume, output_dir)
    changes = []
    if resume_from is not None:
        current = config.to_dict()
        current["resume"] = False
        changes = check_resume_config(resume_from, current, allow_changes=config.resume_changed_config)
    check_model_source(config.model)
    check_model_source(config.tokenizer, key="tokenizer", tokenizer=True)
    check_reporters(config)
    return state, resume_from, changes


def check_writable(path: str, what: str = "output_dir") -> None:
    """`path` is (or can be made) a writable directory: not a file, not under a file, not read-only."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        if probe == path:
            raise ConfigError(f"{what} {path!r} is a file, not a directory")
        raise ConfigError(f"{what} {path!r} is under {probe!r}, which is a file")
    try:  # os.access says yes to root on a read-only mount: a real file answers for certain
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path!r}: cannot write in {probe!r} ({exc.strerror or exc})") from None


def check_output_dir(output_dir: str, *, overwrite: bool, resume: bool, lock: bool = True) -> str:
    """What output_dir holds: 'new', 'finished' or 'checkpoints'; refuses to write into a run without
    --overwrite or --resume."""
    check_writable(output_dir)
    if lock:  # torchrun's other ranks find rank 0's lock: theirs is the same run
        run_lock.check_unlocked(output_dir)
    check_foreign_files(output_dir, overwrite=overwrite, resume=resume)
    finished = run_dir.is_finished(output_dir)
    checkpoints = run_dir.list_checkpoints(output_dir)
    state = "finished" if finished else "checkpoints" if checkpoints else "new"
    if state == "new" or overwrite or resume:
        return state
    if finished:
        steps = _finished_steps(output_dir)
        raise ConfigError(
            f"output_dir {output_dir!r} holds a finished run{steps}: pass --overwrite to replace it, "
            f"--resume to continue it (e.g. with a larger --max_steps), or choose another output_dir")
    raise ConfigError(
        f"output_dir {output_dir!r} already holds checkpoints (newest {os.path.basename(checkpoints[-1][1])}): "
        f"pass --resume to continue that run, --overwrite to start over, or choose another output_dir")


def _few(names: List[str]) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_foreign_files(output_dir: str, *, overwrite: bool, resume: bool) -> None:
    """fastsft writes only into a folder of its own: files it did not write are refused (unless --overwrite
    or --resume, which keep them), and never replaced by a file of the same name."""
    foreign = run_dir.foreign_files(output_dir)
    clash = [n for n in foreign if n in run_dir.RUN_FILES or n in run_dir.RUN_DIRS]
    if clash:
        raise ConfigError(f"output_dir {output_dir!r} holds {_few(clash)}, which fastsft did not write and "
                          f"would replace: move them away, or choose another output_dir")
    if foreign and not (overwrite or resume):
        raise ConfigError(f"output_dir {output_dir!r} holds files fastsft did not write ({_few(foreign)}): choose "
                          f"an empty or new output_dir, or pass --overwrite to write next to them (they are kept)")


def _finished_steps(output_dir: str) -> str:
    path = os.path.join(output_dir, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as handle:
            steps = sum('"type": "train"' in line for line in handle)
        return f" ({steps} steps)"
    except OSError:
        return ""


_SAID: set = set()


def resolve_resume(resume, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from: resume is true/'latest' (output_dir's newest), a run folder
    (its newest) or a checkpoint folder. None: nothing to resume (start from scratch)."""
    if resume is False or resume is None or resume == "":
        return None
    if resume is True or resume == "latest":
        folder = output_dir
    else:
        folder = os.path.abspath(os.path.expanduser(resume))
        if run_dir.is_checkpoint(folder):
            problem = run_dir.checkpoint_problem(folder)
            if problem:  # named explicitly: the user chooses the other one
                raise ConfigError(run_dir.damaged_message(folder, problem))
            return folder
        if not os.path.isdir(folder):
            raise ConfigError(f"config key 'resume': {resume!r} does not exist (expected a run folder or a checkpoint)")
    latest = run_dir.latest_checkpoint(folder)
    if latest is not None:
        problem = run_dir.checkpoint_problem(latest)
        if problem is None:
            return latest
        intact = run_dir.newest_intact(folder)
        if intact is None:
            raise ConfigError(run_dir.damaged_message(latest, problem))
        if (latest, intact) not in _SAID:  # the CLI and the trainer both resolve: one line
            _SAID.add((latest, intact))
            print(f"resume: {problem}; resuming from the newest intact checkpoint, {intact}", file=sys.stderr)
        return intact
    if run_dir.is_finished(folder):
        raise ConfigError(f"resume: {folder!r} holds a finished run but no checkpoint to continue from (it ran with "
                          f"save_steps: 0); pass --overwrite to start over, or choose another output_dir")
    if folder != os.path.abspath(output_dir):
        raise ConfigError(f"config key 'resume': {resume!r} is neither a fastsft checkpoint nor a run folder with "
                          f"checkpoints")
    return None


def saved_config(checkpoint: str) -> Optional[dict]:
    import yaml

    path = os.path.join(checkpoint, run_dir.CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def config_changes(saved: dict, current: dict) -> List[Tuple[str, object, object]]:
    """(key, saved value, current value) for every key outside RESUME_FREE_KEYS that differs."""
    return [(k, saved[k], current[k]) for k in sorted(current)
            if k not in RESUME_FREE_KEYS and k in saved and saved[k] != current[k]]


def _listing(changes) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


def check_resume_config(checkpoint: str, current: Dict, *, allow_changes: bool) -> List[Tuple[str, object, object]]:
    """Refuse a resumed config that differs from the checkpoint's (unless allow_changes, and never for keys
    that shape the weights); returns the changes to honour."""
    saved = saved_config(checkpoint)
    if saved is None:
        return []
    changes = config_changes(saved, current)
    fixed = [c for c in changes if c[0] in RESUME_FIXED_KEYS]
    if fixed:
        raise ConfigError(f"resume: {checkpoint} was trained with other model settings ({_listing(fixed)}); "
                          f"these cannot change on resume: restore them, or start a new run")
    if changes and not allow_changes:
        raise ConfigError(f"resume: the config differs from the checkpoint's ({_listing(changes)}); restore these "
                          f"values, or pass --resume_changed_config to continue with the new ones")
    return changes


def describe_changes(changes) -> str:
    return _listing(changes)


def check_model_config_keys(config) -> None:
    """tiny-llama's model_config: every key must be a field of LlamaConfig (it accepts any keyword silently)."""
    if not config.model_config:
        return
    import difflib

    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict()) | set(getattr(LlamaConfig, "attribute_map", {}))
    for key in config.model_config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config key 'model_config': {key!r} is not a field of LlamaConfig{hint}")


def check_reporters(config) -> None:
    """report_to names a tool that is installed (checked without importing it)."""
    import importlib.util

    from fastsft.config import reporters

    extras = {"tensorboard": "pip install 'fastsft[tensorboard]'", "wandb": "pip install wandb"}
    for name in reporters(config):
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"config key 'report_to': {name} is not installed ({extras[name]})")
