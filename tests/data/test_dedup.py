"""Issue 25: duplicates and train/eval overlap (fastsft.data.dedup), alone and through a tiny run."""
import json
import os
import random

import pytest

from fastsft.cli import main
from fastsft.config import load_config
from fastsft.data.dedup import REPORT_FILE, Text, find_duplicates, jaccard, normalise, shingles
from fastsft.errors import ConfigError
from fastsft.run_dir import manifest
from fastsft.train import Trainer

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in ("x", "y", "z", "q", "w", "v")]


def sentence(rng, n=30):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def one_word_changed(text, position=12):
    words = text.split()
    words[position] = "changedword"
    return " ".join(words)


def test_normalise_nfkc_casefold_whitespace():
    assert normalise("  Ｈｅｌｌｏ\n\tWORLD  ﬁne ") == "hello world fine"
    assert normalise("Straße") == normalise("STRASSE")
    assert shingles("a b") == {"a b"} and shingles("") == set()
    assert shingles("a b c d") == {"a b c", "b c d"}


def test_planted_duplicates_and_overlap_are_found_and_nothing_else():
    rng = random.Random(0)
    train = [sentence(rng, 60) for _ in range(200)]  # one changed word of 60: Jaccard 55/61 = 0.90
    held = [sentence(rng, 60) for _ in range(30)]
    train.append("  " + train[3].upper().replace(" ", "\n ") + " ")  # 200: exact duplicate of 3 (case, spacing)
    train.append(one_word_changed(train[10]))  # 201: near-duplicate of 10
    train.append(held[5])  # 202: an eval example copied into train
    train.append(one_word_changed(held[7], 20))  # 203: a near copy of an eval example
    items = [Text(normalise(t), f"train {i}") for i, t in enumerate(train)]
    held_items = [Text(normalise(t), f"eval {i}") for i, t in enumerate(held)]
    report = find_duplicates(items, held_items, 0.85)
    found = {(p["scope"], p["kind"], p["duplicate"], p["of"]) for p in report.pairs}
    assert found == {("train", "exact", "train 200", "train 3"), ("train", "near", "train 201", "train 10"),
                     ("train-eval", "exact", "train 202", "eval 5"), ("train-eval", "near", "train 203", "eval 7")}
    near = next(p for p in report.pairs if p["kind"] == "near" and p["scope"] == "train")
    assert near["jaccard"] == pytest.approx(jaccard(shingles(items[201].text), shingles(items[10].text)), abs=1e-4)
    assert 0.85 <= near["jaccard"] < 1
    assert report.drop == {200, 201, 202, 203}
    line = report.summary_line("report", REPORT_FILE)
    assert "1 exact duplicates, 1 near-duplicates (Jaccard >= 0.85)" in line
    assert "train/eval overlap with 30 held-out examples: 1 exact, 1 near" in line and "would remove 4" in line


def test_threshold_is_configurable():
    rng = random.Random(1)
    base = sentence(rng, 40)
    words = base.split()
    for position in (8, 20, 32):  # three changed words: Jaccard about 0.6
        words[position] = f"other{position}"
    items = [Text(normalise(base), "a"), Text(normalise(" ".join(words)), "b")]
    similarity = jaccard(shingles(items[0].text), shingles(items[1].text))
    assert 0.5 < similarity < 0.8
    assert not find_duplicates(items, [], 0.85).pairs
    assert [p["jaccard"] for p in find_duplicates(items, [], 0.5).pairs] == [pytest.approx(similarity, abs=1e-4)]


# ---------------------------------------------------------------- through a run
def _chat(prompt, reply):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def _write(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _planted(tmp_path):
    """train.jsonl: 20 distinct chats + an exact duplicate (line 21 of line 2), a near-duplicate (line 22 of
    line 5: its last word changed, Jaccard 23/25) and a copy of an eval example (line 23); eval.jsonl:
    4 chats."""
    rng = random.Random(2)
    train = [_chat(sentence(rng, 12), sentence(rng, 14)) for _ in range(20)]
    held = [_chat(sentence(rng, 12), sentence(rng, 14)) for _ in range(4)]
    train.append(_chat(train[1]["messages"][0]["content"].upper(), train[1]["messages"][1]["content"]))
    train.append(_chat(train[4]["messages"][0]["content"], one_word_changed(train[4]["messages"][1]["content"], 13)))
    train.append(held[2])
    _write(tmp_path / "train.jsonl", train)
    _write(tmp_path / "eval.jsonl", held)


def _config(tmp_path, extra=""):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"eval_dataset: eval.jsonl\nmax_seq_length: 128\nbatch_tokens: 256\nmax_steps: 1\nprogress_bar: 'off'\n"
        f"mode: lora\nlora_r: 4\noutput_dir: {tmp_path / 'out'}\n{extra}")
    return str(path)


