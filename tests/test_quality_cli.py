"""Issue 25: the supervision audit through the command line (inspect and train) on the tiny model."""
import json

import pytest

from fastsft.cli import main

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


def _config(tmp_path, records, extra=""):
    with open(tmp_path / "train.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 1\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"output_dir: {tmp_path / 'out'}\n{extra}")
    return str(path)


def _chat(k, prompt="question"):
    return {"messages": [{"role": "user", "content": f"{prompt} {k}"},
                         {"role": "assistant", "content": f"answer number {k} " * (1 + k % 3)}]}


def test_inspect_and_train_print_the_audit(tmp_path, capsys):
    config = _config(tmp_path, [_chat(k) for k in range(12)])
    assert main(["inspect", config, "--n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "supervision audit:" in out and "trained tokens per example: min" in out and "round-trip: ok" in out
    assert main(["train", config]) == 0
    out = capsys.readouterr()
    assert "round-trip: ok" in out.out + out.err and (tmp_path / "out").is_dir()


def test_source_that_trains_on_nothing_exits_2_before_training(tmp_path, capsys):
    records = [_chat(k, prompt="hello world " * 100) for k in range(6)]  # every reply cut by max_seq_length
    config = _config(tmp_path, records)
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "none of its 6 examples has a trained token" in err and "max_seq_length 64 (raise it)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_failed_gate_exits_3_with_the_model_saved_and_marked(tmp_path, capsys):
    config = _config(tmp_path, [_chat(k) for k in range(16)],
                     extra="eval_fraction: 0.25\ngates: {eval_loss: {max: 0.001}, exact_match: {min: 0.5}}\n")
    assert main(["train", config]) == 3
    err = capsys.readouterr().err
    assert "gate eval_loss:" in err and "> max 0.001" in err
    assert "gate exact_match: no value at the final eval" in err  # eval_exact_match is off: not measured
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() or any(p.suffix == ".safetensors" for p in out.iterdir())
    assert "gate eval_loss" in (out / "GATE_FAILED").read_text()
    # a passing gate: exit 0, and the marker of the earlier failure is gone
    config = _config(tmp_path, [_chat(k) for k in range(16)],
                     extra="eval_fraction: 0.25\noverwrite_output_dir: true\ngates: {eval_loss: {max: 1000}}\n")
    assert main(["train", config, "--overwrite"]) == 0
    assert not (out / "GATE_FAILED").exists()


def test_unknown_gate_lists_the_known_ones_exit_2(tmp_path, capsys):
    config = _config(tmp_path, [_chat(k) for k in range(8)], extra="gates: {accuracy: {min: 0.9}}\n")
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'accuracy'; known: eval_loss, exact_match" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    config = _config(tmp_path, [_chat(k) for k in range(8)], extra="gates: {eval_loss: {below: 0.9}}\n")
    assert main(["train", config]) == 2
    assert "gates.eval_loss must be {min: x}, {max: x} or both" in capsys.readouterr().err
