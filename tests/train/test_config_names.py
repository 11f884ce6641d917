"""Aliases (TRL / TrainingArguments / Axolotl names), value ranges, suggestions and the generated help
(no torch needed)."""
import re
from pathlib import Path

import pytest

from fastsft.config import FIELDS, help_text, load_config
from fastsft.config_names import ALIASES, HELP
from fastsft.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"
BASE = dict(model="tiny-llama", dataset="d.jsonl")


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\ndataset: d.jsonl\n" + text)
    return str(path)


@pytest.mark.parametrize("text, key, value", [
    ("num_train_epochs: 3", "num_epochs", 3),
    ("per_device_train_batch_size: 4", "batch_size", 4),
    ("micro_batch_size: 4", "batch_size", 4),
    ("per_device_eval_batch_size: 8", "eval_batch_size", 8),
    ("lr_scheduler_type: linear", "lr_scheduler", "linear"),
    ("max_length: 512", "max_seq_length", 512),
    ("sequence_len: 512", "max_seq_length", 512),
    ("bf16: true", "precision", "bf16"),
    ("fp16: true", "precision", "fp16"),
    ("load_in_4bit: true", "mode", "qlora"),
    ("adapter: qlora", "mode", "qlora"),
    ("assistant_only_loss: true", "mask", "assistant"),
    ("completion_only_loss: true", "mask", "completion"),
    ("train_on_inputs: true", "mask", "all"),
    ("train_on_inputs: false", "mask", "assistant"),
    ("padding_free: false", "packing", False),
    ("sample_packing: false", "packing", False),
    ("optim: adamw_bnb_8bit", "optimizer", "adamw_8bit"),
    ("val_set_size: 0.1", "eval_fraction", 0.1),
    ("resume_from_checkpoint: true", "resume", True),
    ("overwrite: true", "overwrite_output_dir", True),
    ("dataset_text_field: body", "dataset_text_field", "body"),
])
def test_aliases_map_onto_fastsft_keys(tmp_path, text, key, value):
    config = load_config(write(tmp_path, text + "\nbatch_tokens: 4096\n"))
    assert getattr(config, key) == value


def test_model_aliases_and_flags_on_the_command_line(tmp_path):
    config = load_config(None, ["--base_model", "tiny-llama", "--dataset", "d.jsonl", "--bf16", "--load_in_4bit",
                                "--num_train_epochs", "2"])
    assert (config.model, config.precision, config.mode, config.num_epochs) == ("tiny-llama", "bf16", "qlora", 2)
    assert load_config(None, ["--model_name_or_path", "tiny-llama", "--dataset", "d.jsonl"]).model == "tiny-llama"
    # a flag that says "no" leaves the key alone; one that agrees with the key is accepted (Axolotl writes both)
    assert load_config(write(tmp_path, "load_in_4bit: false\nbf16: false\n")).mode == "lora"
    assert load_config(write(tmp_path, "load_in_4bit: true\nadapter: qlora\nmode: qlora\n")).mode == "qlora"
    # a later source (the command line) overrides an alias given in the file
    assert load_config(write(tmp_path, "max_length: 512\n"), ["--max_seq_length", "256"]).max_seq_length == 256


@pytest.mark.parametrize("text, message", [
    ("max_length: 512\nmax_seq_length: 256", r"'max_length' and 'max_seq_length'.*both set 'max_seq_length'"),
    ("num_train_epochs: 2\nnum_epochs: 2", r"'num_train_epochs' and 'num_epochs'"),  # even when they agree
    ("sequence_len: 64\nmax_length: 64", r"'sequence_len' and 'max_length'"),
    ("bf16: true\nprecision: fp32", r"'bf16' and 'precision'"),
    ("load_in_4bit: true\nmode: full", r"'load_in_4bit' and 'mode'"),
    ("adapter: ia3", r"'adapter'.*alias of 'mode'.*not one of lora, qlora"),
    ("optim: sgd", r"'optim'.*not one of"),
])
def test_two_spellings_of_one_key_or_a_bad_alias_value(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text + "\n"))


