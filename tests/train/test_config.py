"""TrainConfig from YAML + CLI flags: unknown keys, wrong types, precedence (no torch needed)."""
import pytest

from fastsft.config import TrainConfig, load_config, parse_overrides
from fastsft.errors import ConfigError


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_file_values_and_defaults(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ndataset: data.jsonl\nmax_steps: 7\nlearning_rate: 2e-4\nlora_target_modules: [q_proj, v_proj]\n")
    config = load_config(path)
    assert config.max_steps == 7
    assert config.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string; coerced
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.mode == TrainConfig.mode  # default kept


def test_cli_overrides_file(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ndataset: data.jsonl\nmax_steps: 7\nmode: lora\npacking: true\n")
    config = load_config(path, ["--max_steps", "3", "--mode=full", "--packing", "false", "--gradient-checkpointing"])
    assert (config.max_steps, config.mode, config.packing, config.gradient_checkpointing) == (3, "full", False, True)
    # keyword values (used by library callers) win over both
    assert load_config(path, ["--max_steps", "3"], max_steps=9).max_steps == 9


def test_unknown_key_in_file_suggests_closest(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ndataset: data.jsonl\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'learning_rat'" in message and "'learning_rate'" in message and path in message


def test_unknown_cli_flag_suggests_closest(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ndataset: data.jsonl\n")
    with pytest.raises(ConfigError, match=r"'max_step'.*--max_step.*did you mean 'max_steps'"):
        load_config(path, ["--max_step", "4"])


@pytest.mark.parametrize("text, key", [
    ("max_steps: ten", "max_steps"),
    ("max_steps: 1.5", "max_steps"),
    ("learning_rate: fast", "learning_rate"),
    ("packing: maybe", "packing"),
    ("model_config: 3", "model_config"),
    ("mode: lorra", "mode"),
])
def test_wrong_type_or_value_names_the_key(tmp_path, text, key):
    path = write(tmp_path, f"model: tiny-llama\ndataset: data.jsonl\n{text}\n")
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(path)


def test_choice_error_suggests_value(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ndataset: data.jsonl\nmode: lorra\n")
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        load_config(path)


def test_range_checks_and_required_dataset(tmp_path):
    with pytest.raises(ConfigError, match="'dataset' is required"):
        load_config(write(tmp_path, "model: tiny-llama\nmax_steps: 3\n"))
    with pytest.raises(ConfigError, match="'batch_tokens'"):
        load_config(write(tmp_path, "model: tiny-llama\ndataset: d.jsonl\nmax_seq_length: 512\nbatch_tokens: 256\n"))
    with pytest.raises(ConfigError, match="'gradient_accumulation_steps'"):
        load_config(None, ["--model", "tiny-llama", "--dataset", "d.jsonl", "--gradient_accumulation_steps", "0"])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ndataset: data.jsonl\nmax_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"run\.yaml line \d+"):
        load_config(path)


def test_relative_dataset_resolves_next_to_config(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("{}\n")
    path = write(tmp_path / "sub", "model: tiny-llama\ndataset: d.jsonl\n")
    assert load_config(path).dataset == str(tmp_path / "sub" / "d.jsonl")


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=x", "--c", "--d", "[1, 2]"]) == [("a", 1), ("b", "x"), ("c", True), ("d", [1, 2])]
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["stray"])