@pytest.mark.usefixtures("reference_ops")
def test_report_writes_the_pairs_and_drop_removes_them(tmp_path, capsys):
    _planted(tmp_path)
    assert main(["train", _config(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "dedup: 23 training examples: 1 exact duplicates, 1 near-duplicates" in err
    assert "train/eval overlap with 4 held-out examples: 1 exact, 0 near" in err and "would remove 3" in err
    out = tmp_path / "out"
    pairs = [json.loads(line) for line in (out / REPORT_FILE).read_text().splitlines()]
    named = {(p["kind"], p["duplicate"].rsplit(" ", 1)[-1], p["of"].rsplit(" ", 1)[-1]) for p in pairs}
    assert named == {("exact", "21", "2"), ("near", "22", "5"), ("exact", "23", "3")}
    assert all(p["duplicate"].startswith("train ") and not p["dropped"] for p in pairs)
    assert REPORT_FILE in manifest(str(out))

    config = load_config(_config(tmp_path, "dedup: drop\noverwrite_output_dir: true\n"))
    trainer = Trainer(config)
    result = trainer.train()
    assert result.status == "completed"
    lines = {e.source_index + 1 for e in trainer.data.train}  # 1-based lines of the records trained on
    assert len(trainer.data.train) == 20 and not lines & {21, 22, 23}
    assert "dropped 3 from the training data (dedup: drop)" in capsys.readouterr().err
    assert all(json.loads(line)["dropped"] for line in (out / REPORT_FILE).read_text().splitlines())


@pytest.mark.usefixtures("reference_ops")
def test_mixture_overlap_with_eval_fraction_and_drop(tmp_path):
    rng = random.Random(3)
    first = [_chat(sentence(rng, 12), sentence(rng, 14)) for _ in range(12)]
    second = [_chat(sentence(rng, 12), sentence(rng, 14)) for _ in range(12)]
    second[7] = first[0]  # the same conversation in both sources
    _write(tmp_path / "a.jsonl", first)
    _write(tmp_path / "b.jsonl", second)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\n"
        f"datasets: [{{path: a.jsonl}}, {{path: b.jsonl, weight: 2}}]\neval_fraction: 0.25\nmax_seq_length: 128\n"
        f"batch_tokens: 256\nmax_steps: 1\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\ndedup: drop\n"
        f"output_dir: {tmp_path / 'out'}\n")
    trainer = Trainer(load_config(str(path)))
    trainer.train()
    pairs = [json.loads(line) for line in (tmp_path / "out" / REPORT_FILE).read_text().splitlines()]
    assert len(pairs) == 1 and pairs[0]["kind"] == "exact"
    # whichever side of the split each copy fell on, the source files and lines are named
    assert {pairs[0]["duplicate"].split(" ", 1)[1], pairs[0]["of"].split(" ", 1)[1]} == \
        {f"{tmp_path / 'a.jsonl'}, line 1", f"{tmp_path / 'b.jsonl'}, line 8"}
    assert sum(trainer.mixture.sizes) == len(trainer.data.train) == 18 - 1  # 9 + 9 kept, minus the copy


@pytest.mark.usefixtures("reference_ops")
def test_inspect_shows_the_summary_and_off_skips_it(tmp_path, capsys):
    _planted(tmp_path)
    assert main(["inspect", _config(tmp_path, "dedup: drop\n"), "--n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "dedup: 23 training examples: 1 exact duplicates, 1 near-duplicates" in out
    assert "training drops 3 (dedup: drop)" in out and "train near (Jaccard" in out
    assert not (tmp_path / "out").exists()
    assert main(["inspect", _config(tmp_path, "dedup: off\n"), "--n", "1", "--no-color"]) == 0
    assert "dedup: off" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    ("dedup: remove\n", "config key 'dedup' in "),
    ("dedup_threshold: 0\n", "'dedup_threshold' must be a Jaccard similarity in (0, 1], got 0.0"),
    ("dedup_threshold: 1.5\n", "'dedup_threshold' must be a Jaccard similarity in (0, 1], got 1.5"),
])
def test_bad_input_exits_2_in_one_line(tmp_path, capsys, extra, message):
    _planted(tmp_path)
    assert main(["train", _config(tmp_path, extra)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_yaml_off_is_off(tmp_path):
    _planted(tmp_path)
    assert load_config(_config(tmp_path, "dedup: off\n")).dedup == "off"
    with pytest.raises(ConfigError, match="not one of report, drop, off"):
        load_config(_config(tmp_path, "dedup: maybe\n"))
