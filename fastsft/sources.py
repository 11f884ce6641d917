"""Is a model / tokenizer / dataset name a local path or a hub name, and can we get it? Answered in
well under a second, before any download is tried: a missing local path is named as such, and a hub
name that is not cached fails at once when offline (HF_HUB_OFFLINE=1, or the hub does not answer).
"""
from __future__ import annotations

import os
import re
import threading
from typing import Optional

from fastsft.errors import ConfigError, DataError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUE = ("1", "true", "yes", "on")
_reachable_cache: dict = {}


def offline_by_env() -> Optional[str]:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 1.0) -> bool:
    """Does the hub answer an HTTP request within `timeout`? (a thread bounds DNS too; a bare TCP connect
    is not proof: some sandboxes accept every connection and never answer)"""
    endpoint = hub_endpoint()
    if endpoint in _reachable_cache:
        return _reachable_cache[endpoint]
    import urllib.error
    import urllib.request

    answer = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"),
                                   timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:  # an HTTP status is an answer
            answer.append(True)
        except (OSError, ValueError):
            answer.append(False)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout)
    _reachable_cache[endpoint] = bool(answer and answer[0])
    return _reachable_cache[endpoint]


def _hub_cache_dirs() -> list:
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    datasets = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    return [hub, datasets]


def is_cached(name: str, kind: str) -> bool:
    """A hub repo already in the local cache (usable offline)."""
    hub, datasets = _hub_cache_dirs()
    folder = ("models--" if kind == "model" else "datasets--") + name.replace("/", "--")
    if os.path.isdir(os.path.join(hub, folder)):
        return True
    return kind == "dataset" and os.path.isdir(os.path.join(datasets, name.replace("/", "___")))


def looks_local(name: str) -> bool:
    """A name that can only be a path: absolute, ./ ../ ~, a file suffix, more than owner/name, or a
    first component that exists here (data/train is a folder of this project, not a hub repo)."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name:
        return True
    if os.path.splitext(name)[1].lower() in (".jsonl", ".json", ".parquet", ".csv", ".txt", ".yaml", ".yml"):
        return True
    first = name.split("/")[0]
    return "/" in name and os.path.isdir(first)


def check_hub(name: str, *, key: str, kind: str, error=ConfigError) -> None:
    """A name that is not on disk: it must look like a hub repo and be reachable (or cached)."""
    if looks_local(name) or not _HUB_NAME.match(name):
        raise error(f"{key} {name!r}: no such file or directory")
    if is_cached(name, kind):
        return
    reason = offline_by_env()
    if reason:
        raise error(f"{key} {name!r} is not a local path and not in the hub cache, and {reason}=1 forbids "
                    f"downloading it")
    if not hub_reachable():
        raise error(f"{key} {name!r} is not a local path, and the hub ({hub_endpoint()}) cannot be reached "
                    f"(no network?); use a local path or set HF_HUB_OFFLINE=1 with a cached copy")


def check_model_source(name: Optional[str], *, key: str = "model", tokenizer: bool = False) -> None:
    """`model` / `tokenizer`: tiny-llama, a model directory, or a reachable hub name."""
    if not name or name == "tiny-llama":
        return
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not tokenizer and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"config key {key!r}: {name!r} is a directory without config.json (not a model "
                              f"saved with save_pretrained)")
        return
    if os.path.exists(path):
        raise ConfigError(f"config key {key!r}: {name!r} is a file; expected a model directory or a hub name")
    check_hub(name, key=f"config key {key!r}:", kind="model")


def check_data_source(name: str, *, key: str) -> None:
    """A dataset that is neither a local file nor directory must be a reachable hub dataset."""
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return
    check_hub(name, key=f"{key}", kind="dataset", error=DataError)
