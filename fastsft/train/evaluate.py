"""Held-out evaluation: loss per trained token, and exact match of greedy generations."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def answer_span(labels: Sequence[int], ignore_index: int = -100) -> Optional[Tuple[int, int]]:
    """[start, end) of the last contiguous run of trained labels: the answer the model should generate."""
    end = None
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] != ignore_index:
            end = i + 1
            break
    if end is None:
        return None
    start = end - 1
    while start > 0 and labels[start - 1] != ignore_index:
        start -= 1
    return start, end


@torch.no_grad()
def evaluate_loss(model, batches: List[dict], *, device: torch.device, autocast: Callable) -> float:
    """Mean loss over every trained token of the held-out batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            n = batch["num_trained_tokens"]
            if n == 0:
                continue
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "num_trained_tokens"}
            with autocast():
                out = model(**inputs, num_items_in_batch=n, use_cache=False)
            total += float(out.loss.float()) * n  # HF semantics: loss = sum / num_items_in_batch
            count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


@torch.no_grad()
def exact_match(model, tokenizer, examples, *, device: torch.device, autocast: Callable, max_new_tokens: int,
                batch_size: int) -> Tuple[float, List[dict]]:
    """Greedy-generate the last trained span of each example from the tokens before it; compare the text.

    Returns (fraction matched, [{"prompt", "expected", "generated", "match"}...]).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    items = []
    for example in examples:
        span = answer_span(example.labels)
        if span is None or span[0] == 0:
            continue  # nothing to condition on or nothing to generate
        start, end = span
        items.append((list(example.input_ids[:start]), list(example.input_ids[start:end])))
    if not items:
        return float("nan"), []
    was_training = model.training
    model.eval()
    samples = []
    try:
        for first in range(0, len(items), batch_size):
            chunk = items[first:first + batch_size]
            width = max(len(p) for p, _ in chunk)
            # left padding: every prompt ends at the same column, so generation continues each one
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (prompt, _) in enumerate(chunk):
                input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                attention[row, width - len(prompt):] = 1
            budget = min(max_new_tokens, max(len(t) for _, t in chunk) + 4)
            with autocast():
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=budget,
                    do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True,
                )
            for row, (prompt, target) in enumerate(chunk):
                generated = out[row, width:].tolist()
                if eos in generated:
                    generated = generated[: generated.index(eos) + 1]
                expected_text = tokenizer.decode(target, skip_special_tokens=True).strip()
                generated_text = tokenizer.decode(generated, skip_special_tokens=True).strip()
                # the answer must also end where the reference ends (EOS), not run on
                ended = (eos not in target) or (eos in generated)
                samples.append({
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "expected": expected_text,
                    "generated": generated_text,
                    "match": bool(ended and generated_text == expected_text),
                })
    finally:
        model.train(was_training)
    return sum(s["match"] for s in samples) / len(samples), samples


def autocast_factory(device: torch.device, dtype: torch.dtype, enabled: bool) -> Callable:
    """A zero-argument callable returning the forward's autocast context."""
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
