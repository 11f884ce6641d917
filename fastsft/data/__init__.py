"""Data preparation for fastsft: load, render, mask, pack and collate.

    from fastsft.data import DataOptions, prepare_data, plan_batches, collate

    data = prepare_data(DataOptions(source="train.jsonl"), tokenizer)
    lengths = [len(e) for e in data.train]
    for batch in plan_batches(lengths, batch_tokens=4096, seed=0, epoch=0):
        inputs = collate([data.train[i] for i in batch], packing=True, pad_token_id=tokenizer.pad_token_id)
"""
from fastsft.data.collate import collate
from fastsft.data.example import IGNORE_INDEX, Example
from fastsft.data.inspect import inspect_report, render_inspect
from fastsft.data.options import DataOptions
from fastsft.data.pack import DocPiece, packing_efficiency, plan_batches, take
from fastsft.data.prepare import PreparedData, prepare_data
from fastsft.data.stats import DataStats
from fastsft.data.templates import DEFAULT_CHAT_TEMPLATE

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "DataOptions", "DataStats", "DocPiece", "Example", "IGNORE_INDEX", "PreparedData",
    "collate", "inspect_report", "packing_efficiency", "plan_batches", "prepare_data", "render_inspect", "take",
]
