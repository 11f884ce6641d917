"""Load raw records (a list of dicts) from files, directories or `datasets` names.

JSONL is parsed here line by line, so a malformed line is reported with its file
and line number; JSON is parsed here too. Parquet, CSV, directories and dataset
names go through the `datasets` library. A file is one split; `split` selects
the split of a directory, a named dataset, or a JSON object of lists per split.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from fastsft.errors import DataError

DATASETS_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
JSON_SUFFIXES = (".jsonl", ".json")
_FILE_SUFFIXES = JSON_SUFFIXES + tuple(DATASETS_FILE_BUILDERS)
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# the data files `datasets` reads from a plain folder (a folder of other files would be read as text)
_DIRECTORY_DATA_SUFFIXES = _FILE_SUFFIXES + (".arrow", ".jsonl.gz", ".json.gz", ".csv.gz")
# a record larger than this is skipped before tokenising: tokenising 20 MB took 6.9 GB and 71 s, for a
# sample that max_seq_length cuts to a few KB anyway
MAX_RECORD_BYTES = 2 * 2**20


class Records(list):
    """The records of one source, with where each came from (1-based lines for JSON lines)."""

    def __init__(self, items=(), source: str = "", lines: Optional[list] = None):
        super().__init__(items)
        self.source = source
        self.lines = lines
        self.oversized: list = []  # (where, bytes) of records skipped as larger than MAX_RECORD_BYTES

    def place(self, index: int) -> str:
        """'line N' (JSON lines) or 'record N' (1-based), without the source."""
        if self.lines is not None and index < len(self.lines):
            return f"line {self.lines[index]}"
        return f"record {index + 1}"

    def where(self, index: int) -> str:
        """'file, line N' (JSON lines) or 'source, record N' (1-based) for the record at `index`."""
        if self.lines is not None and index < len(self.lines):
            return f"{self.source}, line {self.lines[index]}"
        return f"{self.source}, record {index + 1}"


_recent: dict = {}  # the last files read: the CLI's early check and prepare_data read each once
_RECENT_FILES = 4  # a run's train and eval files (several datasets: the last few)


def load_records(source: str, split: str = "train") -> Records:
    """Every record of `source` as a plain dict, in file order."""
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        stat = os.stat(source)
        key = (os.path.abspath(source), split, stat.st_mtime_ns, stat.st_size)
        if key not in _recent:
            records = _load_file(source, split)
            if not records:
                raise DataError(f"{source}: no examples (the file is empty)")
            while len(_recent) >= _RECENT_FILES:
                _recent.pop(next(iter(_recent)))
            _recent[key] = records
        return _recent[key]
    if os.path.isdir(source):
        return _drop_oversized(_nonempty(Records(_to_records(_load_directory(source, split), source), source), source))
    if source.lower().endswith(_FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~")):
        raise DataError(f"{source}: no such file or directory")
    from fastsft.sources import check_data_source

    check_data_source(source, key=source)  # not a hub name, or offline: fails here at once
    return _nonempty(Records(_to_records(_load_with_datasets(
        source, lambda: _datasets().load_dataset(source, split=split)), source), source), source)


def _nonempty(records: Records, source: str) -> Records:
    if not records:
        raise DataError(f"{source}: no examples")
    return records


def _load_file(source: str, split: str) -> Records:
    lower = source.lower()
    if lower.endswith(".jsonl"):
        return _read_jsonl(source)
    if lower.endswith(".json"):
        return _read_json(source, split)
    for suffix, builder in DATASETS_FILE_BUILDERS.items():
        if lower.endswith(suffix):
            if builder == "csv":
                _check_text_file(source)  # datasets' own message for these says only "an error occurred"
            return _drop_oversized(Records(_to_records(_load_with_datasets(source, lambda: _datasets().load_dataset(
                builder, data_files=source, split="train")), source), source))
    raise DataError(f"{source}: unsupported file type (expected .jsonl, .json, .parquet or .csv)")


def _decode(data: bytes, path: str, offset: int = 0, line: Optional[int] = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        where = f", line {line}" if line is not None else ""
        raise DataError(
            f"{path}{where}: not UTF-8 text (byte offset {offset + error.start}: {error.reason}, "
            f"byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


def _check_text_file(path: str) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.strip():
        raise DataError(f"{path}: no examples (the file is empty)")
    text = _decode(data, path)
    if len(text.strip().splitlines()) < 2:
        raise DataError(f"{path}: no examples (only a header line)")


def source_fingerprint(source: str, split: str = "train") -> Optional[str]:
    """A hash of the source's content, or None when only loading it can tell (hub names)."""
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        return "file:" + _hash_files([source], os.path.dirname(source))
    if os.path.isdir(source):
        files = []
        for root, dirs, names in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        return f"dir:{split}:" + _hash_files(files, source)
    return None


