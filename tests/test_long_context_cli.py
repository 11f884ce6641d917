"""Issue 22's bad input through the real command: exit 2, one line naming the key, nothing written.

A tile or chunk size that is not a positive integer, an unknown long_context, offload without
gradient checkpointing (answered from the config alone), and a context above the model's
max_position_embeddings without RoPE scaling (answered from the model's config, before any
weight is loaded).
"""
import os
import subprocess
import sys

import pytest

from fastsft.demo_data import make_records, write_jsonl

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, " \
       "num_key_value_heads: 1, max_position_embeddings: 48}"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_context")
    train, _ = make_records(8, 1, seed=2)
    write_jsonl(str(root / "train.jsonl"), train)
    (root / "run.yaml").write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 48\nbatch_tokens: 128\nmax_steps: 1\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"output_dir: out\n")
    return root


FLAG = "(command-line flag --"
CASES = [
    ("tile zero", ["--mlp_tile_tokens", "0"], "config key 'mlp_tile_tokens' must be a positive integer, got 0"),
    ("tile negative", ["--mlp_tile_tokens", "-4"], "config key 'mlp_tile_tokens' must be a positive integer"),
    ("tile not an int", ["--mlp_tile_tokens", "2.5"], f"config key 'mlp_tile_tokens' {FLAG}mlp_tile_tokens): expected int"),
    ("tile a word", ["--mlp_tile_tokens", "many"], f"config key 'mlp_tile_tokens' {FLAG}mlp_tile_tokens): expected int"),
    ("chunk zero", ["--loss_chunk_tokens", "0"], "config key 'loss_chunk_tokens' must be a positive integer, got 0"),
    ("chunk not an int", ["--loss_chunk_tokens", "1.5"],
     f"config key 'loss_chunk_tokens' {FLAG}loss_chunk_tokens): expected int"),
    ("long_context value", ["--long_context", "maybe"],
     f"config key 'long_context' {FLAG}long_context): 'maybe' is not one of auto, on, off"),
    ("offload without checkpointing", ["--offload_activations", "true"],
     "config key 'offload_activations' needs 'gradient_checkpointing: true'"),
    ("context above max positions", ["--max_seq_length", "64"],
     "config key 'max_seq_length' (64) is above the model's max_position_embeddings (48) and its config has no "
     "rope_scaling"),
]


@pytest.mark.parametrize("name, args, expected", CASES, ids=[c[0] for c in CASES])
def test_one_line_exit_2_naming_the_key(project, name, args, expected):
    env = dict(os.environ, FASTSFT_TRITON_ON_CPU="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "fastsft", "train", "run.yaml", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0], lines[0]
    assert not (project / "out").exists(), "nothing may be written"
