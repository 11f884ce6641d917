"""Batch planning (shuffle, best-fit-decreasing packing, splitting) and collate."""
import random

import pytest
import torch

from fastsft.data import DocPiece, Example, collate, packing_efficiency, plan_batches, take


def random_lengths(n, low=1, high=300, seed=0):
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def make_examples(lengths, seed=0):
    rng = random.Random(seed)
    examples = []
    for k, n in enumerate(lengths):
        ids = [rng.randint(3, 400) for _ in range(n)]
        labels = [t if rng.random() < 0.6 else -100 for t in ids]
        examples.append(Example(ids, labels, source_index=100 + k))
    return examples


def test_packing_bins_within_budget_every_example_once():
    lengths = random_lengths(503, seed=1)
    batches = plan_batches(lengths, batch_tokens=1024, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in batches)
    efficiency = packing_efficiency(lengths, batches, 1024)
    lower_bound = sum(lengths) / 1024
    assert len(batches) <= int(lower_bound) + 2  # BFD is near-optimal for many small items
    assert efficiency == pytest.approx(sum(lengths) / (1024 * len(batches)))
    assert efficiency > 0.97


def test_best_fit_decreasing_fills_bins_exactly_when_possible():
    lengths = [6, 4, 5, 5, 3, 7]
    batches = plan_batches(lengths, batch_tokens=10, seed=0, epoch=0)
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[3, 7], [4, 6], [5, 5]]
    assert packing_efficiency(lengths, batches, 10) == 1.0


def test_shuffle_is_deterministic_per_seed_and_epoch():
    lengths = random_lengths(200, seed=2)
    plan = lambda seed, epoch: plan_batches(lengths, batch_tokens=700, seed=seed, epoch=epoch)
    assert plan(5, 1) == plan(5, 1)
    assert plan(5, 1) != plan(5, 2)
    assert plan(5, 1) != plan(6, 1)
    padded = lambda seed, epoch: plan_batches(lengths, batch_tokens=700, packing=False, batch_size=4,
                                              seed=seed, epoch=epoch)
    assert padded(0, 0) == padded(0, 0) != padded(0, 1)


