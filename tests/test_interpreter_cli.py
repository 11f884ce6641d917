"""The interpreter path outside the test suite (issue 27): `fastsft train --precision bf16` with
TRITON_INTERPRET=1 and FASTSFT_TRITON_ON_CPU=1, in a fresh process that never imports the tests'
conftest, installs the interpreter's bf16 shims itself (before, it trained on garbage: step-1 loss
31.7 against 4.9), and runs the step-0 self-check (self_check: auto is on under the interpreter).
Its step-1 loss matches the same run on PyTorch's reference ops."""
import json
import os
import subprocess
import sys

import pytest


pytestmark = pytest.mark.slow

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"


def _config(tmp_path, name):
    records = [{"messages": [{"role": "user", "content": f"reverse: {' '.join(w)}"},
                             {"role": "assistant", "content": ' '.join(reversed(w))}]}
               for w in ("abcd", "qwer", "zxcvb", "poiu", "lkjhg", "mnbv")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: {data}\n"
                    f"chat_template: chatml\nmax_seq_length: 32\nbatch_tokens: 96\nmax_steps: 1\nprogress_bar: 'off'\n"
                    f"mode: lora\nlora_r: 4\nprecision: bf16\ncpu_threads: 1\noutput_dir: {tmp_path / name}\n")
    return str(path)


def _train(tmp_path, name, interpreter: bool):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSFT_TRITON_ON_CPU")}
    if interpreter:
        env.update(TRITON_INTERPRET="1", FASTSFT_TRITON_ON_CPU="1")
    proc = subprocess.run([sys.executable, "-m", "fastsft", "train", _config(tmp_path, name)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in records if r.get("type") == "train")
    return loss, proc.stdout + proc.stderr


def test_bf16_training_under_the_interpreter_matches_the_reference_ops(tmp_path):
    ref_loss, ref_log = _train(tmp_path, "reference", interpreter=False)
    loss, log = _train(tmp_path, "interpreter", interpreter=True)
    assert "self-check: skipped" not in log and "self-check: 7 ops within 2x" in log, log[-3000:]
    assert "self-check" not in ref_log  # auto: off where the ops run PyTorch's reference
    assert abs(loss - ref_loss) <= 2e-2 * abs(ref_loss), (loss, ref_loss)
