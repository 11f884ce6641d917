"""Held-out evaluation: loss per trained token, and the replies generated once per eval for the metrics."""
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
def generate_replies(model, tokenizer, examples, *, device: torch.device, autocast: Callable, max_new_tokens: int,
                     batch_size: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int = 0) -> list:
    """Generate the last trained span of each example from the tokens before it, once per eval: every
    metric (fastsft.eval_metrics) scores these replies. Greedy, or sampled with `seed` (the training
    RNG is left as it was). Returns [Reply(index, prompt, reply, reference, ended)]."""
    from fastsft.eval_metrics import Reply

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    items = []
    for index, example in enumerate(examples):
        span = answer_span(example.labels)
        if span is None or span[0] == 0:
            continue  # nothing to condition on or nothing to generate
        start, end = span
        items.append((index, list(example.input_ids[:start]), list(example.input_ids[start:end])))
    if not items:
        return []
    was_training = model.training
    model.eval()
    replies = []
    devices = [device] if device.type == "cuda" else []
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False)
    try:
        with torch.random.fork_rng(devices=devices, enabled=do_sample):
            if do_sample:
                torch.manual_seed(seed)
            for first in range(0, len(items), batch_size):
                chunk = items[first:first + batch_size]
                width = max(len(p) for _, p, _ in chunk)
                # left padding: every prompt ends at the same column, so generation continues each one
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (_, prompt, _) in enumerate(chunk):
                    input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                    attention[row, width - len(prompt):] = 1
                budget = min(max_new_tokens, max(len(t) for _, _, t in chunk) + 4)
                with autocast():
                    out = model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=budget,
                        eos_token_id=eos, pad_token_id=pad, use_cache=True, **sampling,
                    )
                for row, (index, prompt, target) in enumerate(chunk):
                    generated = out[row, width:].tolist()
                    if eos in generated:
                        generated = generated[: generated.index(eos) + 1]
                    replies.append(Reply(
                        index=index, prompt=tokenizer.decode(prompt, skip_special_tokens=False),
                        reply=tokenizer.decode(generated, skip_special_tokens=True).strip(),
                        reference=tokenizer.decode(target, skip_special_tokens=True).strip(),
                        # the answer must also end where the reference ends (EOS), not run on
                        ended=(eos not in target) or (eos in generated),
                    ))
    finally:
        model.train(was_training)
    return replies


def reference_replies(tokenizer, examples) -> list:
    """Each example's reference as its own reply (no generation): the check of python metrics before training."""
    from fastsft.eval_metrics import Reply

    out = []
    for index, example in enumerate(examples):
        span = answer_span(example.labels)
        if span is None or span[0] == 0:
            continue
        start, end = span
        reference = tokenizer.decode(list(example.input_ids[start:end]), skip_special_tokens=True).strip()
        out.append(Reply(index=index, prompt=tokenizer.decode(list(example.input_ids[:start])), reply=reference,
                         reference=reference))
    return out


def held_out_batches(examples, config, pad_token_id) -> List[dict]:
    """Evaluation batches of `examples` planned like the training data (packing, batch_tokens / batch_size)."""
    from fastsft.data import collate, plan_batches

    lengths = [len(e.input_ids) for e in examples]
    plan = plan_batches(lengths, batch_tokens=config.batch_tokens, packing=config.packing,
                        batch_size=config.batch_size, seed=config.seed, epoch=0)
    return [collate([examples[i] for i in idx], packing=config.packing, pad_token_id=pad_token_id,
                    pad_to_multiple_of=config.pad_to_multiple_of) for idx in plan]


def autocast_factory(device: torch.device, dtype: torch.dtype, enabled: bool) -> Callable:
    """A zero-argument callable returning the forward's autocast context."""
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
