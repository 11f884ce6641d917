"""A finished run is never lost: reruns are refused without --overwrite / --resume, a failing rerun leaves
every file as it was, resume is honest (changed keys refused or honoured), a run folder resumes from its
newest checkpoint, a finished run resumed writes no second eval; tensorboard events match metrics.jsonl."""
import hashlib
import io
import json
import os
import shutil
import stat

import pytest

from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl
from fastsft.errors import ConfigError, DataError
from fastsft.train import Trainer
from fastsft.train.metrics import summary_lines

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


def make_config(root, data_root=None, **values):
    data = (data_root or root) / "data"
    if not (data / "train.jsonl").exists():
        train, held_out = make_records(24, 4, seed=1)
        write_jsonl(str(data / "train.jsonl"), train)
        write_jsonl(str(data / "eval.jsonl"), held_out)
    base = dict(model="tiny-llama", model_config=TINY, tokenizer_vocab_size=300, dataset=str(data / "train.jsonl"),
                eval_dataset=str(data / "eval.jsonl"), max_seq_length=64, batch_tokens=128, max_steps=3,
                save_steps=3, learning_rate=1e-2, lr_scheduler="linear", output_dir=str(root / "out"),
                progress_bar="off", mode="lora", lora_r=4, eval_at_start=False, report_to="tensorboard",
                cpu_ops="patched")  # runs compared bit for bit: no per-run timing choice of ops
    base.update(values)
    return load_config(None, **base)


def snapshot(folder):
    """Every file under folder -> (sha256, mode)."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = (hashlib.sha256(handle.read()).hexdigest(),
                                                        stat.S_IMODE(os.stat(path).st_mode))
    return found


def records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished LoRA run (3 steps, a checkpoint at step 3, eval at the end only) and its files."""
    global DATA
    root = DATA = tmp_path_factory.mktemp("finished")
    config = make_config(root)
    log = io.StringIO()
    result = Trainer(config, stream=log).train()
    return root, config, result, log.getvalue(), snapshot(config.output_dir)


DATA = None  # set by the `finished` fixture: every copy of the run reads the data the run was trained on


def copy_run(finished, tmp_path):
    root, _, _, _, files = finished
    shutil.copytree(root / "out", tmp_path / "out")  # the data stays where the run read it
    # the adapter names its base by absolute path: point the copy at its own base_model
    adapter = tmp_path / "out" / "adapter_config.json"
    adapter.write_text(adapter.read_text().replace(str(root / "out"), str(tmp_path / "out")))
    return snapshot(tmp_path / "out")


def test_finished_run_layout_summary_and_modes(finished):
    _, config, result, log, files = finished
    assert result.status == "completed" and result.global_step == 3
    evals = [r for r in records(config.output_dir) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3]
    assert "eval_loss_start" not in result.summary  # eval_at_start: false -> no start eval in the summary
    assert not any("(start)" in line for line in summary_lines(result.summary)) and "(start)" not in log
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter_model.safetensors", "base_model/model.safetensors",
                 "checkpoints/step-3/adapter_model.safetensors"):
        assert files[name][1] == 0o666 & ~mask, name  # the umask's mode, not safetensors' private 0600
    with open(os.path.join(config.output_dir, "adapter_config.json")) as handle:
        assert json.load(handle)["base_model_name_or_path"] == os.path.join(config.output_dir, "base_model")


