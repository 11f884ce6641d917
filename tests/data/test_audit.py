"""Issue 25, item 6: the supervision audit -- a source that trains on nothing stops the run,
the report counts, and the trained spans of a rendered example round-trip to its replies."""
import pytest

from fastsft.data import prepare_data
from fastsft.data.audit import audit_lines, round_trip, trained_spans
from fastsft.data.options import DataOptions
from fastsft.errors import DataError

# a template that renders user turns only: every assistant token is masked
USER_ONLY = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"


def _chat(k):
    return {"messages": [{"role": "user", "content": f"question {k}"},
                         {"role": "assistant", "content": f"answer number {k} " * (k + 1)}]}


def test_template_that_drops_the_replies_fails_the_round_trip(write_jsonl, tokenizer):
    """Such a template still trains the appended EOS, so no count is zero: the round-trip catches it."""
    from fastsft.data.load import load_records

    source = write_jsonl([_chat(k) for k in range(4)])
    data = prepare_data(DataOptions(source=source, chat_template=USER_ONLY), tokenizer)
    text = "\n".join(audit_lines(data.train, data.stats, source=source, records=load_records(source, "train"),
                                 tokenizer=tokenizer))
    assert "round-trip: MISMATCH" in text and "reply [0] not trained" in text


def test_source_whose_replies_are_all_cut_names_max_seq_length(write_jsonl, tokenizer):
    long_prompt = [{"messages": [{"role": "user", "content": "hello world " * 200},
                                 {"role": "assistant", "content": "ok"}]}] * 3
    with pytest.raises(DataError, match=r"3 of them lost their reply to max_seq_length 32 \(raise it\)"):
        prepare_data(DataOptions(source=write_jsonl(long_prompt), max_seq_length=32), tokenizer)


def test_report_counts_and_round_trip(write_jsonl, tokenizer):
    from fastsft.data.load import load_records

    records = [_chat(k) for k in range(5)] + [{"messages": [{"role": "user", "content": "hello world " * 200},
                                                           {"role": "assistant", "content": "ok"}]}]
    source = write_jsonl(records)
    data = prepare_data(DataOptions(source=source, max_seq_length=64), tokenizer)
    lines = audit_lines(data.train, data.stats, source=source, records=load_records(source, "train"),
                        tokenizer=tokenizer)
    text = "\n".join(lines)
    counts = sorted(e.num_trained_tokens for e in data.train)
    assert counts[0] < counts[-1]  # replies of different lengths
    assert f"min {counts[0]}," in text and f"max {counts[-1]}" in text
    assert "no trained token: 1 (dropped); whole reply cut by max_seq_length: 1" in text
    assert "round-trip: ok" in text
    example = data.train[0]
    assert len(trained_spans(example)) == 1
    # a record whose reply differs from what was trained is caught
    wrong = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "something else"}]}
    assert "MISMATCH" in round_trip(example, wrong, tokenizer)