def _hash_files(paths: list[str], root: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _read_jsonl(path: str) -> Records:
    records = Records(source=path, lines=[])
    offset = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, offset, line_number)
            offset += len(raw)
            if not line.strip():
                continue
            if len(raw) > MAX_RECORD_BYTES:  # skipped unparsed: memory stays bounded
                records.oversized.append((f"line {line_number}", len(raw)))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {line_number}: malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
            records.lines.append(line_number)
    return records


def _read_json(path: str, split: str = "train") -> Records:
    with open(path, "rb") as handle:
        text = _decode(handle.read(), path)
    if not text.strip():
        raise DataError(f"{path}: no examples (the file is empty)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path)  # JSON lines saved with a .json suffix
        raise DataError(f"{path}, line {error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if isinstance(data.get(split), list):
            lists = [split]  # {"train": [...], "test": [...]}: the split's list
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON list of examples, or an object with exactly one list "
                f"of examples or a list named after the split {split!r}, found list fields {lists}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {index + 1}: expected a JSON object, got {type(record).__name__}")
    return _drop_oversized(Records(data, path))


def _size(value) -> int:
    """Roughly the bytes a record's text takes (its strings' lengths)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 8


def _drop_oversized(records: Records) -> Records:
    """Records loaded whole (JSON, parquet, csv, datasets) over MAX_RECORD_BYTES are skipped before tokenising."""
    sizes = [_size(r) for r in records]
    if all(size <= MAX_RECORD_BYTES for size in sizes):
        return records
    kept = Records(source=records.source, lines=[] if records.lines is not None else None)
    kept.oversized = list(records.oversized)
    for index, (record, size) in enumerate(zip(records, sizes)):
        if size > MAX_RECORD_BYTES:
            kept.oversized.append((records.place(index), size))
            continue
        kept.append(record)
        if kept.lines is not None:
            kept.lines.append(records.lines[index])
    if not kept:
        raise DataError(f"{records.source}: every record is larger than {MAX_RECORD_BYTES // 2**20} MB "
                        f"(first: {kept.oversized[0][0]}); no examples left")
    return kept


def _check_directory_has_data(path: str) -> None:
    """A folder of notes or images would be read by `datasets` as plain text lines: refuse it."""
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(root, n), path) for n in names if not n.startswith(".")]
    if any(name.lower().endswith(_DIRECTORY_DATA_SUFFIXES) for name in found):
        return
    listed = ", ".join(sorted(found)[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise DataError(f"{path}: the folder holds no data file (.jsonl, .json, .parquet, .csv or .arrow)"
                    + (f"; found {listed}" if found else "; it is empty"))


def _load_directory(path: str, split: str):
    if not any(os.path.exists(os.path.join(path, marker)) for marker in _SAVED_DATASET_MARKERS):
        _check_directory_has_data(path)
    datasets = _datasets()
    if any(os.path.exists(os.path.join(path, marker)) for marker in _SAVED_DATASET_MARKERS):
        loaded = _load_with_datasets(path, lambda: datasets.load_from_disk(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    return _load_with_datasets(path, lambda: datasets.load_dataset(path, split=split))


def _load_with_datasets(source: str, load):
    try:
        return load()
    except DataError:
        raise
    except Exception as error:  # datasets raises many types; the user needs the message
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{source}: cannot load with `datasets`: {message}") from None


def _to_records(dataset, source: str) -> list[dict]:
    if hasattr(dataset, "to_list"):
        return dataset.to_list()
    raise DataError(f"{source}: loaded a {type(dataset).__name__}, expected a datasets.Dataset")


def records_fingerprint(records: list[dict]) -> str:
    """A hash of loaded records, for sources without files to hash (dataset names)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return "records:" + digest.hexdigest()


def _datasets():
    import datasets

    return datasets
