"""Issue 25: early stopping and the best checkpoint on the tiny model, with a planted eval curve.

The held-out loss is replaced by a curve indexed by the step (the weights still train for real), so the
step the run stops at and the step of the best model are known in advance.
"""
import json
import os

import pytest
from safetensors.torch import load_file

from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl
from fastsft.errors import ConfigError
from fastsft.train import Trainer, loop
from fastsft.train.checkpoint import list_checkpoints

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py

# step -> planted eval loss: best at step 4, then two evals that do not beat it (patience 2 -> stop at 8)
CURVE = {0: 5.0, 2: 1.0, 4: 0.8, 6: 0.9, 8: 0.85, 10: 0.7, 12: 0.6}


def make_config(tmp_path, **values):
    data = tmp_path / "data"
    if not (data / "train.jsonl").exists():
        train, held_out = make_records(24, 4, seed=1)
        write_jsonl(str(data / "train.jsonl"), train)
        write_jsonl(str(data / "eval.jsonl"), held_out)
    base = dict(model="tiny-llama", model_config=TINY, tokenizer_vocab_size=300, dataset=str(data / "train.jsonl"),
                eval_dataset=str(data / "eval.jsonl"), max_seq_length=64, batch_tokens=128, max_steps=12,
                learning_rate=1e-2, output_dir=str(tmp_path / "out"), progress_bar="off", seed=0, mode="full",
                eval_steps=2)
    base.update(values)
    return load_config(None, **base)


def run(config, monkeypatch, curve=CURVE):
    trainer = Trainer(config)
    monkeypatch.setattr(loop, "evaluate_loss", lambda *a, **k: curve[trainer.global_step])
    return trainer.train()


def records(output_dir, kind):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [r for r in map(json.loads, handle) if r.get("type") == kind]


def test_stops_at_the_expected_step_and_saves_the_best_weights(tmp_path, monkeypatch, capsys):
    config = make_config(tmp_path, early_stopping_patience=2, load_best_model_at_end=True, save_total_limit=1)
    result = run(config, monkeypatch)
    out = config.output_dir
    assert result.global_step == 8 and records(out, "train")[-1]["step"] == 8
    assert [r["step"] for r in records(out, "eval")] == [0, 2, 4, 6, 8]
    err = capsys.readouterr().err
    assert sum("early stopping:" in line for line in err.splitlines()) == 1
    assert "eval_loss has not improved for 2 evals" in err and "best 0.8 at step 4" in err
    # the best checkpoint (step 4) outlives save_total_limit 1; the stop step's checkpoint is the newest
    assert [step for step, _ in list_checkpoints(out)] == [4, 8]
    final = load_file(os.path.join(out, "model.safetensors"))
    best = load_file(os.path.join(out, "checkpoints", "step-4", "model.safetensors"))
    last = load_file(os.path.join(out, "checkpoints", "step-8", "model.safetensors"))
    assert final.keys() == best.keys()
    assert all((final[k] == best[k]).all() for k in final)
    assert any(not (final[k] == last[k]).all() for k in final)  # the weights did move after step 4
    summary = result.summary
    assert summary["best_step"] == 4 and summary["saved_model_step"] == 4 and summary["stopped_early_at"] == 8
    assert summary["eval_loss"] == pytest.approx(0.8)  # the end-of-run values (and gates) are the saved model's
    [marker] = records(out, "best_model")
    assert marker["best_step"] == 4 and marker["metric_for_best_model"] == "eval_loss"


def test_greater_is_better_and_threshold(tmp_path, monkeypatch):
    # a metric where larger is better, improvements of 0.05 or less do not reset the patience
    curve = {0: 0.0, 2: 0.5, 4: 0.54, 6: 0.58, 8: 0.9, 10: 0.95, 12: 0.96}
    config = make_config(tmp_path, early_stopping_patience=2, early_stopping_threshold=0.05,
                         metric_for_best_model="loss", greater_is_better=True)
    result = run(config, monkeypatch, curve)
    assert result.global_step == 6  # 0.54 and 0.58 beat 0.5 by no more than 0.05
    assert result.summary["best_step"] == 6  # ... yet the best model follows every improvement
    assert result.summary["saved_model_step"] == 6


