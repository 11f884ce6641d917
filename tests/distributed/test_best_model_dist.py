"""Issue 25: early stopping and load_best_model_at_end under torchrun (2 CPU processes, gloo, FSDP2).

Every rank must stop after the same eval, and the consolidated final model must be the best eval's
sharded (DCP) checkpoint. The eval losses are the real ones; the test recomputes from metrics.jsonl where
the run had to stop and which step was best.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastsft.demo_data import make_records, write_jsonl

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def _dcp_model(checkpoint, scratch):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = os.path.join(scratch, os.path.basename(checkpoint) + ".pt")
    dcp_to_torch_save(os.path.join(checkpoint, "dcp"), target)
    return torch.load(target, weights_only=False)["model"]


def test_two_processes_stop_together_and_save_the_best(tmp_path):
    train, held_out = make_records(40, 6, seed=1)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    write_jsonl(str(tmp_path / "eval.jsonl"), held_out)
    out = tmp_path / "out"
    config = dict(model="tiny-llama", model_config=TINY, tokenizer_vocab_size=300, mode="full",
                  dataset=str(tmp_path / "train.jsonl"), eval_dataset=str(tmp_path / "eval.jsonl"),
                  max_seq_length=64, batch_tokens=128, max_steps=60, learning_rate=0.05, eval_steps=3,
                  save_total_limit=1, early_stopping_patience=2, load_best_model_at_end=True,
                  progress_bar="off", cpu_threads=1, output_dir=str(out))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, FASTSFT_TRITON_ON_CPU="0", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "fastsft", "train", str(tmp_path / "run.yaml"), "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=400)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    with open(out / "metrics.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["type"] == "eval" and r["step"] > 0]
    best_step, best, waited, stop = None, None, 0, None
    for step, loss in evals:  # the rule, recomputed: patience 2, threshold 0
        if best is None or loss < best:
            best_step, best, waited = step, loss, 0
        else:
            waited += 1
        if waited == 2:
            stop = step
            break
    assert stop is not None and stop < 60, evals  # this planted setup does overfit early
    assert max(r["step"] for r in records if r["type"] == "train") == stop
    assert log.count("early stopping:") == 1 and f"stopping after step {stop}, best" in log
    [marker] = [r for r in records if r["type"] == "best_model"]
    assert marker["best_step"] == best_step
    final = load_file(str(out / "model.safetensors"))
    saved_best = _dcp_model(str(out / "checkpoints" / f"step-{best_step}"), str(tmp_path))
    saved_last = _dcp_model(str(out / "checkpoints" / f"step-{stop}"), str(tmp_path))
    assert set(final) <= set(saved_best)
    assert all(torch.equal(final[k], saved_best[k].to(final[k].dtype)) for k in final)
    assert any(not torch.equal(final[k], saved_last[k].to(final[k].dtype)) for k in final)
