"""What is alive at the peak (fastsft/plan/breakdown.py, `fastsft plan --breakdown`): the live set adds up
to the traced peak, and its per-token rows are the storages that grow with the context."""
import json

from fastsft.cli import main
from fastsft.plan import load_plan_config, prepare
from fastsft.plan.breakdown import group_live, summary

from .test_plan import write_config


def test_live_set_at_the_peak_adds_up_and_grows_per_token(tmp_path):
    config = load_plan_config(write_config(tmp_path, mode="qlora", offload_activations=True, mlp_tile_tokens=64))
    prepared = prepare(config, "fastsft")
    steps = {n: prepared.trace(n, breakdown=True) for n in (1000, 1500)}
    for n, step in steps.items():
        assert step.breakdown["live_bytes"] == step.peak_bytes
        assert step.breakdown["tokens"] == n
        rows = step.breakdown["rows"]
        assert sum(r["bytes"] for r in rows) == step.peak_bytes
        assert all("L" in r["shape"] for r in rows if r["bytes_per_token"])
    # the grouped per-token cost is the slope of the traced peak between the two lengths
    slope = (steps[1500].peak_bytes - steps[1000].peak_bytes) / 500
    per_token = steps[1500].breakdown["bytes_per_token"]
    assert abs(per_token - slope) <= 0.02 * slope, (per_token, slope)
    # the frozen embeddings' output is not kept for the backward (no input-require-grads hook)
    assert not [r for r in steps[1500].breakdown["rows"] if r["op"] == "aten.embedding" and r["bytes_per_token"]]


def test_group_live_folds_layers():
    from fastsft.plan.tracker import Life

    lives = [Life(800, "backward", "device", "aten.add", f"M.model.layers.{i}.mlp", (1, 100, 4), "bfloat16", 0, None,
                  "backward") for i in range(3)]
    lives.append(Life(64, "weights", "device", "existing", "", (8, 4), "bfloat16", 0, None, "forward"))
    rows = group_live(lives, 100)
    assert rows[0]["module"] == "M.model.layers.*.mlp" and rows[0]["count"] == 3 and rows[0]["shape"] == "(1, L, 4)"
    assert rows[0]["bytes_per_token"] == 24.0 and rows[1]["bytes_per_token"] == 0.0
    assert summary(rows) == {"bytes_per_token": 24.0, "fixed_bytes": 64}


def test_cli_breakdown_prints_and_writes_it(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", write_config(tmp_path, offload_activations=True, mlp_tile_tokens=64), "--seq-len", "700",
                 "--breakdown", "--json", str(out)])
    text = capsys.readouterr().out
    entry = json.loads(out.read_text())["recipes"]["fastsft"]
    tokens = entry["step"]["seq_len"] * entry["step"]["batch"]
    assert code == 0 and f"alive at the peak ({tokens:,} tokens)" in text and "KiB/token" in text
    assert entry["breakdown"]["tokens"] == tokens
    assert entry["breakdown"]["live_bytes"] == entry["step"]["peak_bytes"]
    assert entry["breakdown"]["rows"][0]["bytes_per_token"] > 0
