"""Full fine-tuning in bf16 and fp16 through the CLI (issue 17: it crashed on q/k/v dtypes)."""
import json

import pytest

from fastsft.cli import main
from fastsft.demo_data import make_records, write_jsonl

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"


pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_full_fine_tuning_trains_two_steps(tmp_path, precision):
    train, _ = make_records(24, 1, seed=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nprogress_bar: 'off'\n"
        f"eval_at_start: false\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(config), "--mode", "full", "--precision", precision]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), records
