"""Folded MLP tiles (fastsft/plan/fold.py): a trace that runs each tiled MLP's identical tiles once
gives the same peak, parts, host memory and FLOPs as one that runs every tile, byte for byte."""
import pytest

from fastsft.plan import load_plan_config, prepare

from .test_plan import write_config

FIELDS = ("peak_bytes", "weights_bytes", "trainable_bytes", "activations_bytes", "transient_bytes", "host_bytes",
          "flops_model", "flops_recompute", "peak_op", "peak_phase")


@pytest.mark.parametrize("keys", [
    {"mode": "lora", "offload_activations": True},
    {"mode": "lora", "gradient_checkpointing": False},
    {"mode": "qlora"},
    {"mode": "full"},
])
def test_folded_tiles_trace_the_same_step(tmp_path, keys):
    prepared = prepare(load_plan_config(write_config(tmp_path, mlp_tile_tokens=64, **keys)), "fastsft")
    for seq_len in (130, 448, 520):  # 2 tiles + a partial one (nothing folded); 7 full tiles; 8 + a partial
        every = prepared.trace(seq_len, fold_tiles=False)
        folded = prepared.trace(seq_len)
        assert every.mlp_tiles_folded == 0
        # each of the 2 layers' MLPs runs its tiles in forward, in the checkpoint's recompute and in backward
        calls = 2 * (3 if keys.get("gradient_checkpointing", True) else 2)
        assert folded.mlp_tiles_folded == max(0, seq_len // 64 - 3) * calls
        for name in FIELDS:
            assert getattr(folded, name) == getattr(every, name), (seq_len, name)

