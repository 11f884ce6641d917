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
