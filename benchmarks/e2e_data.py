"""Synthetic SFT data for the end-to-end benchmark.

Documents are random token ids with a prompt (loss-masked) and a response
(trained), with lengths drawn from a log-normal mix resembling chat SFT sets:
a median of ~600 tokens (--doc-median), many short exchanges and a long tail up to the batch
length. Every provider trains on exactly the same documents in the same
steps: the documents of a step are chosen once (fastsft.data.plan_batches,
packing into `seq` tokens) and then laid out per provider:
- "padded":    one row per document, right-padded, with an attention mask (fastsft.data.collate);
- "packed":    all documents in one row with restarting position ids and cu_seq_lens (fastsft.data.collate);
- "flattened": transformers' DataCollatorWithFlattening (padding-free packing for flash-attn);
- "packed-lengths": the packed row with restarting position ids and the document lengths as
  `packed_seq_lengths` (int32), what Unsloth's padding-free collator hands its models.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

IGNORE = -100
BATCH_FORMATS = ("padded", "packed", "flattened", "packed-lengths")
# log-normal document lengths around a median (tokens)
DOC_MEDIAN = 600
LENGTH_SIGMA = 0.9
MIN_DOC_TOKENS = 16
# token ids below this are left to special tokens
FIRST_TOKEN_ID = 3
# the keys a CausalLM forward receives (everything else a collate returns is bookkeeping)
MODEL_KEYS = ("input_ids", "labels", "attention_mask", "position_ids",
              "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "packed_seq_lengths")


@dataclass
class Step:
    """The documents of one training step, shared by every provider."""

    examples: list

    @property
    def lengths(self) -> list:
        return [len(e.input_ids) for e in self.examples]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def trained_tokens(self) -> int:
        """Labels != -100 after the causal shift, counted within each document."""
        return sum(sum(1 for y in e.labels[1:] if y != IGNORE) for e in self.examples)


def make_document(length: int, *, vocab_size: int, generator: torch.Generator, source_index: int = 0):
    """One prompt + response document of `length` tokens; the prompt (10..60%) is loss-masked."""
    from fastsft.data import Example

    ids = torch.randint(FIRST_TOKEN_ID, vocab_size, (length,), generator=generator).tolist()
    frac = 0.1 + 0.5 * torch.rand((), generator=generator).item()
    prompt = max(1, min(length - 2, int(frac * length)))
    labels = [IGNORE] * prompt + ids[prompt:]
    return Example(input_ids=ids, labels=labels, source_index=source_index)


def document_lengths(n: int, *, max_len: int, generator: torch.Generator, median: int = DOC_MEDIAN) -> list:
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    raw = torch.exp(math.log(median) + LENGTH_SIGMA * z)
    return [int(min(max_len, max(MIN_DOC_TOKENS, round(float(x))))) for x in raw]


def make_steps(n_steps: int, *, seq: int, vocab_size: int, seed: int, median: int = DOC_MEDIAN) -> list:
    """`n_steps` steps of documents packed into at most `seq` tokens each (same for every provider)."""
    from fastsft.data import plan_batches

    if seq < MIN_DOC_TOKENS:
        raise ValueError(f"--seq must be at least {MIN_DOC_TOKENS}; got {seq}")
    g = torch.Generator().manual_seed(seed)
    if median < 1:
        raise ValueError(f"the median document length must be positive; got {median}")
    mean_len = median * math.exp(LENGTH_SIGMA ** 2 / 2)
    # enough documents for n_steps full batches, plus slack for the plan's last, partial batch
    n_docs = max(8, int(2 * n_steps * seq / min(mean_len, seq)) + 8)
    lengths = document_lengths(n_docs, max_len=seq, generator=g, median=median)
    plan = plan_batches(lengths, batch_tokens=seq, packing=True, batch_size=1, seed=seed, epoch=0)
    if len(plan) < n_steps:
        raise ValueError(f"the data plan has {len(plan)} batches; {n_steps} steps need more documents")
    plan = plan[:n_steps]  # in the plan's (shuffled) order, as a trainer would meet them
    docs = {}
    for idx in plan:
        for i in idx:
            docs[i] = None
    for i in sorted(docs):  # generate in index order: the content depends only on the seed
        docs[i] = make_document(lengths[i], vocab_size=vocab_size, generator=g, source_index=i)
    return [Step([docs[i] for i in idx]) for idx in plan]


def single_document_step(length: int, *, vocab_size: int, seed: int) -> Step:
    """A batch of one document of `length` tokens (the --max-context probes)."""
    g = torch.Generator().manual_seed(seed + length)
    return Step([make_document(length, vocab_size=vocab_size, generator=g)])


def layout(step: Step, batch_format: str, *, pad_token_id: int) -> dict:
    """The model inputs of `step` in one provider's batch format (CPU tensors)."""
    if batch_format in ("padded", "packed"):
        from fastsft.data import collate

        batch = collate(step.examples, packing=batch_format == "packed", pad_token_id=pad_token_id)
    elif batch_format == "packed-lengths":
        from fastsft.data import collate

        batch = collate(step.examples, packing=True, pad_token_id=pad_token_id)
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
        batch["packed_seq_lengths"] = torch.tensor(step.lengths, dtype=torch.int32)
    elif batch_format == "flattened":
        from transformers import DataCollatorWithFlattening

        collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
        batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in step.examples])
    else:
        raise ValueError(f"batch_format must be one of {BATCH_FORMATS}; got {batch_format!r}")
    batch = {k: v for k, v in batch.items() if k in MODEL_KEYS}
    check_layout(step, batch, batch_format)
    return batch


def check_layout(step: Step, batch: dict, batch_format: str) -> None:
    """Every layout must hold the step's tokens and train exactly the step's trained tokens, or the
    providers would not be compared on the same work."""
    labels = batch["labels"]
    trained = int((labels[..., 1:] != IGNORE).sum())
    if "attention_mask" in batch:
        real = int(batch["attention_mask"].sum())
    else:
        real = int(batch["input_ids"].numel())
    if trained != step.trained_tokens or real != step.tokens:
        raise RuntimeError(f"{batch_format} batch holds {real} tokens / trains {trained}; the step has "
                           f"{step.tokens} tokens / trains {step.trained_tokens}")


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def fingerprint(steps) -> str:
    """A hash of the documents of all steps (recorded per provider: equal hashes, equal data)."""
    h = hashlib.sha256()
    for step in steps:
        for e in step.examples:
            h.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(torch.tensor(e.labels, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]
