"""Several datasets: per-source format, mask and text field; mixing by weight, deterministic per
(seed, epoch), so a resumed data stream continues exactly."""
import json


from fastsft.config import load_config
from fastsft.data import IGNORE_INDEX
from fastsft.data.mix import Mixture, prepare_mixture


def test_weights_give_counts_and_the_choice_depends_only_on_seed_and_epoch():
    mixture = Mixture(sizes=[10, 4, 6], weights=[0.5, 2.0, 1.0], seed=3)
    assert mixture.per_epoch() == [5, 8, 6]
    first = mixture.epoch_indices(0)
    assert len(first) == 19
    assert sorted(i for i in first if 10 <= i < 14) == [10, 10, 11, 11, 12, 12, 13, 13]  # weight 2: twice each
    assert sorted(i for i in first if i >= 14) == list(range(14, 20))  # weight 1: every example once
    half = [i for i in first if i < 10]
    assert len(set(half)) == 5  # weight 0.5: half, without repeats
    assert Mixture([10, 4, 6], [0.5, 2.0, 1.0], seed=3).epoch_indices(0) == first  # deterministic
    assert mixture.epoch_indices(1) != first  # a fresh sample each epoch
    assert Mixture([10, 4, 6], [0.5, 2.0, 1.0], seed=4).epoch_indices(0) != first


def test_sources_keep_their_own_format_mask_and_text_field(tmp_path, tokenizer):
    chats = [{"messages": [{"role": "user", "content": f"hello {k}"}, {"role": "assistant", "content": "world"}]}
             for k in range(4)]
    texts = [{"body": "The quick brown fox " * (k + 1)} for k in range(3)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: tiny-llama\nchat_template: default\ndatasets:\n"
        "  - {path: chat.jsonl, mask: all, weight: 0.5}\n"
        "  - {path: text.jsonl, format: text, text_field: body, weight: 2}\n")
    config = load_config(str(config_file))
    data, mixture = prepare_mixture(config, tokenizer)
    assert mixture.sizes == [4, 3] and mixture.per_epoch() == [2, 6]
    assert data.stats.format == "messages,text" and data.stats.loaded == 7 and len(data.train) == 7
    chat, text = data.train[0], data.train[4]
    assert all(label != IGNORE_INDEX for label in chat.labels[1:])  # mask: all, for this source only
    assert tokenizer.decode(text.input_ids).strip().startswith("The quick brown fox")


def test_a_resumed_stream_continues_the_mixture_exactly():
    from fastsft.train.loop import DataStream

    config = load_config(None, model="tiny-llama", datasets=[{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 0.5}],
                         batch_tokens=64, max_seq_length=32)
    lengths = [5 + (k * 7) % 20 for k in range(30)]
    mixture = Mixture([20, 10], [1.0, 0.5], seed=0)
    straight = DataStream(lengths, config, epochs_limit=None, mixture=mixture)
    windows = [straight.next_window(2) for _ in range(12)]  # several epochs
    resumed = DataStream(lengths, config, epochs_limit=None, mixture=mixture)
    first = [resumed.next_window(2) for _ in range(5)]
    position = (resumed.epoch, resumed.index)
    again = DataStream(lengths, config, epochs_limit=None, mixture=mixture)
    again.epoch, again.index = position  # what a checkpoint restores
    assert first + [again.next_window(2) for _ in range(7)] == windows
    seen = {i for window in windows for batch in window for i in batch}
    assert seen <= set(range(30)) and any(i >= 20 for i in seen)
