"""Human-readable views of prepared data, for `fastsft inspect`."""
from __future__ import annotations

from typing import Optional

from fastsft.data.example import IGNORE_INDEX, Example

TRAINED_ON, TRAINED_OFF = "\x1b[1;32m", "\x1b[0m"  # bold green
OPEN, CLOSE = "[[", "]]"


def render_inspect(example: Example, tokenizer, *, color: bool) -> str:
    """The example's text with trained tokens (labels != -100) highlighted:
    ANSI bold green with color=True, wrapped in [[...]] otherwise.

    Runs of tokens with the same status are decoded together, so multi-byte
    characters and word pieces read naturally. labels[0] is shown as it is stored,
    although the model's shift never trains it.
    """
    pieces = []
    run: list[int] = []
    run_trained: Optional[bool] = None
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_piece(run, run_trained, tokenizer, color))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_piece(run, run_trained, tokenizer, color))
    return "".join(pieces)


def _piece(tokens: list[int], trained: bool, tokenizer, color: bool) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not trained:
        return text
    return f"{TRAINED_ON}{text}{TRAINED_OFF}" if color else f"{OPEN}{text}{CLOSE}"


def render_tokens(example: Example, tokenizer) -> str:
    """One line per token: position, id, trained ('+') or not ('.'), and its text (repr, so spaces show)."""
    lines = []
    for position, (token, label) in enumerate(zip(example.input_ids, example.labels)):
        text = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        lines.append(f"{position:>6} {token:>8} {'+' if label != IGNORE_INDEX else '.'} {text!r}")
    return "\n".join(lines)


def legend(*, color: bool, tokens: bool) -> str:
    if tokens:
        return "legend: position, token id, '+' trained (its label is the token) or '.' context only, token text"
    marked = f"{TRAINED_ON}bold green{TRAINED_OFF}" if color else f"{OPEN}between brackets{CLOSE}"
    return f"legend: trained tokens are {marked} (the loss is computed on them); the rest is context only"


def inspect_report(prepared, tokenizer, *, num_examples: int = 3, color: bool = False,
                   batch_tokens: Optional[int] = None, seed: int = 0, packing: bool = True,
                   batch_size: int = 1, start_index: Optional[int] = None, tokens: bool = False) -> str:
    """A legend, a few rendered examples, the dataset statistics and (given batch_tokens) the
    batching efficiency of epoch 0 -- what `fastsft inspect` prints. packing=False
    reports padded batches of `batch_size` (real tokens over padded slots). `start_index`
    starts at the example with that source index; `tokens` shows them token by token."""
    from fastsft.data.pack import packing_efficiency, plan_batches

    lines = [legend(color=color, tokens=tokens)]
    examples = prepared.train
    if start_index is not None:
        examples = [e for e in examples if e.source_index >= start_index]
        if not examples or examples[0].source_index != start_index:
            lines.append(f"(no training example has source index {start_index}: it was dropped, held out or "
                         f"is past the end; showing the next ones)")
    for k, example in enumerate(examples[:num_examples]):
        lines.append(f"--- example {k} (source index {example.source_index}, {len(example)} tokens, "
                     f"{example.num_trained_tokens} trained) ---")
        lines.append(render_tokens(example, tokenizer) if tokens else render_inspect(example, tokenizer, color=color))
    lines.append("--- statistics ---")
    lines.extend(prepared.summary_lines())
    if batch_tokens is not None and prepared.train:
        lengths = [len(e) for e in prepared.train]
        split = packing and max(lengths) > batch_tokens
        batches = plan_batches(lengths, batch_tokens=batch_tokens, packing=packing, batch_size=batch_size,
                               seed=seed, epoch=0, split_documents=split)
        efficiency = packing_efficiency(lengths, batches, batch_tokens, packing=packing)
        if packing:
            lines.append(f"packing: {len(batches)} batches of <= {batch_tokens} tokens"
                         f"{' (documents split at batch ends)' if split else ''}, efficiency {100 * efficiency:.1f}%")
        else:
            lines.append(f"padded batches: {len(batches)} of {batch_size} examples, "
                         f"{100 * efficiency:.1f}% of the padded tokens are real")
    return "\n".join(lines)
