"""Cache of tokenised data, keyed by a hash of everything that shapes it.

The key covers the data's content (file bytes, or the records of a named
dataset), the tokenizer (its full serialised form, special tokens and class),
the resolved chat template and the options that change the examples. One
`<key>.npz` file holds both splits as flat int32 arrays plus the stats as JSON;
it is written to a temporary name and renamed, so a crash never leaves half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from fastsft.data.example import Example
from fastsft.data.stats import DataStats

CACHE_VERSION = 2  # 2: masks of first-message replies, shared-prefix and closing-suffix templates
# Options that change the tokenised examples (cache_dir and the source paths do not:
# sources enter the key through their content).
_KEYED_OPTIONS = ("split", "format", "mask", "max_seq_length", "truncation", "eval_fraction", "seed")


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary stands for it
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(json.dumps(getattr(tokenizer, "added_tokens_encoder", {}), sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(options, *, train_fingerprint: str, eval_fingerprint: Optional[str], tokenizer,
              chat_template: Optional[str]) -> str:
    payload = {
        "version": CACHE_VERSION,
        "train": train_fingerprint,
        "eval": eval_fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": chat_template,
        "options": {name: getattr(options, name) for name in _KEYED_OPTIONS},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"fastsft-data-{key}.npz")


def save(cache_dir: str, key: str, train: list[Example], eval_: list[Example], stats: DataStats,
         eval_stats: Optional[DataStats]) -> str:
    os.makedirs(cache_dir, exist_ok=True)
    arrays = {}
    for name, examples in (("train", train), ("eval", eval_)):
        lengths = np.asarray([len(e) for e in examples], dtype=np.int64)
        arrays[f"{name}_lengths"] = lengths
        arrays[f"{name}_source_index"] = np.asarray([e.source_index for e in examples], dtype=np.int64)
        arrays[f"{name}_input_ids"] = _flat([e.input_ids for e in examples])
        arrays[f"{name}_labels"] = _flat([e.labels for e in examples])
    meta = {"stats": stats.as_dict(), "eval_stats": eval_stats.as_dict() if eval_stats else None}
    arrays["meta"] = np.asarray(json.dumps(meta))
    path = cache_path(cache_dir, key)
    temporary = f"{path[:-4]}.{os.getpid()}.tmp.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)
    return path


def load(cache_dir: str, key: str):
    """(train, eval, stats, eval_stats) from the cache, or None on a miss or an unreadable file."""
    path = cache_path(cache_dir, key)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            splits = [_examples(data, name) for name in ("train", "eval")]
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache file is rebuilt
    stats = DataStats.from_dict(meta["stats"])
    eval_stats = DataStats.from_dict(meta["eval_stats"]) if meta["eval_stats"] else None
    return splits[0], splits[1], stats, eval_stats


def _flat(sequences: list[list[int]]) -> np.ndarray:
    if not sequences:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])


def _examples(data, name: str) -> list[Example]:
    lengths = data[f"{name}_lengths"]
    ends = np.cumsum(lengths)
    ids = data[f"{name}_input_ids"].tolist()
    labels = data[f"{name}_labels"].tolist()
    out = []
    start = 0
    for end, source_index in zip(ends.tolist(), data[f"{name}_source_index"].tolist()):
        out.append(Example(ids[start:end], labels[start:end], source_index))
        start = end
    return out
