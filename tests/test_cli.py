"""The `fastsft` command: clean errors (exit 2, no traceback), the demo end to end, inspect, merge, SIGTERM.

Trainer runs here set FASTSFT_TRITON_ON_CPU=0, so the patched model runs the
PyTorch reference ops (the kernels have their own parity tests under tests/kernels).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsft.cli import main
from fastsft.demo_data import make_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "examples" / "demo.yaml")
TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"


pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


def small_config(tmp_path, extra=""):
    train, _ = make_records(24, 1, seed=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"output_dir: {tmp_path / 'out'}\n{extra}"
    )
    return str(path)


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "fastsft <command>" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_bad_data_is_a_clean_error_naming_file_and_line(tmp_path, capsys):
    config = small_config(tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [broken'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl" in err and "line 3" in err
    assert "Traceback" not in err


def test_missing_field_is_a_clean_error(tmp_path, capsys):
    config = small_config(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nothing": 1}\n')
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "Traceback" not in err


def test_bad_config_key_is_a_clean_error(tmp_path, capsys):
    config = small_config(tmp_path, extra="lerning_rate: 0.1\n")
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "'lerning_rate'" in err and "did you mean 'learning_rate'" in err and "Traceback" not in err
    assert main(["train", config.replace("run.yaml", "absent.yaml")]) == 2
    assert main(["train", small_config(tmp_path), "--max_steps", "two"]) == 2
    assert "'max_steps'" in capsys.readouterr().err


def test_demo_config_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["train", DEMO, "--output_dir", str(out), "--max_steps", "3", "--eval_steps", "0",
                 "--eval_max_examples", "8", "--save_steps", "2", "--progress_bar", "off"])
    assert code == 0
    captured = capsys.readouterr()
    assert "run summary" in captured.err and "exact match (end)" in captured.err
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss_curve.png",
                 "fastsft_config.yaml", "checkpoints/step-2/training_state.pt"):
        assert (out / name).exists(), name
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert {r["step"] for r in records if r["type"] == "eval"} == {0, 3}
    train = [r for r in records if r["type"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "peak_memory_mb"} <= set(train[0])


def test_inspect_prints_examples_and_statistics(tmp_path, capsys):
    assert main(["inspect", DEMO, "--examples", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("legend: trained tokens are [[between brackets]]")
    assert out.count("--- example") == 2
    assert "[[" in out and "]]" in out  # trained tokens highlighted
    assert "reverse:" in out and "kept" in out and "trained" in out and "packing" in out
    assert main(["inspect", DEMO, "--n", "1", "--index", "5", "--tokens"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("legend: position, token id, '+' trained")
    assert out.count("--- example") == 1 and "(source index 5," in out
    rows = [line.split() for line in out.splitlines() if line[:6].strip().isdigit()]
    assert rows and {row[2] for row in rows} == {"+", "."} and [int(row[0]) for row in rows] == list(range(len(rows)))
    assert main(["inspect", DEMO, "--n", "x"]) == 2


def test_merge_writes_a_loadable_model(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = small_config(tmp_path, extra="learning_rate: 0.05\n")
    assert main(["train", config]) == 0
    out, merged_dir = tmp_path / "out", tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--output", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), str(out))
    ids = torch.randint(0, merged.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-5  # fp32
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    with torch.no_grad():
        assert float((base(ids).logits - b).norm()) > 0  # the adapter changed something
    assert (merged_dir / "tokenizer.json").exists()
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path):
    config = small_config(tmp_path, extra="save_steps: 0\n")
    env = dict(os.environ, FASTSFT_TRITON_ON_CPU="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastsft", "train", config, "--max_steps", "100000"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and '"type": "train"' in metrics.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and "Traceback" not in err
    assert f"Continue with: fastsft train {config} --max_steps 100000 --resume" in err  # the command that ran
    checkpoints = list((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "training_state.pt").exists()
    # --resume continues from it (a couple more steps) and writes the final adapter
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert main(["train", config, "--resume", "--max_steps", str(stopped_at + 2)]) == 0
    steps = [json.loads(l)["step"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in l]
    assert steps == list(range(1, stopped_at + 3))
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_full_fine_tuning_trains_two_steps(tmp_path, precision):
    """Full fine-tuning in bf16 and fp16 through the CLI (issue 17: it crashed on q/k/v dtypes)."""
    config = small_config(tmp_path, "eval_at_start: false\n")
    assert main(["train", config, "--mode", "full", "--precision", precision]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), records
