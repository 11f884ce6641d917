"""Sources of every kind, bad data, truncation, evaluation split and the cache."""
import copy
import json
import os

import pytest

from fastsft.data import DEFAULT_CHAT_TEMPLATE, DataOptions, prepare_data
from fastsft.errors import ConfigError, DataError

RECORDS = [
    {"prompt": "What is 2+2?", "completion": " It is 4."},
    {"prompt": "Say hello.", "completion": " hello world"},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
]
TEXTS = [{"text": "hello world " * k} for k in range(1, 12)]


def ids_of(data):
    return [(e.input_ids, e.labels, e.source_index) for e in data.train]


@pytest.fixture
def reference(write_jsonl, tokenizer):
    return ids_of(prepare_data(DataOptions(source=write_jsonl(RECORDS)), tokenizer))


def test_json_list_and_json_lines_with_json_suffix(tmp_path, tokenizer, reference):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(RECORDS, indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": RECORDS}))
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS))
    for path in (listed, wrapped, lines):
        assert ids_of(prepare_data(DataOptions(source=str(path)), tokenizer)) == reference
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": RECORDS, "test": RECORDS[:1]}))
    assert ids_of(prepare_data(DataOptions(source=str(splits)), tokenizer)) == reference
    assert ids_of(prepare_data(DataOptions(source=str(splits), split="test"), tokenizer)) == reference[:1]
    with pytest.raises(DataError, match=r"splits.json: expected a JSON list of examples"):
        prepare_data(DataOptions(source=str(splits), split="dev"), tokenizer)


