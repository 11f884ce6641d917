"""Supervision audit (issue 25): does every source train on something, and on the right thing?

Peers only warn when a chat template masks every token; here a source whose examples all
lose every trained token stops the run before training, naming the template and the way out.
"""
from __future__ import annotations

import statistics
from typing import Optional

from fastsft.data.example import IGNORE_INDEX, Example
from fastsft.errors import DataError

REPLY_FIELDS = ("completion", "response", "output", "answer")


def check_supervision(stats, options) -> None:
    """Raise DataError when no example of this source kept a trained token (mask or template at fault)."""
    if stats.kept or not stats.dropped_no_trained_tokens:
        return
    template = options.chat_template or "the tokenizer's own"
    cut = (f"; {stats.truncated_no_trained_tokens} of them lost their reply to max_seq_length "
           f"{options.max_seq_length} (raise it)") if stats.truncated_no_trained_tokens else ""
    raise DataError(
        f"{options.source}: none of its {stats.dropped_no_trained_tokens} examples has a trained token under "
        f"mask {options.mask!r} with chat template {template}{cut}: the template marks no assistant reply; "
        f"use a template with assistant markers (chat_template: <name>), or mask: all to train on every token")


def trained_spans(example: Example) -> list[list[int]]:
    """Runs of trained tokens (labels[1:] != -100; labels[0] is never trained after the shift)."""
    spans, run = [], []
    for position, (token, label) in enumerate(zip(example.input_ids, example.labels)):
        if position > 0 and label != IGNORE_INDEX:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return spans


def expected_replies(record: dict) -> Optional[list[str]]:
    """The assistant replies of a record, or None when its format has none to compare (plain text)."""
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if isinstance(turns, list):
            return [str(t.get("content", t.get("value", ""))) for t in turns if isinstance(t, dict)
                    and t.get("role", t.get("from")) in ("assistant", "gpt")]
    for key in REPLY_FIELDS:
        if isinstance(record.get(key), str):
            return [record[key]]
    return None


def round_trip(example: Example, record: dict, tokenizer) -> str:
    """One line: do the decoded trained spans hold each assistant reply of the record, and nothing else?"""
    replies = expected_replies(record)
    if replies is None:
        return "round-trip: not applicable (no assistant reply field in this format)"
    decoded = [tokenizer.decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=False)
               for s in trained_spans(example)]
    text = "".join(decoded)
    missing = [k for k, reply in enumerate(replies) if reply.strip() and reply.strip() not in text]
    extra = text
    for reply in replies:
        extra = extra.replace(reply.strip(), "", 1)
    extra = extra.strip()
    if not missing and not extra:
        return f"round-trip: ok (example {example.source_index}: the trained spans decode to its {len(replies)} " \
               f"assistant repl{'y' if len(replies) == 1 else 'ies'})"
    parts = []
    if missing:
        parts.append(f"repl{'y' if len(missing) == 1 else 'ies'} {missing} not trained")
    if extra:
        parts.append(f"trained text outside the replies: {extra[:60]!r}")
    return f"round-trip: MISMATCH in example {example.source_index}: " + "; ".join(parts)


def audit_lines(examples: list[Example], stats, *, source: str, records: Optional[list] = None,
                tokenizer=None) -> list[str]:
    """The per-source supervision report printed by `fastsft inspect` and at the start of training."""
    lines = [f"supervision audit: {source}"]
    lines.append(f"  examples with no trained token: {stats.dropped_no_trained_tokens} (dropped)"
                 f"; whole reply cut by max_seq_length: {stats.truncated_no_trained_tokens}")
    counts = [e.num_trained_tokens for e in examples]
    if counts:
        lines.append(f"  trained tokens per example: min {min(counts)}, median {statistics.median(counts):g}, "
                     f"max {max(counts)}")
    if examples and records is not None and tokenizer is not None and 0 <= examples[0].source_index < len(records):
        lines.append("  " + round_trip(examples[0], records[examples[0].source_index], tokenizer))
    return lines


def config_audit_lines(config, data, tokenizer) -> list[str]:
    """The audit for a run's prepared data: one dataset (with a round-trip of its first example) or a mixture."""
    records = None
    if config.dataset:
        from fastsft.data.load import load_records

        records = load_records(config.dataset, config.data_options().split)
    source = config.dataset or ", ".join(d["path"] for d in config.datasets)
    return audit_lines(data.train, data.stats, source=source, records=records, tokenizer=tokenizer)
