"""Several training sources (config key `datasets`), each with its own format, mask, split and text
field, mixed by weight.

A source of n examples and weight w gives round(w * n) examples per epoch: floor(w) full passes plus a
seeded sample of the rest (without replacement). The choice depends only on (seed, epoch, source), so a
resumed run sees exactly the examples an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List

import numpy as np

from fastsft.data.options import DataOptions
from fastsft.data.prepare import PreparedData, prepare_data
from fastsft.data.stats import DataStats

_COUNTS = ("loaded", "truncated", "dropped_too_long", "dropped_no_trained_tokens")


@dataclass
class Mixture:
    """Where each source's examples start in the concatenated train list, and their weights."""

    sizes: List[int]
    weights: List[float]
    seed: int
    offsets: List[int] = field(default_factory=list)
    eval_sizes: List[int] = field(default_factory=list)  # issue 25 (dedup): each source's held-out examples

    def __post_init__(self):
        self.offsets = [int(x) for x in np.cumsum([0] + list(self.sizes[:-1]))]

    def per_epoch(self) -> List[int]:
        return [int(round(w * n)) for n, w in zip(self.sizes, self.weights)]

    def epoch_indices(self, epoch: int) -> List[int]:
        """Indices into the concatenated train list for one epoch (repeats for weights > 1)."""
        chosen: List[int] = []
        for source, (n, w, offset) in enumerate(zip(self.sizes, self.weights, self.offsets)):
            want = int(round(w * n))
            whole, rest = divmod(want, n) if n else (0, 0)
            picks = list(range(n)) * whole
            if rest:
                rng = np.random.default_rng([self.seed, epoch, source])
                picks += sorted(rng.choice(n, size=rest, replace=False).tolist())
            chosen.extend(offset + i for i in picks)
        return chosen


def source_options(config) -> List[DataOptions]:
    options = []
    for entry in config.datasets:
        options.append(DataOptions(
            source=entry["path"], split=entry.get("split", config.dataset_split),
            format=entry.get("format", config.dataset_format), mask=entry.get("mask", config.mask),
            text_field=entry.get("text_field", config.dataset_text_field), max_seq_length=config.max_seq_length,
            truncation=config.truncation, chat_template=config.chat_template, eval_fraction=config.eval_fraction,
            seed=config.seed, cache_dir=config.cache_dir,
        ))
    return options


def _merged_stats(parts: List[DataStats], examples, split: str) -> DataStats:
    counts = {key: sum(getattr(p, key) for p in parts) for key in _COUNTS}
    formats = ",".join(dict.fromkeys(p.format for p in parts))
    merged = DataStats.from_examples(examples, split=split, format=formats, **counts)
    merged.flagged = [entry for p in parts for entry in p.flagged]  # per source, with its lines
    return merged


def prepare_mixture(config, tokenizer) -> tuple:
    """(PreparedData over every source, Mixture); eval: eval_dataset, or each source's eval_fraction."""
    train, evals, train_stats, eval_stats = [], [], [], []
    sizes, eval_sizes = [], []
    for options in source_options(config):
        part = prepare_data(options, tokenizer)
        train.extend(part.train)
        sizes.append(len(part.train))
        train_stats.append(part.stats)
        eval_sizes.append(len(part.eval))
        if part.eval_stats is not None:
            evals.extend(part.eval)
            eval_stats.append(part.eval_stats)
    if config.eval_dataset:
        held_out = prepare_data(replace(source_options(config)[0], source=config.eval_dataset,
                                        format=config.dataset_format, mask=config.mask,
                                        text_field=config.dataset_text_field, eval_fraction=0.0), tokenizer)
        evals, eval_stats = held_out.train, [replace(held_out.stats, split="eval")]
    data = PreparedData(train, evals, _merged_stats(train_stats, train, "train"),
                        _merged_stats(eval_stats, evals, "eval") if eval_stats else None)
    weights = [float(entry.get("weight", 1.0)) for entry in config.datasets]
    return data, Mixture(sizes, weights, config.seed, eval_sizes=[] if config.eval_dataset else eval_sizes)


def mixture_lines(config, mixture: Mixture) -> List[str]:
    return [f"  source {entry['path']}: {n} examples, weight {w:g} -> {k} per epoch"
            for entry, n, w, k in zip(config.datasets, mixture.sizes, mixture.weights, mixture.per_epoch())]