def test_parquet_csv_and_directories_via_datasets(tmp_path, tokenizer, reference):
    import datasets

    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    for source in ("d.parquet", "d.csv", "saved", "files"):
        data = prepare_data(DataOptions(source=str(tmp_path / source)), tokenizer)
        assert ids_of(data) == reference, source
    test_split = prepare_data(DataOptions(source=str(tmp_path / "saved"), split="test"), tokenizer)
    assert ids_of(test_split) == reference[:1]
    with pytest.raises(DataError, match=r"saved: no split 'dev'"):
        prepare_data(DataOptions(source=str(tmp_path / "saved"), split="dev"), tokenizer)


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n{\"prompt\": \"oops\",\n")
    with pytest.raises(DataError, match=rf"{path}, line 4: malformed JSON"):
        prepare_data(DataOptions(source=str(path)), tokenizer)
    path.write_text(json.dumps(RECORDS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: expected a JSON object, got list"):
        prepare_data(DataOptions(source=str(path)), tokenizer)


def test_malformed_json_names_line(tmp_path, tokenizer):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=rf"{path}, line 3: malformed JSON"):
        prepare_data(DataOptions(source=str(path)), tokenizer)


@pytest.mark.parametrize("record, fmt, message", [
    ({"prompt": "only a prompt"}, "prompt_completion",
     r"\.jsonl, line 3: missing field 'completion' \(format 'prompt_completion'\)"),
    ({"prompt": "p", "completion": 7}, "auto", r"\.jsonl, line 3: field 'completion' must be a string, got int"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages",
     r"\.jsonl, line 3: missing field 'messages\[1\]\.content'"),
    ({"messages": [{"role": "user", "content": None}]}, "messages",
     r"\.jsonl, line 3: field 'messages\[0\]\.content' must be a string, got NoneType"),
    ({"messages": "hi"}, "messages", r"\.jsonl, line 3: field 'messages' must be a list of messages"),
    ({"instruction": "do it"}, "instruction", r"\.jsonl, line 3: missing field 'output' \(format 'instruction'\)"),
    ({"txt": "x"}, "text", r"\.jsonl, line 3: missing field 'text'"),
])
def test_missing_or_wrong_field_names_example_and_field(write_jsonl, tokenizer, record, fmt, message):
    good = {"messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "instruction": {"instruction": "Add", "output": "4"}, "text": {"text": "hello"}}.get(fmt, RECORDS[0])
    records = [good, good, record]  # the bad record is on line 3
    with pytest.raises(DataError, match=message):
        prepare_data(DataOptions(source=write_jsonl(records), format=fmt), tokenizer)


def test_undetectable_format_and_missing_source(write_jsonl, tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"\.jsonl, line 1: cannot detect the format from fields \['body'\]"):
        prepare_data(DataOptions(source=write_jsonl([{"body": "x"}])), tokenizer)
    with pytest.raises(DataError, match="no such file"):
        prepare_data(DataOptions(source=str(tmp_path / "missing.jsonl")), tokenizer)
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "data.txt").write_text("hello")
        prepare_data(DataOptions(source=str(tmp_path / "data.txt")), tokenizer)
    with pytest.raises(DataError, match="no examples"):
        prepare_data(DataOptions(source=write_jsonl([], name="empty.jsonl")), tokenizer)


@pytest.mark.parametrize("bad, field", [
    (dict(format="yaml"), "format"), (dict(mask="prompt"), "mask"), (dict(truncation="cut"), "truncation"),
    (dict(max_seq_length=1), "max_seq_length"), (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(eval_fraction=0.1, eval_source="x.jsonl"), "eval_source or eval_fraction"), (dict(source=""), "source"),
])
def test_bad_options_are_config_errors(bad, field):
    with pytest.raises(ConfigError, match=field):
        DataOptions(**({"source": "x.jsonl"} | bad))


def test_truncate_and_drop_are_counted(write_jsonl, tokenizer):
    source = write_jsonl(TEXTS)
    lengths = [len(e) for e in prepare_data(DataOptions(source=source), tokenizer).train]
    limit = sorted(lengths)[5]
    longer = sum(n > limit for n in lengths)
    cut = prepare_data(DataOptions(source=source, max_seq_length=limit), tokenizer)
    assert cut.stats.truncated == longer and cut.stats.kept == len(TEXTS) and cut.stats.dropped_too_long == 0
    assert max(len(e) for e in cut.train) == limit
    dropped = prepare_data(DataOptions(source=source, max_seq_length=limit, truncation="drop"), tokenizer)
    assert dropped.stats.dropped_too_long == longer and dropped.stats.kept == len(TEXTS) - longer
    assert all(lengths[e.source_index] <= limit for e in dropped.train)
    stats = dropped.stats.as_dict()
    assert stats["loaded"] == len(TEXTS) and stats["total_tokens"] == sum(len(e) for e in dropped.train)
    assert stats["lengths"]["max"] <= limit
    assert any("dropped" in line for line in dropped.stats.summary_lines())


def test_truncation_that_removes_every_trained_token_drops(write_jsonl, tokenizer):
    records = [{"prompt": "hello world " * 10, "completion": " ok"}, RECORDS[0]]
    data = prepare_data(DataOptions(source=write_jsonl(records), max_seq_length=12), tokenizer)
    # the cut example counts as truncated although it is then dropped (issue 14)
    assert data.stats.dropped_no_trained_tokens == 1 and data.stats.truncated == 1
    assert data.stats.truncated_no_trained_tokens == 1
    assert [e.source_index for e in data.train] == [1]


def test_eval_fraction_is_a_deterministic_disjoint_hold_out(write_jsonl, tokenizer):
    source = write_jsonl(TEXTS)
    first = prepare_data(DataOptions(source=source, eval_fraction=0.3, seed=4), tokenizer)
    again = prepare_data(DataOptions(source=source, eval_fraction=0.3, seed=4), tokenizer)
    other = prepare_data(DataOptions(source=source, eval_fraction=0.3, seed=5), tokenizer)
    train_ids = {e.source_index for e in first.train}
    eval_ids = {e.source_index for e in first.eval}
    assert len(eval_ids) == 3 and not train_ids & eval_ids and len(train_ids | eval_ids) == len(TEXTS)
    assert eval_ids == {e.source_index for e in again.eval}
    assert eval_ids != {e.source_index for e in other.eval}
    assert first.eval_stats.split == "eval" and first.eval_stats.kept == 3


def test_eval_source(write_jsonl, tokenizer):
    data = prepare_data(DataOptions(source=write_jsonl(TEXTS), eval_source=write_jsonl(RECORDS, "eval.jsonl")),
                        tokenizer)
    assert len(data.train) == len(TEXTS) and len(data.eval) == len(RECORDS)
    assert data.eval_stats.format == "prompt_completion" and data.stats.format == "text"


def test_cache_hit_and_invalidation(tmp_path, write_jsonl, tokenizer):
    cache_dir = str(tmp_path / "cache")
    source = write_jsonl(RECORDS)
    options = lambda **kw: DataOptions(source=source, cache_dir=cache_dir, **kw)
    miss = prepare_data(options(), tokenizer)
    assert not miss.stats.cache_hit and len(os.listdir(cache_dir)) == 1
    hit = prepare_data(options(), tokenizer)
    assert hit.stats.cache_hit and ids_of(hit) == ids_of(miss)
    assert hit.stats.as_dict() | {"cache_hit": False} == miss.stats.as_dict()

    assert not prepare_data(options(mask="all"), tokenizer).stats.cache_hit  # options are in the key
    assert not prepare_data(options(max_seq_length=64), tokenizer).stats.cache_hit
    chat = write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
                       "chat.jsonl")
    assert not prepare_data(DataOptions(source=chat, cache_dir=cache_dir), tokenizer).stats.cache_hit
    assert prepare_data(DataOptions(source=chat, cache_dir=cache_dir, chat_template="default"),
                        tokenizer).stats.cache_hit  # "default" is the tokenizer's own template here
    other_template = DataOptions(source=chat, cache_dir=cache_dir, chat_template=DEFAULT_CHAT_TEMPLATE + "\n")
    assert not prepare_data(other_template, tokenizer).stats.cache_hit  # the template is in the key

    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<|new|>"], special_tokens=True)
    assert not prepare_data(options(), changed).stats.cache_hit  # the tokenizer is in the key

    with open(source, "a") as handle:  # the file's content is in the key
        handle.write(json.dumps({"prompt": "more", "completion": " data"}) + "\n")
    changed_file = prepare_data(options(), tokenizer)
    assert not changed_file.stats.cache_hit and len(changed_file.train) == len(RECORDS) + 1
    assert prepare_data(options(), tokenizer).stats.cache_hit