def test_tensorboard_events_hold_the_metrics(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, config, _, _, _ = finished
    events = EventAccumulator(os.path.join(config.output_dir, "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    written = records(config.output_dir)
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "eval_loss")):
        assert f"{kind}/{key}" in tags
        logged = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        expected = [(r["step"], r[key]) for r in written if r["type"] == kind]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(finished, tmp_path):
    before = copy_run(finished, tmp_path)
    with pytest.raises(ConfigError, match=r"holds a finished run \(3 steps\): pass --overwrite.*--resume"):
        Trainer(make_config(tmp_path, DATA)).train()
    assert snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("values, error, message", [
    (dict(lora_target_modules=["no_such_module"]), ConfigError, "lora"),  # found only when the model loads
    (dict(max_seq_length=8, batch_tokens=128, truncation="drop"), DataError,
     r"no training examples left after preparation: 24 loaded, dropped 24 longer than max_seq_length 8"),
    (dict(model_config={**TINY, "hidden_sise": 8}), ConfigError, r"'hidden_sise' is not a field of LlamaConfig; "
                                                                 r"did you mean 'hidden_size'"),
])
def test_overwrite_that_fails_keeps_the_earlier_run(finished, tmp_path, values, error, message):
    before = copy_run(finished, tmp_path)
    with pytest.raises(error, match=message):
        Trainer(make_config(tmp_path, DATA, overwrite_output_dir=True, **values)).train()
    assert snapshot(tmp_path / "out") == before  # the adapter and the base_model/ it points at are untouched


def test_overwrite_replaces_the_run(finished, tmp_path):
    copy_run(finished, tmp_path)
    result = Trainer(make_config(tmp_path, DATA, overwrite_output_dir=True, max_steps=1, save_steps=0)).train()
    assert result.global_step == 1
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert [r["step"] for r in records(tmp_path / "out") if r["type"] == "train"] == [1]


def test_resume_refuses_changes_and_honours_them_when_asked(finished, tmp_path):
    copy_run(finished, tmp_path)
    checkpoint = str(tmp_path / "out" / "checkpoints" / "step-3")
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's \(learning_rate: 0.01 -> 0.02; "
                                          r"warmup_steps: 0 -> 1\); restore.*--resume_changed_config"):
        Trainer(make_config(tmp_path, DATA, resume=True, learning_rate=0.02, warmup_steps=1)).train()
    with pytest.raises(ConfigError, match=r"other model settings \(lora_r: 4 -> 8\)"):
        Trainer(make_config(tmp_path, DATA, resume=True, lora_r=8, resume_changed_config=True)).train()
    # allowed keys (max_steps, save_steps, ...) change freely; --resume DIR takes a run folder's newest checkpoint
    log = io.StringIO()
    config = make_config(tmp_path, DATA, resume=str(tmp_path / "out"), max_steps=5, save_steps=0, learning_rate=0.02,
                         resume_changed_config=True)
    result = Trainer(config, stream=log).train()
    assert f"resumed from {checkpoint} at step 3" in log.getvalue()
    assert "continuing with the changed config (learning_rate: 0.01 -> 0.02) from step 3; the learning-rate " \
           "schedule is rebuilt" in log.getvalue()
    train = [r for r in records(tmp_path / "out") if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    # linear decay over the new 5 steps from the new peak: updates 3 and 4 (0-based) at 0.02 * 2/5 and 0.02 * 1/5
    assert [r["lr"] for r in train[3:]] == pytest.approx([0.02 * 2 / 5, 0.02 * 1 / 5])
    assert result.global_step == 5


def test_resuming_a_finished_run_writes_no_second_eval(finished, tmp_path):
    before = copy_run(finished, tmp_path)
    result = Trainer(make_config(tmp_path, DATA, resume=True)).train()
    assert result.global_step == 3 and result.losses == []
    assert records(tmp_path / "out") == records(finished[1].output_dir)
    after = snapshot(tmp_path / "out")
    assert after["adapter_model.safetensors"] == before["adapter_model.safetensors"]


def test_resume_a_finished_run_without_checkpoints_says_why(finished, tmp_path):
    copy_run(finished, tmp_path)
    shutil.rmtree(tmp_path / "out" / "checkpoints")
    with pytest.raises(ConfigError, match=r"holds a finished run but no checkpoint to continue from"):
        Trainer(make_config(tmp_path, DATA, resume=True)).train()
    with pytest.raises(ConfigError, match=r"'resume': .* does not exist"):
        Trainer(make_config(tmp_path, DATA, resume=str(tmp_path / "nowhere"))).train()


def test_resume_hint_is_the_real_command(tmp_path):
    config = make_config(tmp_path, DATA)
    trainer = Trainer(config, command=["train", "my run.yaml", "--max_steps", "9", "--overwrite"])
    assert trainer.resume_command() == "fastsft train 'my run.yaml' --max_steps 9 --resume"
    assert Trainer(config).resume_command() == f"fastsft train --resume {config.output_dir}"


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = make_config(tmp_path, DATA, report_to=["wandb"], max_steps=2, save_steps=0)
    Trainer(config).train()
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_several_datasets_train_and_resume_identically(tmp_path):
    first = make_config(tmp_path)  # writes the data
    sources = [{"path": first.dataset}, {"path": first.dataset, "mask": "all", "weight": 0.5}]
    values = dict(dataset=None, datasets=sources, report_to="none", max_steps=4, save_steps=2, eval_dataset=None,
                  lr_scheduler="constant")  # the 2-step run then takes the same steps as the first half of 4
    log = io.StringIO()
    straight = Trainer(make_config(tmp_path, output_dir=str(tmp_path / "a"), **values), stream=log).train()
    assert f"source {first.dataset}: 24 examples, weight 0.5 -> 12 per epoch" in log.getvalue()
    Trainer(make_config(tmp_path, output_dir=str(tmp_path / "b"), **{**values, "max_steps": 2})).train()
    resumed = Trainer(make_config(tmp_path, output_dir=str(tmp_path / "b"), resume=True, **values)).train()
    assert resumed.losses == straight.losses[2:]


def test_epoch_strategies_save_and_evaluate_at_epoch_ends(tmp_path):
    config = make_config(tmp_path, max_steps=-1, num_epochs=2, save_steps=0, save_strategy="epoch",
                         eval_strategy="epoch", save_total_limit=0, report_to="none", gradient_accumulation_steps=2)
    trainer = Trainer(config)
    trainer.setup()
    per_epoch = len(trainer.stream_data.plan(0))
    result = trainer.train()
    # windows of 2 micro-batches: epoch e ends in the step that takes its last micro-batch
    ends = sorted({-(-(per_epoch * (e + 1)) // 2) for e in range(2)})
    assert result.global_step == ends[-1]
    from fastsft.train.checkpoint import list_checkpoints

    assert [step for step, _ in list_checkpoints(config.output_dir)] == ends
    assert [r["step"] for r in records(config.output_dir) if r["type"] == "eval"] == ends