def test_resume_mid_patience_keeps_the_counter(tmp_path, monkeypatch, capsys):
    config = make_config(tmp_path, early_stopping_patience=2, load_best_model_at_end=True, max_steps=6,
                         save_steps=2)
    first = run(config, monkeypatch)
    assert first.global_step == 6 and first.summary["stopped_early_at"] is None  # one eval without improvement
    resumed = make_config(tmp_path, early_stopping_patience=2, load_best_model_at_end=True, max_steps=12,
                          save_steps=2, resume=True)
    result = run(resumed, monkeypatch)
    # a counter restarted at 0 would stop at step 10; the kept one stops at the next eval without improvement
    assert result.global_step == 8 and result.summary["stopped_early_at"] == 8
    assert result.summary["best_step"] == 4 and result.summary["saved_model_step"] == 4
    final = load_file(os.path.join(config.output_dir, "model.safetensors"))
    best = load_file(os.path.join(config.output_dir, "checkpoints", "step-4", "model.safetensors"))
    assert all((final[k] == best[k]).all() for k in final)
    # resuming the stopped run trains nothing more
    capsys.readouterr()
    again = run(make_config(tmp_path, early_stopping_patience=2, load_best_model_at_end=True, max_steps=12,
                            save_steps=2, resume=True), monkeypatch)
    assert again.global_step == 8 and "nothing to train" in capsys.readouterr().err
    assert [r["step"] for r in records(config.output_dir, "best_model")] == [6, 8]  # the first run's end, then 8


@pytest.mark.parametrize("values, message", [
    (dict(early_stopping_patience=0), "'early_stopping_patience' must be a positive integer"),
    (dict(early_stopping_patience=-1), "'early_stopping_patience' must be a positive integer"),
    (dict(early_stopping_threshold=-0.1), "'early_stopping_threshold' must be >= 0"),
    (dict(metric_for_best_model="accuracy"), "unknown metric 'accuracy'; known: exact_match, loss"),
    (dict(metric_for_best_model="exact_match"), "measured only with eval_exact_match: true"),
    (dict(load_best_model_at_end=True, eval_dataset=None), "'load_best_model_at_end' needs an eval split"),
    (dict(early_stopping_patience=3, eval_steps=0), "needs evaluations during training"),
    (dict(early_stopping_patience=3, eval_strategy="no"), "needs evaluations during training"),
])
def test_bad_input_is_one_line(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_config(tmp_path, **values)
    assert "\n" not in str(info.value)


def test_no_tracking_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    config = make_config(tmp_path, max_steps=4)
    result = run(config, monkeypatch)
    assert result.global_step == 4 and "best_step" not in result.summary
    assert load_config(None, model="tiny-llama", dataset="x.jsonl").early_stopping_patience is None


def test_cli_bad_input_exits_2_before_anything_is_written(tmp_path, capsys):
    from fastsft.cli import main

    make_config(tmp_path)  # writes the data
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny-llama\ndataset: {tmp_path / 'data' / 'train.jsonl'}\neval_fraction: 0.2\n"
                      f"eval_steps: 2\nmetric_for_best_model: bleu\noutput_dir: {tmp_path / 'cli'}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fastsft train: config error: config key 'metric_for_best_model': unknown metric 'bleu'; "
                   "known: exact_match, loss")
    assert not (tmp_path / "cli").exists()
    assert main(["train", str(config), "--metric_for_best_model", "loss", "--early_stopping_patience", "0"]) == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_best_model_rule_nan_and_state():
    from fastsft.early_stopping import BestModel

    best = BestModel("eval_loss", greater=False, threshold=0.0, patience=2)
    assert not best.update(0, 0.1, {"eval_loss": 0.1})  # step 0: the baseline is never the best
    assert best.update(2, 1.0, {"eval_loss": 1.0}) and best.best_step == 2
    assert not best.update(4, float("nan"), {"eval_loss": float("nan")})  # never an improvement
    assert best.evals_without_improvement == 1 and not best.should_stop()
    assert best.update(6, 0.5, {"eval_loss": 0.5, "eval_exact_match": 0.25})
    assert best.best_record == {"eval_loss": 0.5, "eval_exact_match": 0.25} and best.evals_without_improvement == 0
    resumed = BestModel("eval_loss", greater=False, patience=2)
    resumed.load_state(best.state())
    assert (resumed.best_step, resumed.best_value, resumed.evals) == (6, 0.5, 3)
    other = BestModel("eval_exact_match", greater=True, patience=2)
    other.load_state(best.state())  # another metric (--resume_changed_config): tracking starts afresh
    assert other.best_step is None and other.evals == 0


def test_metrics_from_eval_metrics_and_the_probe_are_known(tmp_path):
    """metric_for_best_model may name any eval_metrics entry or the forgetting probe; lower forgetting is better."""
    from fastsft import early_stopping

    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"text": "general text for the probe"}) + "\n")
    config = make_config(tmp_path, eval_metrics=["contains", {"regex": "^a", "name": "starts_a"}],
                         forgetting_dataset=str(probe), metric_for_best_model="starts_a")
    known = early_stopping.known_metrics(config)
    assert {"eval_contains", "eval_starts_a", "eval_forgetting", "eval_exact_match"} <= set(known)
    assert early_stopping.greater_is_better(config)
    config = make_config(tmp_path, eval_metrics=["exact_match"], metric_for_best_model="exact_match")
    assert early_stopping.metric_name(config) == "eval_exact_match"  # listed in eval_metrics: no flag needed
    config = make_config(tmp_path, forgetting_dataset=str(probe), metric_for_best_model="forgetting")
    assert not early_stopping.greater_is_better(config)
