"""Duplicates and train/eval contamination, found before training (issue 25).

Exact duplicates compare normalised text (Unicode NFKC, casefolded, whitespace collapsed); near-duplicates
are found with MinHash LSH (datasketch) over word shingles and confirmed with the exact Jaccard similarity
of the shingle sets, so a reported pair is never an LSH false positive. Within the training data the first
example of a group is kept and each later one is a duplicate; a training example that matches any held-out
example (exact or near) is train/eval overlap. `dedup: drop` removes both kinds from the training side only.

The text compared is the record's own content (message contents, prompt + completion, plain text), not the
rendered template: a template's fixed words (a default system prompt) would make short examples look alike.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Set

from fastsft.errors import DataError

DEDUP_MODES = ("report", "drop", "off")
REPORT_FILE = "dedup_report.jsonl"
# short SFT examples: 3-word shingles (web-scale dedup uses 5+, which leaves a 20-word reply with few shingles)
SHINGLE_WORDS = 3
NUM_PERM = 128  # MinHash permutations: Jaccard estimates within ~0.09 (1 / sqrt(128)); confirmed exactly after
EXCERPT_CHARS = 100


def normalise(text: str) -> str:
    """NFKC, casefold, every whitespace run one space: 'Ｈｅｌｌｏ\\n World' and 'hello world' are one text."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(normalised: str, size: int = SHINGLE_WORDS) -> Set[str]:
    """Word n-grams; a text shorter than n words is one shingle (itself)."""
    words = normalised.split()
    if len(words) <= size:
        return {normalised} if normalised else set()
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: Set[str], b: Set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def sample_text(sample) -> str:
    """The content of one sample (fastsft.data.formats Chat or Plain), without any template."""
    messages = getattr(sample, "messages", None)
    if messages is not None:
        return "\n".join(str(m.get("content") or "") for m in messages)
    return "\n".join(part for part in (sample.prompt, sample.completion) if part)


@dataclass
class Text:
    """One example: its normalised text and where it came from (file:line)."""

    text: str
    where: str


@dataclass
class DedupReport:
    threshold: float
    train_count: int
    eval_count: int
    pairs: List[dict] = field(default_factory=list)
    drop: Set[int] = field(default_factory=set)  # positions in the training list that `drop` removes

    def count(self, scope: str, kind: str) -> int:
        return sum(1 for p in self.pairs if p["scope"] == scope and p["kind"] == kind)

    def summary_line(self, mode: str, report_path: Optional[str] = None, preview: bool = False) -> str:
        """One line; `preview`: nothing was removed yet (fastsft inspect)."""
        line = (f"dedup: {self.train_count:,} training examples: {self.count('train', 'exact')} exact duplicates, "
                f"{self.count('train', 'near')} near-duplicates (Jaccard >= {self.threshold:g})")
        if self.eval_count:
            line += (f"; train/eval overlap with {self.eval_count:,} held-out examples: "
                     f"{self.count('train-eval', 'exact')} exact, {self.count('train-eval', 'near')} near")
        else:
            line += "; no eval split to check for overlap"
        if mode == "drop":
            line += (f"; training drops {len(self.drop)} (dedup: drop)" if preview else
                     f"; dropped {len(self.drop)} from the training data (dedup: drop)")
        elif self.drop:
            line += f"; kept (dedup: drop would remove {len(self.drop)})"
        if self.pairs and report_path:
            line += f"; pairs in {report_path}"
        return line

    def example_lines(self, limit: int = 3) -> List[str]:
        """The first pairs, one line each (fastsft inspect)."""
        lines = []
        for pair in self.pairs[:limit]:
            lines.append(f"  {pair['scope']} {pair['kind']} (Jaccard {pair['jaccard']:.2f}): {pair['duplicate']} ~ "
                         f"{pair['of']}: {pair['excerpt']!r}")
        if len(self.pairs) > limit:
            lines.append(f"  ... {len(self.pairs) - limit} more pairs")
        return lines

    def write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            for pair in self.pairs:
                handle.write(json.dumps(pair, ensure_ascii=False) + "\n")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _minhashes(shingle_sets: Sequence[Set[str]]):
    from datasketch import MinHash

    return MinHash.bulk([[s.encode("utf-8") for s in sorted(sets)] for sets in shingle_sets], num_perm=NUM_PERM)


def _pair(scope: str, kind: str, similarity: float, duplicate: Text, of: Text, dropped: bool) -> dict:
    return {"scope": scope, "kind": kind, "jaccard": round(similarity, 4), "duplicate": duplicate.where,
            "of": of.where, "dropped": dropped, "excerpt": duplicate.text[:EXCERPT_CHARS]}