@pytest.mark.parametrize("key, suggestion", [
    ("lerning_rate", "learning_rate"), ("max_step", "max_steps"), ("num_epoch", "num_epochs"),
    ("per_device_train_batch", "per_device_train_batch_size"),
    ("save_strategy", None), ("gradient_clipping", None), ("foo", None),
])
def test_suggestions_only_for_close_names(key, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, **BASE, **{key: 1})
    message = str(info.value)
    if suggestion is None:
        assert "did you mean" not in message, message
    else:
        assert f"did you mean {suggestion!r}" in message, message


@pytest.mark.parametrize("values, message", [
    (dict(warmup_ratio=2), r"'warmup_ratio' must be in \[0, 1\], got 2"),
    (dict(warmup_ratio=-0.1), r"'warmup_ratio' must be in \[0, 1\]"),
    (dict(min_lr_ratio=1.5), r"'min_lr_ratio' must be in \[0, 1\]"),
    (dict(eval_fraction=1.0), r"'eval_fraction' must be in \[0, 1\)"),
    (dict(lora_dropout=1.0), r"'lora_dropout' must be in \[0, 1\)"),
    (dict(adam_beta2=1.0), r"'adam_beta2' must be in \[0, 1\)"),
    (dict(report_to="mlflow"), r"'report_to': 'mlflow' is not one of none, tensorboard, wandb"),
    (dict(overwrite_output_dir=True, resume=True), r"--overwrite and --resume contradict"),
    (dict(dataset_text_field=""), r"'dataset_text_field' must name a field"),
])
def test_values_out_of_range_are_rejected(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, **{**BASE, **values})


def test_model_is_required_but_tiny_llama_may_be_named():
    with pytest.raises(ConfigError, match=r"'model' is required.*tiny-llama"):
        load_config(None, dataset="d.jsonl")
    assert load_config(None, **BASE).model == "tiny-llama"


@pytest.mark.parametrize("entry, message", [
    ("- {path: a.jsonl, weight: 0}", r"entry 1: weight must be a number in \(0, 100\]"),
    ("- {path: a.jsonl, mask: answers}", r"entry 1: mask 'answers' is not one of"),
    ("- {path: a.jsonl}\n  - {paht: b.jsonl}", r"entry 2: unknown key 'paht'.*did you mean 'path'"),
    ("- a.jsonl", r"entry 1: expected a mapping"),
])
def test_datasets_entries_are_checked(tmp_path, entry, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny-llama\ndatasets:\n  {entry}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_dataset_and_datasets_together_and_axolotl_type(tmp_path):
    with pytest.raises(ConfigError, match="'dataset' and 'datasets' both given"):
        load_config(None, **BASE, datasets=[{"path": "a.jsonl"}])
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\ndatasets:\n  - {path: a.jsonl, type: alpaca}\n")
    assert load_config(str(path)).datasets == [{"path": "a.jsonl", "format": "instruction"}]


def test_help_lists_every_key_with_type_default_and_description():
    text = help_text()
    assert set(HELP) == set(FIELDS)  # every key is described
    for name in FIELDS:
        match = re.search(rf"^  --{name} \((.+), default (.+)\)\n      (.+)$", text, re.M)
        assert match, name
        assert match.group(3).strip() == HELP[name]
    for alias in ALIASES:
        assert re.search(rf"^  {alias} = ", text, re.M), alias


def test_readme_alias_table_matches_the_aliases():
    readme = README.read_text()
    rows = dict(re.findall(r"^\| `([a-z_0-9]+)` \| `([a-z_0-9]+)`", readme, re.M))
    assert {name: alias.key for name, alias in ALIASES.items()} == rows


def test_relative_output_dir_says_its_base(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "old_run").mkdir()
    config_file = tmp_path / "project" / "run.yaml"
    config_file.write_text("model: tiny-llama\ndataset: d.jsonl\noutput_dir: old_run\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(str(config_file))  # exists only next to the config: taken from there
    assert config.output_dir == str(tmp_path / "project" / "old_run")
    assert config._notes == [f"output_dir: {config.output_dir} (next to the config file, {tmp_path / 'project'})"]
    config = load_config(str(config_file), ["--output_dir", "new_run"])  # a new folder: the current directory
    assert config.output_dir == str(tmp_path / "new_run")
    assert "relative to the current directory" in config._notes[0]
