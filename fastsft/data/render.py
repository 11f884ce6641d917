"""Render samples to token ids and build exact loss masks.

Which tokens are trained (labels != -100), per `mask` and format:

================  =====================  ==========================  ============
mask              messages               prompt/completion,          text
                                         instruction
================  =====================  ==========================  ============
assistant         every assistant turn   the completion              every token
last_assistant    the last assistant     the completion              every token
completion        the last assistant     the completion              every token
all               every token            every token                 every token
================  =====================  ==========================  ============

A chat is rendered with the template once in full; the character span of each
trained message is found by rendering prefixes: it starts where the rendering of
the messages before it *with the generation prompt* ends (so the role header is
not trained) and ends where the rendering up to and including it ends, minus
trailing whitespace (the end-of-turn token is trained, the newline after it is
not). Every prefix rendering must be a prefix of the full rendering, otherwise
the mask could not be exact and a DataError names the example. The full text is
tokenised once; a token is trained when its character span overlaps a trained
span. EOS is trained: when the rendering does not end with EOS (ignoring
trailing whitespace) and its last part is trained, an EOS token is appended.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fastsft.data.example import IGNORE_INDEX
from fastsft.data.formats import Chat, Plain, Sample
from fastsft.errors import ConfigError, DataError

_RENDER_CHUNK = 256
_TOKENIZE_CHUNK = 1024

logger = logging.getLogger(__name__)
_warned_generation_prompt = False


@dataclass
class Rendered:
    """One sample as text plus the character spans whose tokens are trained."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool  # plain text gets the tokenizer's own BOS; chat templates add theirs
    train_all: bool  # every token, special tokens included
    final_trained: bool  # the last part is trained, so EOS is trained (appended when missing)


def encode_samples(samples: list[Sample], indices: list[int], tokenizer, *, mask: str,
                   chat_template: str | None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for every sample; `indices` name the examples in errors."""
    check_encodable(samples, indices, tokenizer, chat_template)
    rendered = render_samples(samples, indices, tokenizer, mask=mask, chat_template=chat_template)
    return tokenize_rendered(rendered, tokenizer)


def check_encodable(samples: list[Sample], indices: list[int], tokenizer, chat_template: str | None) -> None:
    """The errors that concern the whole dataset (tokenizer, template), raised before any work."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("fastsft needs a fast (Rust) tokenizer: loss masks use its offset mappings")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token; set one (EOS ends every trained example)")
    if chat_template is None:
        first_chat = next((k for k, sample in enumerate(samples) if isinstance(sample, Chat)), None)
        if first_chat is not None:
            raise ConfigError(
                f"example {indices[first_chat]} needs a chat template and the tokenizer has none: "
                "set chat_template to a Jinja template, or to 'default' for ChatML"
            )


def render_samples(samples: list[Sample], indices: list[int], tokenizer, *, mask: str,
                   chat_template: str | None) -> list[Rendered]:
    chats = [(k, sample) for k, sample in enumerate(samples) if isinstance(sample, Chat)]
    out: list[Rendered | None] = [None] * len(samples)
    for k, sample in enumerate(samples):
        if isinstance(sample, Plain):
            out[k] = _render_plain(sample, mask)
    if chats:
        renderer = _ChatRenderer(tokenizer, chat_template)
        for start in range(0, len(chats), _RENDER_CHUNK):
            chunk = chats[start:start + _RENDER_CHUNK]
            items = renderer.render([s for _, s in chunk], [indices[k] for k, _ in chunk], mask)
            for (k, _), item in zip(chunk, items):
                out[k] = item
    return out


def _render_plain(sample: Plain, mask: str) -> Rendered:
    text = sample.prompt + sample.completion
    train_all = mask == "all" or sample.is_text
    start = 0 if train_all else len(sample.prompt)
    return Rendered(text, [(start, len(text))], add_special_tokens=True, train_all=train_all, final_trained=True)


def trained_messages(sample: Chat, mask: str) -> list[int]:
    """Indices of the messages whose tokens are trained (mask != 'all')."""
    n = len(sample.messages)
    if sample.completion_start is not None:
        return list(range(sample.completion_start, n))
    assistant = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]
    if mask == "assistant":
        return assistant
    return assistant[-1:]  # last_assistant, and completion (the last reply is the completion)


