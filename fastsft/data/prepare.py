"""prepare_data: load, split, render, mask, truncate and cache a dataset."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from fastsft.data import cache
from fastsft.data.example import IGNORE_INDEX, Example
from fastsft.data.formats import Chat, records_to_samples
from fastsft.data.audit import check_supervision
from fastsft.data.load import MAX_RECORD_BYTES, load_records, records_fingerprint, source_fingerprint
from fastsft.data.options import DataOptions
from fastsft.data.parallel import encode_in_workers
from fastsft.data.render import report_notes
from fastsft.data.stats import DataStats
from fastsft.data.templates import resolve_chat_template
from fastsft.errors import DataError


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    eval_stats: Optional[DataStats] = None

    def summary_lines(self) -> list[str]:
        lines = self.stats.summary_lines()
        if self.eval_stats is not None:
            lines += self.eval_stats.summary_lines()
        return lines


def prepare_data(options: DataOptions, tokenizer) -> PreparedData:
    """Load `options.source`, render and mask every example with `tokenizer`, cut
    over-long ones, hold out the evaluation split, and count it all in DataStats.

    With `options.cache_dir`, the result is stored under a hash of the data's
    content, the tokenizer and the options, and reused while none of them changes.
    Bad data raises DataError (file and line, or example and field); bad options
    ConfigError.
    """
    template = resolve_chat_template(options.chat_template, tokenizer)
    train_records = eval_records = None
    key = None
    if options.cache_dir:
        train_records, train_fp = _fingerprinted(options.source, options.split)
        eval_fp = None
        if options.eval_source is not None:
            eval_records, eval_fp = _fingerprinted(options.eval_source, options.split)
        key = cache.cache_key(options, train_fingerprint=train_fp, eval_fingerprint=eval_fp,
                              tokenizer=tokenizer, chat_template=template)
        hit = cache.load(options.cache_dir, key)
        if hit is not None:
            train, eval_, stats, eval_stats = hit
            stats.cache_hit = True
            if eval_stats is not None:
                eval_stats.cache_hit = True
            return PreparedData(train, eval_, stats, eval_stats)

    if train_records is None:
        train_records = load_records(options.source, options.split)
    train_indices = list(range(len(train_records)))
    eval_indices: list[int] = []
    if options.eval_fraction > 0:
        train_indices, eval_indices = _hold_out(len(train_records), options.eval_fraction, options.seed)
    train, stats = _build(train_records, train_indices, options, tokenizer, template, "train", options.source)
    check_supervision(stats, options)  # issue 25: a source that trains on nothing stops here
    eval_, eval_stats = [], None
    if eval_indices:
        eval_, eval_stats = _build(train_records, eval_indices, options, tokenizer, template, "eval", options.source)
    elif options.eval_source is not None:
        if eval_records is None:
            eval_records = load_records(options.eval_source, options.split)
        eval_, eval_stats = _build(eval_records, list(range(len(eval_records))), options, tokenizer, template,
                                   "eval", options.eval_source)
    if key is not None:
        cache.save(options.cache_dir, key, train, eval_, stats, eval_stats)
    return PreparedData(train, eval_, stats, eval_stats)


def _fingerprinted(source: str, split: str):
    """(records or None, content fingerprint); named datasets are loaded to be hashed."""
    fingerprint = source_fingerprint(source, split)
    if fingerprint is not None:
        return None, fingerprint
    records = load_records(source, split)
    return records, records_fingerprint(records)


def _hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise DataError(f"eval_fraction={fraction} leaves no training example out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:n_eval].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def _build(records: list[dict], indices: list[int], options: DataOptions, tokenizer, template, split: str,
           source: str) -> tuple[list[Example], DataStats]:
    if not records:
        raise DataError(f"{source}: no examples")
    fmt, samples = records_to_samples(records, indices, options.format, options.text_field)
    encoded, notes = encode_in_workers(samples, indices, tokenizer, mask=options.mask, chat_template=template,
                                       num_workers=options.num_workers)
    report_notes(notes, f"{source} ({split})")
    counts = dict(split=split, format=fmt, loaded=len(indices), truncated=0, truncated_no_trained_tokens=0,
                  dropped_too_long=0, dropped_no_trained_tokens=0)
    place = getattr(records, "place", lambda i: f"record {i + 1}")
    flagged: dict = {}  # reason -> [count, first places]: every dropped or suspicious example, with its line

    def flag(reason: str, index: int) -> None:
        entry = flagged.setdefault(reason, [0, []])
        entry[0] += 1
        if len(entry[1]) < FIRST_PLACES:
            entry[1].append(place(index))

    if split == "train":  # skipped while loading (the eval split of the same file shares them)
        for where, size in getattr(records, "oversized", []):
            entry = flagged.setdefault(f"skipped before tokenising, larger than {MAX_RECORD_BYTES // 2**20} MB", [0, []])
            entry[0] += 1
            if len(entry[1]) < FIRST_PLACES:
                entry[1].append(f"{where} ({size / 2**20:.1f} MB)")
    for index, sample in zip(indices, samples):
        if _has_empty_content(sample):
            flag("with an empty message content (kept)", index)
    examples = []
    for index, sample, (input_ids, labels) in zip(indices, samples, encoded):
        too_long = len(input_ids) > options.max_seq_length
        if too_long and options.truncation == "drop":
            counts["dropped_too_long"] += 1
            flag(f"dropped as longer than max_seq_length {options.max_seq_length}", index)
            continue
        if too_long:
            # The first max_seq_length tokens are kept, and nothing is appended: an EOS after the cut
            # would teach the model to stop mid-reply. The cut example counts as truncated, kept or not.
            input_ids, labels = input_ids[:options.max_seq_length], labels[:options.max_seq_length]
            counts["truncated"] += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is never trained (shift)
            counts["dropped_no_trained_tokens"] += 1
            counts["truncated_no_trained_tokens"] += too_long
            no_reply = isinstance(sample, Chat) and not any(m.get("role") == "assistant" for m in sample.messages)
            flag("dropped with no assistant turn" if no_reply else
                 f"dropped with no trained token (mask {options.mask!r})", index)
            continue
        examples.append(Example(input_ids, labels, index))
    stats = DataStats.from_examples(examples, **counts)
    stats.flagged = [{"reason": reason, "count": n, "where": where, "source": source}
                     for reason, (n, where) in flagged.items()]
    return examples, stats


FIRST_PLACES = 3  # lines named per reason


def _has_empty_content(sample) -> bool:
    if isinstance(sample, Chat):
        return any(not str(m.get("content", "")).strip() for m in sample.messages)
    return not sample.completion.strip()