def test_damaged_cache_file_is_rebuilt(tmp_path, write_jsonl, tokenizer):
    cache_dir = tmp_path / "cache"
    source = write_jsonl(RECORDS)
    first = prepare_data(DataOptions(source=source, cache_dir=str(cache_dir)), tokenizer)
    (path,) = cache_dir.iterdir()
    path.write_bytes(b"not a zip file")
    again = prepare_data(DataOptions(source=source, cache_dir=str(cache_dir)), tokenizer)
    assert not again.stats.cache_hit and ids_of(again) == ids_of(first)


def test_directory_cache_follows_file_changes(tmp_path, tokenizer):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    options = DataOptions(source=str(folder), cache_dir=str(tmp_path / "cache"))
    assert not prepare_data(options, tokenizer).stats.cache_hit
    assert prepare_data(options, tokenizer).stats.cache_hit
    (folder / "part-1.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    grown = prepare_data(options, tokenizer)
    assert not grown.stats.cache_hit and grown.stats.loaded == len(RECORDS) + 1


def test_worker_processes_give_identical_examples(write_jsonl, tokenizer):
    records = [{"messages": [{"role": "user", "content": "hello " * (k % 5 + 1)},
                             {"role": "assistant", "content": "world " * (k % 7 + 1)}]} for k in range(600)]
    source = write_jsonl(records)
    serial = prepare_data(DataOptions(source=source), tokenizer)
    spawned = prepare_data(DataOptions(source=source, num_workers=2), tokenizer)  # 600 > 2 chunks of 256
    assert spawned.train == serial.train and spawned.stats == serial.stats
