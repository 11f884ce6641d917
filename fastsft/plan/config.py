"""The TrainConfig a plan traces: the same file and flags as `fastsft train`. The data is never read,
so a plan config may leave out `dataset`; `model_config:` may describe any architecture (with its
`model_type`), not only tiny-llama's, so a plan needs no download."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from fastsft.errors import ConfigError

NO_DATA = "(fastsft plan reads no data)"


def _file_model_config(path: Optional[str]) -> dict:
    if path is None or not os.path.isfile(path):
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}  # load_config reports it, with the line
    value = data.get("model_config") if isinstance(data, dict) else None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"config key 'model_config' in {path}: expected a mapping, got {value!r}")
    return dict(value or {})


def _flag_model_config(overrides: Sequence[str]) -> Optional[dict]:
    """The last `--model_config` flag's mapping (it replaces the file's block, as in `fastsft train`), or None."""
    from fastsft.config import parse_overrides

    found = None
    for key, value in parse_overrides(overrides):
        if key != "model_config":
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config key 'model_config' (command-line flag --model_config): expected a mapping, "
                              f"got {value!r}")
        found = dict(value)
    return found


def load_plan_config(path: Optional[str], overrides: Sequence[str] = ()):
    from fastsft.config import load_config

    flagged = _flag_model_config(overrides)
    model_config = _file_model_config(path) if flagged is None else flagged
    values = {"model_config": {}} if model_config.get("model_type") else {}
    try:
        config = load_config(path, overrides, **values)
    except ConfigError as exc:
        if "'dataset' is required" not in str(exc):
            raise
        config = load_config(path, overrides, dataset=NO_DATA, **values)
    if values:
        config.model_config = model_config
    return config
