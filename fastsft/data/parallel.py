"""Encode large datasets in worker processes.

Rendering chat templates is pure Python (Jinja), so big datasets are split into
chunks encoded by `spawn`ed workers (never `fork`: the parent holds torch and
tokenizer threads). Each worker receives the tokenizer once; results come back
in order, so the output is identical to the serial path. Opt-in
(DataOptions.num_workers): spawned workers re-import the caller's main module,
which must therefore be guarded by `if __name__ == "__main__":`.
"""
from __future__ import annotations

import os
from typing import Optional

from fastsft.data.formats import Sample
from fastsft.data.render import RenderNotes, check_encodable, encode_samples

_CHUNKS_PER_WORKER = 4
_MIN_CHUNK = 256  # smaller chunks cost more in messages than they save

_worker_state: dict = {}


def encode_in_workers(samples: list[Sample], indices: list[int], tokenizer, *, mask: str,
                      chat_template: Optional[str], num_workers: int
                      ) -> tuple[list[tuple[list[int], list[int]]], RenderNotes]:
    check_encodable(samples, indices, tokenizer, chat_template)
    if num_workers <= 1 or len(samples) < 2:
        return encode_samples(samples, indices, tokenizer, mask=mask, chat_template=chat_template)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    size = max(_MIN_CHUNK, -(-len(samples) // (num_workers * _CHUNKS_PER_WORKER)))
    if size >= len(samples):
        return encode_samples(samples, indices, tokenizer, mask=mask, chat_template=chat_template)
    chunks = [(samples[i:i + size], indices[i:i + size]) for i in range(0, len(samples), size)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer, mask, chat_template)) as pool:
        out: list = []
        notes = RenderNotes()
        for part, part_notes in pool.map(_encode_chunk, chunks):
            out.extend(part)
            notes.add(part_notes)
    return out, notes


def _init_worker(tokenizer, mask: str, chat_template: Optional[str]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_state.update(tokenizer=tokenizer, mask=mask, chat_template=chat_template)


def _encode_chunk(chunk):
    samples, indices = chunk
    state = _worker_state
    return encode_samples(samples, indices, state["tokenizer"], mask=state["mask"],
                          chat_template=state["chat_template"])