def test_documents_longer_than_budget_are_an_error_unless_split():
    lengths = [50, 120, 30]
    with pytest.raises(ValueError, match=r"example 1 has 120 tokens, more than batch_tokens=100"):
        plan_batches(lengths, batch_tokens=100, seed=0, epoch=0)
    batches = plan_batches(lengths, batch_tokens=100, seed=0, epoch=0, split_documents=True)
    assert all(isinstance(e, DocPiece) for b in batches for e in b)
    assert [sum(p.stop - p.start for p in b) for b in batches] == [100, 100]
    for index, n in enumerate(lengths):  # every document covered exactly once, in order
        pieces = [p for b in batches for p in b if p.index == index]
        assert pieces[0].start == 0 and pieces[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    examples = make_examples(lengths)
    sliced = take(examples, batches[0])
    assert sum(len(e) for e in sliced) == 100
    first = batches[0][0]
    assert sliced[0].input_ids == examples[first.index].input_ids[first.start:first.stop]


def test_padded_groups_of_batch_size():
    lengths = random_lengths(23, seed=4)
    batches = plan_batches(lengths, batch_tokens=4096, packing=False, batch_size=5, seed=0, epoch=0)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(i for b in batches for i in b) == list(range(23))
    used = sum(lengths)
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert packing_efficiency(lengths, batches, 4096, packing=False) == pytest.approx(used / slots)


@pytest.mark.parametrize("bad", [dict(batch_tokens=0), dict(batch_size=0), dict(batch_tokens=2.5)])
def test_plan_rejects_bad_arguments(bad):
    kwargs = dict(batch_tokens=64, batch_size=1, seed=0, epoch=0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        plan_batches([3, 4], **kwargs)


def test_packed_collate_positions_cu_seqlens_and_first_labels():
    examples = make_examples([5, 1, 7, 3], seed=7)
    batch = collate(examples, packing=True, pad_token_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == sum((e.input_ids for e in examples), [])
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0, 5, 6, 13, 16]
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    expected = sum(([-100] + e.labels[1:] for e in examples), [])
    assert batch["labels"][0].tolist() == expected
    assert batch["num_trained_tokens"] == sum(label != -100 for label in expected)
    assert batch["num_trained_tokens"] == sum(e.num_trained_tokens for e in examples)


def test_packed_collate_pads_with_an_untrained_document():
    examples = make_examples([5, 6], seed=8)
    batch = collate(examples, packing=True, pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["input_ids"][0, 11:].tolist() == [0] * 5
    assert batch["labels"][0, 11:].tolist() == [-100] * 5
    assert batch["position_ids"][0, 11:].tolist() == [0, 1, 2, 3, 4]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 11, 16]
    assert batch["num_trained_tokens"] == sum(e.num_trained_tokens for e in examples)


def test_padded_collate():
    examples = make_examples([4, 9, 2], seed=9)
    batch = collate(examples, packing=False, pad_token_id=1, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 12)
    for row, e in enumerate(examples):
        n = len(e)
        assert batch["input_ids"][row].tolist() == e.input_ids + [1] * (12 - n)
        assert batch["labels"][row].tolist() == e.labels + [-100] * (12 - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (12 - n)
    assert batch["num_trained_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert "position_ids" not in batch and "cu_seq_lens_q" not in batch


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one example"):
        collate([], packing=True, pad_token_id=0)
    with pytest.raises(ValueError, match=r"example 0 \(source index 7\) has 2 input ids and 1 labels"):
        collate([Example([5, 6], [5], 7)], packing=True, pad_token_id=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate(make_examples([3]), packing=False, pad_token_id=0, pad_to_multiple_of=0)


def test_prepared_data_through_plan_and_collate(write_jsonl, tokenizer):
    from fastsft.data import DataOptions, inspect_report, prepare_data

    records = [{"messages": [{"role": "user", "content": "hello " * (k % 7 + 1)},
                             {"role": "assistant", "content": "world " * (k % 5 + 1)}]} for k in range(29)]
    data = prepare_data(DataOptions(source=write_jsonl(records)), tokenizer)
    lengths = [len(e) for e in data.train]
    batches = plan_batches(lengths, batch_tokens=96, seed=1, epoch=0)
    trained = 0
    for batch in batches:
        inputs = collate(take(data.train, batch), packing=True, pad_token_id=tokenizer.pad_token_id,
                         pad_to_multiple_of=8)
        assert inputs["input_ids"].shape[1] % 8 == 0 and inputs["input_ids"].shape[1] <= 96
        trained += inputs["num_trained_tokens"]
    assert trained == data.stats.trained_tokens  # the first label of a chat is never trained anyway
    report = inspect_report(data, tokenizer, num_examples=2, color=False, batch_tokens=96, seed=1)
    efficiency = packing_efficiency(lengths, batches, 96)
    assert f"efficiency {100 * efficiency:.1f}%" in report
    assert report.count("--- example") == 2 and "[[world" in report
    assert "train: 29 examples kept of 29 loaded (format messages)" in report


def test_inspect_report_for_padded_batches(write_jsonl, tokenizer):
    from fastsft.data import DataOptions, inspect_report, prepare_data

    data = prepare_data(DataOptions(source=write_jsonl([{"text": "hello " * k} for k in range(1, 8)])), tokenizer)
    report = inspect_report(data, tokenizer, num_examples=1, color=True, batch_tokens=1024, packing=False,
                            batch_size=3)
    lengths = [len(e) for e in data.train]
    batches = plan_batches(lengths, batch_tokens=1024, packing=False, batch_size=3, seed=0, epoch=0)
    share = 100 * packing_efficiency(lengths, batches, 1024, packing=False)
    assert f"padded batches: 3 of 3 examples, {share:.1f}% of the padded tokens are real" in report
    assert "\x1b[1;32m" in report
