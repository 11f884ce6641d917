"""Turn a planned micro-batch of Examples into model inputs (torch tensors)."""
from __future__ import annotations

from typing import Sequence

import torch

from fastsft.data.example import IGNORE_INDEX, Example


def collate(examples: Sequence[Example], *, packing: bool, pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Packed: one row of concatenated documents; padded: one row per example.

    Packed output: input_ids, labels, position_ids (1, T) long; cu_seq_lens_q/k
    (n_docs + 1,) int32; max_length_q/k ints; num_trained_tokens. The first label
    of every document is -100, so the model's shift never trains the first token
    of a document on the last token of the previous one. Padding up to a multiple
    of `pad_to_multiple_of` becomes one more document of pad tokens, never trained.
    Padded output: input_ids, labels (-100 on padding), attention_mask (B, L) and
    num_trained_tokens. num_trained_tokens = (labels[:, 1:] != -100).sum().
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    for k, example in enumerate(examples):
        if len(example.input_ids) != len(example.labels) or not example.input_ids:
            raise ValueError(
                f"example {k} (source index {example.source_index}) has {len(example.input_ids)} input ids and "
                f"{len(example.labels)} labels; they must be equal and non-zero"
            )
    return _packed(examples, pad_token_id, pad_to_multiple_of) if packing else \
        _padded(examples, pad_token_id, pad_to_multiple_of)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _packed(examples, pad_token_id: int, multiple: int) -> dict:
    doc_lengths = [len(e.input_ids) for e in examples]
    total = sum(doc_lengths)
    padding = _round_up(total, multiple) - total
    input_ids = [token for e in examples for token in e.input_ids]
    labels = []
    for e in examples:
        labels.append(IGNORE_INDEX)
        labels.extend(e.labels[1:])
    if padding:
        doc_lengths.append(padding)
        input_ids.extend([pad_token_id] * padding)
        labels.extend([IGNORE_INDEX] * padding)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in doc_lengths])
    cu = torch.zeros(len(doc_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(doc_lengths, dtype=torch.int64), 0).to(torch.int32)
    labels_tensor = torch.tensor(labels, dtype=torch.long).unsqueeze(0)
    max_length = max(doc_lengths)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long).unsqueeze(0),
        "labels": labels_tensor,
        "position_ids": positions.unsqueeze(0),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": max_length,
        "max_length_k": max_length,
        "num_trained_tokens": int((labels_tensor[:, 1:] != IGNORE_INDEX).sum()),
    }


def _padded(examples, pad_token_id: int, multiple: int) -> dict:
    width = _round_up(max(len(e.input_ids) for e in examples), multiple)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "num_trained_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
    }


def check_label_range(labels: torch.Tensor, vocab_size: int, *, ignore_index: int = IGNORE_INDEX,
                      where: str = "batch") -> None:
    """Raise DataError when a trained label is outside [0, vocab_size).

    Runs on the collator's host tensors, once per batch, so the loss kernels need no
    device-to-host read of their own (a bad label there only gives a NaN row).
    """
    if labels.device.type != "cpu":
        raise ValueError("check_label_range runs on the host copy of the labels (before the device copy)")
    from fastsft_kernels.cross_entropy import out_of_range_labels

    bad = out_of_range_labels(labels, vocab_size, ignore_index)
    if bool(bad.any()):
        values = sorted(set(labels[bad].tolist()))
        from fastsft.errors import DataError

        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise DataError(f"{where}: {int(bad.sum())} label(s) outside the model's vocabulary [0, {vocab_size}) "
                        f"(token ids {shown}); does the tokenizer match the model?")
