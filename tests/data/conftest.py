"""Shared fixtures of the data tests: one tiny tokenizer per session, file writers."""
import json

import pytest

from fastsft.data import IGNORE_INDEX
from fastsft.tiny import build_tokenizer

CORPUS = [
    "hello world, how are you today? I am fine, thanks.",
    "What is 2+2? It is 4. Add the numbers and answer briefly.",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant: Be nice and helpful.",
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(records, name="data.jsonl") -> path of a new JSONL file."""

    def write(records, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    return write


@pytest.fixture
def trained_runs(tokenizer):
    """trained_runs(example) -> the decoded text of each run of trained tokens."""

    def runs(example, tok=None):
        tok = tok or tokenizer
        out, run = [], []
        for token, label in zip(example.input_ids, example.labels):
            if label != IGNORE_INDEX:
                assert label == token, "a trained label must be the token itself"
                run.append(token)
            elif run:
                out.append(tok.decode(run))
                run = []
        if run:
            out.append(tok.decode(run))
        return out

    return runs
