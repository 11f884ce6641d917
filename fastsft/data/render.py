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
trained message is found by rendering prefixes. It starts where the rendering of
the messages before it *with the generation prompt* ends (so the role header is
not trained) and ends where the rendering up to and including it ends, minus
trailing whitespace (the end-of-turn token is trained, the newline after it is
not). The first message has no prefix: it starts where its content starts, found
by rendering it alone with a placeholder content (so a template's BOS, default
system block and header are never trained). Every prefix rendering must be a
prefix of the full rendering, otherwise the mask could not be exact and a
DataError names the example and what the template does. Two template habits are
recognised and handled exactly:

- a generation prompt that is not a prefix of the turn it opens (DeepSeek-R1's
  ``<｜Assistant｜><think>\\n``): the reply starts where the two renderings part,
  at a token boundary (their longest common prefix); logged once per dataset;
- a constant suffix added after every rendering without the generation prompt
  (Phi-3's EOS): it is not part of the prefixes; it is trained when the last
  message is, as the EOS it stands for.

A system message that the template leaves out of the rendering (Mistral's
template does when the conversation ends with a reply) is an error in every mode.
The full text is tokenised once; a token is trained when its character span
overlaps a trained span. EOS is trained: when the rendering does not end with EOS
(ignoring trailing whitespace) and its last part is trained, an EOS token is
appended.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fastsft.data.example import IGNORE_INDEX
from fastsft.data.formats import Chat, Plain, Sample
from fastsft.errors import ConfigError, DataError

_RENDER_CHUNK = 256
_TOKENIZE_CHUNK = 1024
# Stands for the first message's content to find where that content starts.
_PLACEHOLDER = "\ue000fastsft-content\ue001"
_PROBE = [{"role": "user", "content": "fastsft probe"}]

logger = logging.getLogger(__name__)


@dataclass
class Rendered:
    """One sample as text plus the character spans whose tokens are trained."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool  # plain text gets the tokenizer's own BOS; chat templates add theirs
    train_all: bool  # every token, special tokens included
    final_trained: bool  # the last part is trained, so EOS is trained (appended when missing)


@dataclass
class RenderNotes:
    """What rendering worked around, counted over a dataset and reported once (report_notes)."""

    shared_prefix: int = 0  # examples whose replies start where generation prompt and turn part
    shared_prefix_first: Optional[int] = None
    header_trained: int = 0  # examples whose assistant header is trained (no boundary found)
    header_trained_first: Optional[int] = None

    def add(self, other: "RenderNotes") -> None:
        for name in ("shared_prefix", "header_trained"):
            if getattr(other, name):
                setattr(self, name, getattr(self, name) + getattr(other, name))
                if getattr(self, f"{name}_first") is None:
                    setattr(self, f"{name}_first", getattr(other, f"{name}_first"))

    def count(self, name: str, index: int) -> None:
        setattr(self, name, getattr(self, name) + 1)
        if getattr(self, f"{name}_first") is None:
            setattr(self, f"{name}_first", index)


def report_notes(notes: RenderNotes, where: str) -> None:
    """One warning line per habit, for the dataset `where`."""
    if notes.shared_prefix:
        logger.warning(
            "%s: in %d example(s) (first: example %d) the chat template's generation prompt is not a prefix of "
            "the assistant turn it opens; each reply starts where the two renderings part (their longest common "
            "prefix), so the header is not trained", where, notes.shared_prefix, notes.shared_prefix_first)
    if notes.header_trained:
        logger.warning(
            "%s: in %d example(s) (first: example %d) the chat template's generation prompt is not a prefix of "
            "the assistant turn it opens and shares nothing with it: the assistant header tokens are trained too",
            where, notes.header_trained, notes.header_trained_first)


def encode_samples(samples: list[Sample], indices: list[int], tokenizer, *, mask: str,
                   chat_template: str | None) -> tuple[list[tuple[list[int], list[int]]], RenderNotes]:
    """(input_ids, labels) for every sample, and the notes; `indices` name the examples in errors."""
    check_encodable(samples, indices, tokenizer, chat_template)
    notes = RenderNotes()
    rendered = render_samples(samples, indices, tokenizer, mask=mask, chat_template=chat_template, notes=notes)
    return tokenize_rendered(rendered, tokenizer), notes


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
                "set chat_template to a template name (chatml, llama3, qwen2.5, ...), a .jinja file or Jinja text"
            )


def render_samples(samples: list[Sample], indices: list[int], tokenizer, *, mask: str,
                   chat_template: str | None, notes: Optional[RenderNotes] = None) -> list[Rendered]:
    notes = notes if notes is not None else RenderNotes()
    chats = [(k, sample) for k, sample in enumerate(samples) if isinstance(sample, Chat)]
    out: list[Rendered | None] = [None] * len(samples)
    for k, sample in enumerate(samples):
        if isinstance(sample, Plain):
            out[k] = _render_plain(sample, mask)
    if chats:
        renderer = _ChatRenderer(tokenizer, chat_template)
        for start in range(0, len(chats), _RENDER_CHUNK):
            chunk = chats[start:start + _RENDER_CHUNK]
            items = renderer.render([s for _, s in chunk], [indices[k] for k, _ in chunk], mask, notes)
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
        self.suffix = self._closing_suffix()

    def _closing_suffix(self) -> str:
        """What the template adds after a rendering without the generation prompt and leaves out with
        it (Phi-3's EOS): a one-user-turn probe is rendered both ways, compared token by token."""
        try:
            plain, prompted = self._apply([_PROBE], False)[0], self._apply([_PROBE], True)[0]
        except Exception:
            return ""  # the template refuses the probe; examples still get every other check
        if prompted.startswith(plain):
            return ""
        return plain[self._shared_prefix(plain, prompted, 0):]

    def render(self, samples: list[Chat], indices: list[int], mask: str, notes: RenderNotes) -> list[Rendered]:
        # Collect every rendering needed, render them in two batched calls, then cut spans.
        jobs = {False: [], True: []}  # add_generation_prompt -> [(sample k, n messages)]
        plans = []
        for k, sample in enumerate(samples):
            n = len(sample.messages)
            jobs[False].append((k, n))
            trained = [] if mask == "all" else trained_messages(sample, mask)  # "all" needs no spans
            plan = []
            for i in trained:
                gen = i > 0 and sample.messages[i]["role"] == "assistant"
                if i > 0:
                    jobs[False].append((k, i))  # where the header starts; the fallback start
                    if gen:
                        jobs[True].append((k, i))
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
            n, index = len(sample.messages), indices[k]
            full = texts[(k, n, False)]
            _check_system_kept(sample, full, index)
            # The closing suffix belongs to no message; it is trained with the last one.
            body_end = len(full) - len(self.suffix) if self.suffix and full.endswith(self.suffix) else len(full)
            spans = []
            habits = set()
            for i, gen in plans[k]:
                if i + 1 == n:
                    end = body_end
                else:
                    end = self._prefix_end(texts[(k, i + 1, False)], full, i + 1, sample, index, mask)
                if i == 0:
                    start = self._first_start(sample, full, index)
                else:
                    before = self._prefix_end(texts[(k, i, False)], full, i, sample, index, mask)
                    start, habit = (self._reply_start(texts[(k, i, True)], full, before) if gen else (before, None))
                    if habit:
                        habits.add(habit)
                piece = full[start:end]
                spans.append((start, start + len(piece.rstrip())))
            for habit in sorted(habits):
                notes.count(habit, index)
            final_trained = mask == "all" or (bool(plans[k]) and plans[k][-1][0] == n - 1)
            tail = full[body_end:]
            if final_trained and tail.strip():
                lead = len(tail) - len(tail.lstrip())
                spans.append((body_end + lead, body_end + len(tail.rstrip())))
            results.append(Rendered(full, spans, add_special_tokens=False, train_all=mask == "all",
                                    final_trained=final_trained))
        return results

    def _prefix_end(self, text: str, full: str, count: int, sample: Chat, index: int, mask: str) -> int:
        """Where the rendering of the first `count` messages ends inside the full rendering."""
        if full.startswith(text):
            return len(text)
        suffix = self.suffix
        if suffix and text.endswith(suffix) and full.startswith(text[:len(text) - len(suffix)]):
            return len(text) - len(suffix)
        raise _not_prefix_stable(text, full, count, sample, index, mask)

    def _reply_start(self, prompted: str, full: str, before: int) -> tuple[int, Optional[str]]:
        """Where an assistant reply starts: after the generation prompt when that is a prefix of the
        turn, else where the two part (at a token boundary), else after the previous message."""
        if full.startswith(prompted) and len(prompted) >= before:
            return len(prompted), None
        if prompted[:before] == full[:before]:
            shared = self._shared_prefix(prompted, full, before)
            if shared > before:
                return shared, "shared_prefix"
        return before, "header_trained"

    def _shared_prefix(self, text: str, other: str, known: int) -> int:
        """The longest common prefix of two renderings (equal up to `known`), moved back to the end of
        a token of `text`, so a reply opening with the prompt's first characters ("<" of "<think>")
        keeps them."""
        same = known + len(os.path.commonprefix([text[known:], other[known:]]))
        tail = self.tokenizer(text[known:], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        best = 0
        for _, token_end in tail["offset_mapping"]:
            if token_end <= same - known:
                best = max(best, token_end)
        return known + best

    def _first_start(self, sample: Chat, full: str, index: int) -> int:
        """Where the first message's content starts: rendered alone with a placeholder content, the
        text before the placeholder (BOS, default system block, header) must open the full rendering."""
        probe = [dict(sample.messages[0], content=_PLACEHOLDER)]
        try:
            text = self._apply([probe], False)[0]
        except Exception as error:
            raise DataError(f"example {index}: the chat template failed on the first message alone: {error}") from None
        at = text.find(_PLACEHOLDER)
        if at < 0 or not full.startswith(text[:at]):
            raise DataError(
                f"example {index}: the chat template renders the first message differently when it is alone, so "
                "where its trained part starts is unknown and the loss mask cannot be exact; start the "
                "conversation with a user turn, or use another chat_template"
            )
        return at

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


def _check_system_kept(sample: Chat, full: str, index: int) -> None:
    for message in sample.messages:
        content = message["content"].strip()
        if message["role"] == "system" and content and content not in full:
            raise DataError(
                f"example {index}: the chat template leaves the system message out of the rendering (Mistral's "
                "own template keeps it only when the conversation ends with a user turn), so the model would be "
                "trained without it; use chat_template: mistral (fastsft's, which puts the system prompt in the "
                "first user turn), or move the system text into the first user message"
            )


def _not_prefix_stable(text: str, full: str, count: int, sample: Chat, index: int, mask: str) -> DataError:
    at, n = len(os.path.commonprefix([text, full])), len(sample.messages)
    if "<think>" in text[at:]:
        what = ("the template drops the <think> block of an assistant reply once a later user turn follows it "
                "(as Qwen3's does)")
    else:
        what = "the template renders earlier messages differently once later ones follow"
    if sample.messages[-1]["role"] != "assistant":
        way = ("end the conversation with its last reply (a trailing user turn changes how the replies before "
               "it render), or use a chat_template that renders every turn the same whatever follows it")
    elif mask == "assistant":
        way = ("use mask: last_assistant (only the final reply is trained, and its rendering is stable), or a "
               "chat_template that renders every turn the same whatever follows it")
    else:
        way = "use a chat_template that renders every turn the same whatever follows it"
    return DataError(
        f"example {index}: the chat template is not prefix-stable: rendering the first {count} of {n} messages "
        f"gives {text[at:at + 24]!r} at character {at} where rendering them all gives {full[at:at + 24]!r}: "
        f"{what}, so the loss mask cannot be exact; {way}"
    )


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