class _ChatRenderer:
    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template

    def render(self, samples: list[Chat], indices: list[int], mask: str) -> list[Rendered]:
        # Collect every rendering needed, render them in two batched calls, then cut spans.
        jobs = {False: [], True: []}  # add_generation_prompt -> [(sample k, n messages)]
        plans = []
        for k, sample in enumerate(samples):
            n = len(sample.messages)
            jobs[False].append((k, n))
            trained = [] if mask == "all" else trained_messages(sample, mask)  # "all" needs no spans
            plan = []
            for i in trained:
                if i > 0:
                    gen = sample.messages[i]["role"] == "assistant"
                    jobs[gen].append((k, i))
                    jobs[False].append((k, i))  # fallback start when the generation prompt is not a prefix
                else:
                    gen = False
                if i + 1 < n:
                    jobs[False].append((k, i + 1))
                plan.append((i, gen))
            plans.append(plan)
        texts = {}
        for gen, wanted in jobs.items():
            unique = sorted(set(wanted))
            for (k, count), text in zip(unique, self._render_many(samples, indices, unique, gen)):
                texts[(k, count, gen)] = text

        results = []
        for k, sample in enumerate(samples):
            n = len(sample.messages)
            full = texts[(k, n, False)]
            spans = []
            for i, gen in plans[k]:
                end = len(self._prefix(texts, full, k, i + 1, False, indices[k], n))
                if i == 0:
                    start = 0
                else:
                    start = self._start(texts, full, k, i, gen, indices[k], n)
                piece = full[start:end]
                spans.append((start, start + len(piece.rstrip())))
            final_trained = mask == "all" or (bool(plans[k]) and plans[k][-1][0] == n - 1)
            results.append(Rendered(full, spans, add_special_tokens=False, train_all=mask == "all",
                                    final_trained=final_trained))
        return results

    def _prefix(self, texts, full, k, count, gen, index, n) -> str:
        text = texts[(k, count, gen)]
        if not full.startswith(text):
            raise DataError(
                f"example {index}: the chat template is not prefix-stable: rendering the first {count} of "
                f"{n} messages{' with the generation prompt' if gen else ''} is not a prefix of rendering "
                "them all, so the loss mask cannot be exact (templates that rewrite earlier turns depending "
                "on later ones are not supported; use another chat_template)"
            )
        return text

    def _start(self, texts, full, k, i, gen, index, n) -> int:
        before = self._prefix(texts, full, k, i, False, index, n)
        if gen:
            with_header = texts[(k, i, True)]
            if full.startswith(with_header) and len(with_header) >= len(before):
                return len(with_header)
            global _warned_generation_prompt
            if not _warned_generation_prompt:
                _warned_generation_prompt = True
                logger.warning(
                    "the chat template's generation prompt is not a prefix of the assistant turn it "
                    "starts (example %d): the assistant header tokens are trained too", index)
        return len(before)

    def _render_many(self, samples, indices, jobs, gen) -> list[str]:
        conversations = [samples[k].messages[:count] for k, count in jobs]
        try:
            return self._apply(conversations, gen)
        except Exception:
            pass
        # Render one by one to name the failing example.
        out = []
        for (k, count), conversation in zip(jobs, conversations):
            try:
                out.extend(self._apply([conversation], gen))
            except Exception as error:
                raise DataError(
                    f"example {indices[k]}: the chat template failed on the first {count} messages"
                    f"{' with the generation prompt' if gen else ''}: {error}"
                ) from None
        return out

    def _apply(self, conversations, gen) -> list[str]:
        rendered = self.tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=gen, chat_template=self.template)
        if isinstance(rendered, str):
            rendered = [rendered]
        return list(rendered)


def tokenize_rendered(rendered: list[Rendered], tokenizer) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    out = []
    groups = {False: [], True: []}
    for k, item in enumerate(rendered):
        groups[item.add_special_tokens].append(k)
    encoded: list = [None] * len(rendered)
    for add_special, members in groups.items():
        for start in range(0, len(members), _TOKENIZE_CHUNK):
            chunk = members[start:start + _TOKENIZE_CHUNK]
            batch = tokenizer([rendered[k].text for k in chunk], add_special_tokens=add_special,
                              return_offsets_mapping=True, verbose=False)
            for k, ids, offsets in zip(chunk, batch["input_ids"], batch["offset_mapping"]):
                encoded[k] = (ids, offsets)
    for item, (ids, offsets) in zip(rendered, encoded):
        out.append(_labels_for(item, list(ids), offsets, eos))
    return out


def _labels_for(item: Rendered, ids: list[int], offsets, eos: int) -> tuple[list[int], list[int]]:
    ids_array = np.asarray(ids, dtype=np.int64)
    if item.train_all:
        trained = np.ones(len(ids), dtype=bool)
    else:
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = bounds[:, 0], bounds[:, 1]
        trained = np.zeros(len(ids), dtype=bool)
        for span_start, span_end in item.spans:
            if span_end > span_start:
                trained |= (starts < span_end) & (ends > span_start) & (ends > starts)
    labels = np.where(trained, ids_array, IGNORE_INDEX)
    input_ids = ids_array.tolist()
    label_list = labels.tolist()
    if item.final_trained and not _ends_with_eos(item.text, ids, offsets, eos):
        input_ids.append(eos)
        label_list.append(eos)
    return input_ids, label_list


def _ends_with_eos(text: str, ids: list[int], offsets, eos: int) -> bool:
    for position in range(len(ids) - 1, -1, -1):
        start, end = offsets[position]
        if ids[position] != eos and end > start and not text[start:end].strip():
            continue  # trailing whitespace after the end of turn
        return ids[position] == eos
    return False
