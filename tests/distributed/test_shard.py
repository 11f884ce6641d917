"""Per-rank shares of an accumulation window, in-process (no process group needed)."""
import pytest
import torch

from fastsft.data import collate
from fastsft.data.example import Example
from fastsft.distributed import SingleProcess
from fastsft.distributed.checkpoint import check_world_size
from fastsft.distributed.launch import parse_nproc
from fastsft.distributed.shard import check_enough_batches, local_batches, rank_share
from fastsft.errors import ConfigError

EXAMPLES = [Example([3 + i, 4 + i, 5 + i, 6], [-100, 4 + i, 5 + i, 6], i) for i in range(7)]


def _collate(indices):
    return collate([EXAMPLES[i] for i in indices], packing=True, pad_token_id=0)


@pytest.mark.parametrize("world", [2, 3])
def test_shares_are_disjoint_and_cover_the_window(world):
    window = [[0, 1], [2], [3, 4], [5], [6]]
    shares = [rank_share(window, r, world) for r in range(world)]
    flat = [tuple(b) for share in shares for b in share]
    assert sorted(flat) == sorted(tuple(b) for b in window) and len(set(flat)) == len(window)
    assert shares[0][0] == window[0] and shares[1][0] == window[1]  # strided: r, r + N, ...


def test_short_window_pads_with_untrained_copies_so_ranks_stay_in_lockstep():
    window = [[0, 1], [2, 3], [4]]  # 3 micro-batches on 2 ranks: rank 1 runs one filler
    rank0, fillers0 = local_batches(window, _collate, 0, 2)
    rank1, fillers1 = local_batches(window, _collate, 1, 2)
    assert len(rank0) == len(rank1) == 2 and fillers0 == [] and len(fillers1) == 1
    filler = fillers1[0]
    assert filler["num_trained_tokens"] == 0 and bool((filler["labels"] == -100).all())
    assert torch.equal(filler["input_ids"], rank1[0]["input_ids"])
    assert rank1[0]["num_trained_tokens"] > 0  # the copied batch itself is untouched
    # a window smaller than the world: the rank with no share runs a filler of the window's first batch
    alone, fillers = local_batches([[5]], _collate, 1, 2)
    assert len(alone) == 1 and fillers == alone and alone[0]["num_trained_tokens"] == 0


def test_single_process_behaviour_is_unchanged():
    single = SingleProcess()
    batches = single.local_batches([[0], [1, 2]], _collate)
    tokens, trained = single.window_counts(batches)
    assert tokens == 12 and trained == sum(b["num_trained_tokens"] for b in batches) == 9


def test_clear_errors():
    with pytest.raises(ConfigError, match="4 processes need at least 4 micro-batches.*packs into 3"):
        check_enough_batches(3, 4, "data.jsonl")
    check_enough_batches(4, 4, "data.jsonl")
    for bad in ("two", "0", "-1"):
        with pytest.raises(ConfigError, match="--nproc expects a positive integer"):
            parse_nproc(bad)
    assert parse_nproc("3") == 3 and parse_nproc(None) is None


def test_resume_refuses_another_world_size(tmp_path):
    (tmp_path / "distributed.json").write_text('{"world_size": 4, "strategy": "fsdp"}')
    with pytest.raises(ConfigError, match="written by 4 processes and this run has 2.*--nproc 4"):
        check_world_size(str(tmp_path), 2)
    check_world_size(str(tmp_path), 4)
    single = tmp_path / "single"
    single.mkdir()
    with pytest.raises(ConfigError, match="written by 1 process and this run has 2.*one process"):
        check_world_size(str(single), 2)
