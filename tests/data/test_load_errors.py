"""Data mistakes answered in one line naming the file and the 1-based line (or the byte offset), before
any tokenizer or model is loaded; unknown roles; dataset_text_field; hub names that cannot be fetched."""
import json
import time

import pytest

from fastsft.data.check import Source, check_source
from fastsft.data.formats import KNOWN_ROLES, records_to_samples
from fastsft.data.load import load_records
from fastsft.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def source(path, fmt="auto", text_field="text"):
    return Source("dataset", str(path), "train", fmt, text_field)


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_non_utf8_jsonl_names_line_and_byte_offset(tmp_path):
    good = json.dumps(GOOD).encode()
    bad = json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("utf-8").replace("é".encode(), b"\xe9")  # latin-1 byte
    path = write_lines(tmp_path / "d.jsonl", [good, good, bad])
    offset = 2 * (len(good) + 1) + bad.index(b"\xe9")
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert str(info.value).startswith(f"{path}, line 3: not UTF-8 text (byte offset {offset}:")
    assert "0xe9" in str(info.value)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"empty\.jsonl: no examples \(the file is empty\)"),
    ("blank.jsonl", b"\n\n", r"blank\.jsonl: no examples"),
    ("empty.csv", b"", r"empty\.csv: no examples \(the file is empty\)"),
    ("header.csv", b"prompt,completion\n", r"header\.csv: no examples \(only a header line\)"),
    ("latin.csv", b"prompt,completion\ncaf\xe9,x\n", r"latin\.csv: not UTF-8 text \(byte offset 21:"),
    ("latin.json", b'[{"text": "caf\xe9"}]', r"latin\.json: not UTF-8 text \(byte offset 14:"),
    ("empty.json", b"", r"empty\.json: no examples"),
    ("bad.json", b'[{"text": "a"}, 3]', r"bad\.json, record 2: expected a JSON object"),
])
def test_empty_and_undecodable_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_records(str(tmp_path / name))


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p"}, r"d\.jsonl, line 4: missing field 'completion' \(format 'prompt_completion'\)"),
    ({"messages": [{"role": "bot", "content": "x"}]},
     r"d\.jsonl, line 4: field 'messages\[0\]\.role' is 'bot', expected one of system, developer, user, assistant"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"d\.jsonl, line 4: field 'conversations\[0\]\.from' is 'bot'"),
])
def test_record_errors_name_file_and_line(tmp_path, record, message):
    first = {"prompt": "a", "completion": "b"} if "prompt" in record else GOOD
    path = tmp_path / "d.jsonl"
    # a blank line: line numbers are the file's, not the record count
    path.write_text(json.dumps(first) + "\n\n" + json.dumps(first) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        check_source(source(path))


def test_known_roles_are_accepted():
    records = [{"messages": [{"role": role, "content": "x"} for role in KNOWN_ROLES]}]
    fmt, samples = records_to_samples(records, [0])
    assert fmt == "messages" and [m["role"] for m in samples[0].messages] == list(KNOWN_ROLES)


def test_dataset_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match="cannot detect the format"):
        check_source(source(path))
    assert check_source(source(path, text_field="body")) == 1
    fmt, samples = records_to_samples(load_records(str(path)), [0], "auto", "body")
    assert fmt == "text" and samples[0].completion == "hello"
    with pytest.raises(DataError, match=r"line 1: missing field 'content'"):
        check_source(source(path, fmt="text", text_field="content"))


@pytest.mark.parametrize("name, env, message", [
    ("data/train", {}, r"'data/train': no such file or directory"),  # data/ is a folder here: a local path
    ("a/b/c", {}, r"'a/b/c': no such file or directory"),
    ("train_split", {"HF_HUB_OFFLINE": "1"}, r"'train_split' is not a local path and not in the hub cache, and "
                                             r"HF_HUB_OFFLINE=1 forbids downloading it"),
    ("someone/data", {"HF_ENDPOINT": "http://127.0.0.1:9"}, r"the hub \(http://127\.0\.0\.1:9\) cannot be reached"),
])
def test_names_that_are_not_files_fail_at_once(tmp_path, monkeypatch, name, env, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.perf_counter()
    with pytest.raises(DataError, match=message):
        check_source(source(name))
    assert time.perf_counter() - started < 1.0
