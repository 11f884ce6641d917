"""Data preparation for fastsft: load, render, mask, pack and collate.

    from fastsft.data import DataOptions, prepare_data, plan_batches, collate

    data = prepare_data(DataOptions(source="train.jsonl"), tokenizer)
    lengths = [len(e) for e in data.train]
    for batch in plan_batches(lengths, batch_tokens=4096, seed=0, epoch=0):
        inputs = collate([data.train[i] for i in batch], packing=True, pad_token_id=tokenizer.pad_token_id)
"""
from __future__ import annotations

import importlib
import sys
import types

# names -> modules, imported on first use: the early data check (load, formats) runs without torch
_LAZY = {
    "collate": "collate", "IGNORE_INDEX": "example", "Example": "example", "inspect_report": "inspect",
    "render_inspect": "inspect", "DataOptions": "options", "DocPiece": "pack", "packing_efficiency": "pack",
    "plan_batches": "pack", "take": "pack", "PreparedData": "prepare", "prepare_data": "prepare",
    "DataStats": "stats", "DEFAULT_CHAT_TEMPLATE": "templates",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"fastsft.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastsft.data' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing the submodule fastsft.data.collate binds it here; the package's name is the function
        if name in _LAZY and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