def find_duplicates(train: Sequence[Text], held_out: Sequence[Text], threshold: float, *,
                    drop: bool = False) -> DedupReport:
    """Exact and near duplicates within `train`, and `train` examples that overlap `held_out`."""
    from datasketch import MinHashLSH

    report = DedupReport(threshold=threshold, train_count=len(train), eval_count=len(held_out))
    shingle_sets = [shingles(t.text) for t in train]
    eval_shingles = [shingles(t.text) for t in held_out]
    first_of: Dict[bytes, int] = {}
    exact = {}  # position -> the earlier position it repeats
    for i, item in enumerate(train):
        key = _digest(item.text)
        if key in first_of:
            exact[i] = first_of[key]
        else:
            first_of[key] = i
    distinct = [i for i in range(len(train)) if i not in exact and shingle_sets[i]]
    hashes = dict(zip(distinct, _minhashes([shingle_sets[i] for i in distinct])))
    near: Dict[int, tuple] = {}
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    for i in distinct:  # each against the earlier ones: the first of a group stays
        best = max(((jaccard(shingle_sets[i], shingle_sets[j]), j) for j in lsh.query(hashes[i])), default=None)
        if best is not None and best[0] >= threshold:
            near[i] = best
        lsh.insert(i, hashes[i])
    for i in range(len(train)):
        if i in exact:
            report.drop.add(i)
            report.pairs.append(_pair("train", "exact", 1.0, train[i], train[exact[i]], drop))
        elif i in near:
            report.drop.add(i)
            report.pairs.append(_pair("train", "near", near[i][0], train[i], train[near[i][1]], drop))
    if held_out:
        held_keys = {}
        for k, item in enumerate(held_out):
            held_keys.setdefault(_digest(item.text), k)
        held_index = [k for k in range(len(held_out)) if eval_shingles[k]]
        held_lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        for k, minhash in zip(held_index, _minhashes([eval_shingles[k] for k in held_index])):
            held_lsh.insert(k, minhash)
        for i, item in enumerate(train):
            k = held_keys.get(_digest(item.text))
            if k is not None:
                report.drop.add(i)
                report.pairs.append(_pair("train-eval", "exact", 1.0, item, held_out[k], drop))
                continue
            if not shingle_sets[i]:
                continue
            minhash = hashes.get(i) or _minhashes([shingle_sets[i]])[0]
            best = max(((jaccard(shingle_sets[i], eval_shingles[k]), k) for k in held_lsh.query(minhash)),
                       default=None)
            if best is not None and best[0] >= threshold:
                report.drop.add(i)
                report.pairs.append(_pair("train-eval", "near", best[0], item, held_out[best[1]], drop))
    return report


# ---------------------------------------------------------------- a run's prepared data -> texts
def _texts(source: str, split: str, fmt: str, text_field: str, indices: Sequence[int], what: str) -> List[Text]:
    from fastsft.data.formats import records_to_samples
    from fastsft.data.load import load_records

    records = load_records(source, split)
    where = getattr(records, "where", lambda i: f"{source}, record {i + 1}")
    _, samples = records_to_samples(records, list(indices), fmt, text_field)
    return [Text(normalise(sample_text(s)), f"{what} {where(i)}") for i, s in zip(indices, samples)]


def run_texts(config, data, mixture=None) -> tuple:
    """(train texts, eval texts), aligned with data.train and data.eval, from the records they came from."""
    split = config.dataset_split
    if not config.datasets:
        options = config.data_options()
        train = _texts(options.source, split, options.format, options.text_field,
                       [e.source_index for e in data.train], "train")
        eval_source = options.eval_source or options.source
        held = _texts(eval_source, split, options.format, options.text_field,
                      [e.source_index for e in data.eval], "eval") if data.eval else []
        return train, held
    from fastsft.data.mix import source_options

    sources = source_options(config)
    train: List[Text] = []
    for options, offset, size in zip(sources, mixture.offsets, mixture.sizes):
        train += _texts(options.source, options.split, options.format, options.text_field,
                        [e.source_index for e in data.train[offset:offset + size]], "train")
    held: List[Text] = []
    if data.eval and config.eval_dataset:
        held = _texts(config.eval_dataset, split, config.dataset_format, config.dataset_text_field,
                      [e.source_index for e in data.eval], "eval")
    elif data.eval:  # each source's held-out part, in source order
        start = 0
        for options, size in zip(sources, mixture.eval_sizes):
            held += _texts(options.source, options.split, options.format, options.text_field,
                           [e.source_index for e in data.eval[start:start + size]], "eval")
            start += size
    return train, held


def check_dedup(config) -> None:
    """Bad dedup config: one line (exit 2) before anything loads."""
    from fastsft.errors import ConfigError

    if config.dedup not in DEDUP_MODES:
        raise ConfigError(f"config key 'dedup': {config.dedup!r} is not one of {', '.join(DEDUP_MODES)}")
    if not 0 < config.dedup_threshold <= 1:
        raise ConfigError(f"config key 'dedup_threshold' must be a Jaccard similarity in (0, 1], "
                          f"got {config.dedup_threshold}")


def dedup_run(config, data, mixture=None) -> Optional[DedupReport]:
    """The report for a run's prepared data (None under dedup: off)."""
    if config.dedup == "off":
        return None
    train, held = run_texts(config, data, mixture)
    return find_duplicates(train, held, config.dedup_threshold, drop=config.dedup == "drop")


def inspect_lines(config, data, mixture=None) -> List[str]:
    """`fastsft inspect`: the summary line the run prints, and the first pairs (nothing is written)."""
    report = dedup_run(config, data, mixture)
    if report is None:
        return ["dedup: off"]
    return [report.summary_line(config.dedup, f"output_dir/{REPORT_FILE} when training", preview=True)] \
        + report.example_lines()


def drop_duplicates(data, mixture, report: DedupReport) -> tuple:
    """(data, mixture) without the training examples the report marks; eval is left as it is."""
    if not report.drop:
        return data, mixture
    kept = [e for i, e in enumerate(data.train) if i not in report.drop]
    if not kept:
        raise DataError(f"dedup: drop removed all {len(data.train)} training examples (each repeats another or "
                        f"overlaps the eval split); see {REPORT_FILE}, or set dedup: report")
    if mixture is not None:
        sizes = [sum(1 for i in range(offset, offset + size) if i not in report.drop)
                 for offset, size in zip(mixture.offsets, mixture.sizes)]
        if 0 in sizes:
            raise DataError(f"dedup: drop removed every example of source {sizes.index(0) + 1} of 'datasets'; "
                            f"set dedup: report to keep them")
        mixture = replace(mixture, sizes=sizes)
    return replace(data, train=kept), mixture


def report_path(output_dir: str) -> str:
    return os.path.join(output_dir, REPORT_FILE)
