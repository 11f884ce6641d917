"""fastsft plan with sequence_parallel: N: one rank of an N-way Ulysses group, traced through the trainer's
own shard and exchange code over torch's fake process group; checked against an N = 1 trace at L / N and
against a real 2-process gloo step."""
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from fastsft.cli import main
from fastsft.plan import Margin, load_plan_config, max_context
from fastsft.plan.step import PreparedModel

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY = {  # 4 query heads, 2 KV heads: N = 2 splits both; N = 4 replicates each KV head twice
    "model_type": "llama", "vocab_size": 3001, "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 65536, "tie_word_embeddings": False,
}


def write_config(tmp_path, name="plan.yaml", **keys):
    data = {"model": "tiny-test", "model_config": dict(TINY), "mode": "lora", "lora_r": 8, "precision": "bf16",
            "gradient_checkpointing": True, "max_seq_length": 1024, "batch_tokens": 1024}
    data.update(keys)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def exchanged_shape(step):
    return step.largest_2d.get("_c10d_functional.all_to_all_single")


@pytest.mark.parametrize("n, kv_heads", [(2, 2), (4, 2), (2, 1), (4, 4)])
def test_one_rank_is_the_shard_trace_plus_the_exchange(tmp_path, n, kv_heads):
    """Per rank at L tokens = an N = 1 trace at L / N (embeddings, norms, MLP, LoRA, loss on the shard), plus
    DDP's buckets and what the exchange adds. Both peaks are in a layer's recomputed MLP backward, with that
    layer's attention saved; there the exchange holds two things more than plain attention: the output
    gathered back to (L / N tokens, all heads) beside the kernel's own (all tokens, heads / N) output, and
    the KV heads replicated for the split (GQA with fewer KV heads than N needs)."""
    length = 1024
    arch = dict(TINY, num_key_value_heads=kv_heads)
    sp = PreparedModel(load_plan_config(write_config(tmp_path, model_config=arch, sequence_parallel=n)),
                       "fastsft").trace(length)
    one = PreparedModel(load_plan_config(write_config(tmp_path, "one.yaml", model_config=arch)),
                        "fastsft").trace(length // n)
    info = sp.sequence_parallel
    assert info["size"] == n and info["rank_tokens"] == length // n and info["total_tokens"] == length
    assert info["ddp_bucket_bytes"] == one.trainable_params_bytes > 0  # DDP's buckets: a copy of the gradients
    assert sp.weights_bytes == one.weights_bytes
    # the shard's inputs carry the global cu_seqlens (one int32 per document boundary): nothing per token
    assert abs(sp.activations_bytes - one.activations_bytes) <= 64
    heads, local = TINY["num_attention_heads"], length // n
    head_dim = TINY["hidden_size"] // heads
    repeats = 1
    while (kv_heads * repeats) % n:
        repeats += 1
    gathered_output = local * heads * head_dim * 2  # bf16
    replicated_kv = 2 * local * kv_heads * (repeats - 1) * head_dim * 2
    assert sp.peak_op == one.peak_op and sp.peak_phase == one.peak_phase == "backward"
    extra = sp.peak_bytes - info["ddp_bucket_bytes"] - one.peak_bytes
    assert abs(extra - (gathered_output + replicated_kv)) <= 64, (extra, gathered_output, replicated_kv)
    # chunk j of the exchange: rank j's L / N tokens of this rank's heads, i.e. all L tokens x heads / N
    heads_per_rank = (heads + 2 * kv_heads * repeats) // n  # q + k + v after replication
    assert exchanged_shape(sp) == [n, local, heads_per_rank, head_dim]
    assert exchanged_shape(one) is None  # no exchange without sequence parallelism
    assert sp.tokens_per_step == length  # the step's tokens are the group's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_traced_rank_within_10_percent_of_a_real_gloo_step(tmp_path):
    """Two real processes (gloo), each its shard of a packed batch and the real all-to-alls; rank 0's peak
    from torch.profiler's memory events. The real CPU run attends through kernels/reference.py, which
    holds a document's L x L scores (the GPU kernel and the operator's fake implementation do not), so
    the batch packs short documents (10 x 100 tokens, split at token 500) where that costs little.
    DDP's buckets are left out of the comparison: the real step runs the bare model."""
    path = write_config(tmp_path, sequence_parallel=2, patch_kernels=False)
    seq, docs = 100, 10
    traced = PreparedModel(load_plan_config(path), "fastsft").trace(seq, docs)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSFT_TRITON_ON_CPU", "TRITON_INTERPRET")}
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "sp_real_worker.py"), path, str(seq), str(docs),
                               str(r), "2", port, str(outs[r])], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    measured = [json.loads(o.read_text())["peak"] for o in outs]
    planned = traced.peak_bytes - traced.sequence_parallel["ddp_bucket_bytes"]
    for peak in measured:  # the same shapes on every rank (measured: within 2% of each other)
        assert abs(planned - peak) / peak < 0.10, (planned, measured)


def test_max_context_is_the_sequence_over_n_gpus(tmp_path, capsys):
    config = load_plan_config(write_config(tmp_path, patch_kernels=False))
    single = PreparedModel(config, "fastsft")
    a, b = single.trace(1024).peak_bytes, single.trace(2048).peak_bytes
    gpu = a + 2 * (b - a)  # about 3072 tokens on one GPU
    margin = Margin(reserve_bytes=0, slack=0.0)
    one = max_context(config, gpu, margin=margin, model_state=single)
    sp_config = load_plan_config(write_config(tmp_path, patch_kernels=False, sequence_parallel=2))
    sp = PreparedModel(sp_config, "fastsft")
    found = max_context(sp_config, gpu, margin=margin, model_state=sp)
    assert found.best % 2 == 0
    assert sp.trace(found.best).peak_bytes <= gpu < sp.trace(found.best + 2).peak_bytes
    assert 1.8 * one.best < found.best < 2.2 * one.best  # activations halve per GPU; the weights stay
    out = tmp_path / "plan.json"
    code = main(["plan", write_config(tmp_path, "cli.yaml", patch_kernels=False, offload_activations=True),
                 "--sequence_parallel", "2", "--seq-len", "1024", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "sequence parallel: 2 ranks; the figures above are one GPU" in text
    assert "512 of the 1,024 tokens" in text
    step = json.loads(out.read_text())["recipes"]["fastsft"]["step"]
    assert step["host_bytes"] > 0 and step["sequence_parallel"]["host_bytes_all_ranks"] == 2 * step["host_bytes"]


@pytest.mark.parametrize("keys, args, needle", [
    ({"sequence_parallel": 3}, [], "3 must divide the model's 4 attention heads"),
    ({"sequence_parallel": 2, "packing": False}, [], "needs packing: true"),
    ({"sequence_parallel": 2}, ["--recipe", "hf"], "the hf recipe has no sequence exchange"),
    ({"sequence_parallel": 2, "mode": "full"}, [], "FSDP2's sharding (full fine-tuning, distributed: fsdp)"),
    ({"sequence_parallel": 2, "distributed": "fsdp"}, [], "FSDP2's sharding"),
    ({"sequence_parallel": 2, "model_config": dict(TINY, model_type="gpt_neox")}, [], "gpt_neox model family"),
    ({"sequence_parallel": 0}, [], "'sequence_parallel'"),
])
def test_what_the_trainer_refuses_is_one_line_and_exit_2(tmp_path, capsys, keys, args, needle):
    code = main(["plan", write_config(tmp_path, **keys), "--json", str(tmp_path / "p.json"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err


def test_plan_table_sequence_parallel_row(tmp_path, monkeypatch):
    """benchmarks/plan_table.py --cases sp: the line through two traces, the crossing traced and fitting,
    rendered as its own row next to ALST's published figure (plumbing, on the tiny model)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_plan_table_sp", os.path.join(REPO, "benchmarks", "plan_table.py"))
    plan_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_table)
    path = write_config(tmp_path, patch_kernels=False)
    overrides = ("--sequence_parallel", "2", "--offload_activations", "true", "--mlp_tile_tokens", "256")
    monkeypatch.setattr(plan_table, "SP_CASE", ("tiny QLoRA", path, overrides))
    monkeypatch.setattr(plan_table, "SP_FIT_AT", (256, 512))
    monkeypatch.setattr(plan_table, "SP_GPU", "48MB")
    sp = plan_table.run_sequence_parallel(Margin(reserve_bytes=0, slack=0.0))
    assert sp["max_context"] == 2 * sp["tokens_per_rank"] > 1024
    assert sp["step"]["peak_bytes"] <= sp["budget_bytes"] == 48 * 2 ** 20
    assert abs(sp["line_error_at_max"]) < 0.01  # the peak is linear in the length
    assert sp["step"]["sequence_parallel"]["host_bytes_all_ranks"] == 2 * sp["step"]["host_bytes"] > 0
    text = plan_table.sequence_parallel_markdown(sp)
    assert "traced on CPU, not measured on a GPU" in text and "ALST: 3,700,000" in text
    assert f"| tiny QLoRA | 2 x 48MB | sequence_parallel: 2, offload_activations: true" in text
    assert "fastsft kernels off" in text and "KiB of pinned host memory per token" in text


def test_plan_table_sp_run_leaves_the_single_gpu_rows_as_committed(tmp_path, monkeypatch):
    """`python -m benchmarks.plan_table --cases sp` re-traces only the sequence-parallel row: the single-GPU
    report and its PNG stay byte for byte (they were traced apart, by the full run), the README gets both."""
    import importlib.util

    import fastsft.plan

    spec = importlib.util.spec_from_file_location("_plan_table_sp2", os.path.join(REPO, "benchmarks", "plan_table.py"))
    plan_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_table)
    path = write_config(tmp_path, patch_kernels=False)
    overrides = ("--sequence_parallel", "2", "--offload_activations", "true", "--mlp_tile_tokens", "256")
    monkeypatch.setattr(plan_table, "SP_CASE", ("tiny QLoRA", path, overrides))
    monkeypatch.setattr(plan_table, "SP_FIT_AT", (256, 512))
    monkeypatch.setattr(plan_table, "SP_GPU", "48MB")
    monkeypatch.setattr(fastsft.plan, "Margin", lambda: Margin(reserve_bytes=0, slack=0.0))
    out = tmp_path / "results"
    out.mkdir()
    report = {"label": plan_table.LABEL, "margin": "no margin", "cases": []}
    (out / "plan_table.json").write_text(json.dumps(report, indent=1))
    png = b"\x89PNG committed single-GPU plot"
    (out / "plan_table.png").write_bytes(png)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{plan_table.BEGIN}\nold table\n{plan_table.END}\nrest\n")
    assert plan_table.main(["--cases", "sp", "--out", str(out), "--readme", str(readme)]) == 0
    assert (out / "plan_table.png").read_bytes() == png
    assert json.loads((out / "plan_table.json").read_text()) == report
    sp = json.loads((out / "sequence_parallel.json").read_text())
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert f"| tiny QLoRA | 2 x 48MB |" in text and f"{sp['max_context']:,}" in text


def test_traces_inside_a_distributed_run(tmp_path):
    """The trainer's long_context planner traces on a torchrun rank, whose default process group is the
    run's: the fake group then stands beside it, and the trace is the same."""
    import torch.distributed as dist

    config = load_plan_config(write_config(tmp_path, sequence_parallel=2))
    alone = PreparedModel(config, "fastsft").trace(512)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inside = PreparedModel(config, "fastsft").trace(512)
        assert dist.get_world_size() == 1  # the run's group is untouched
    finally:
        dist.destroy_process_group()
    assert inside.peak_bytes == alone.peak_bytes and inside.sequence_parallel == alone.sequence_parallel
    assert exchanged_shape(inside) == exchanged_shape(alone) == [2, 256, 4, 64]


def test_breakdown_counts_a_ranks_shard_as_growing_with_the_context(tmp_path):
    """--breakdown under sequence_parallel: a rank's tensors hold L/N tokens (L inside attention); both grow,
    and the grouped bytes per token of the whole sequence are the slope of the traced peak in L."""
    config = load_plan_config(write_config(tmp_path, patch_kernels=False, sequence_parallel=2))
    prepared = PreparedModel(config, "fastsft")
    steps = {n: prepared.trace(n, breakdown=True) for n in (1000, 1600)}
    slope = (steps[1600].peak_bytes - steps[1000].peak_bytes) / 600
    report = steps[1600].breakdown
    assert abs(report["bytes_per_token"] - slope) <= 0.05 * slope, (report["bytes_per_token"], slope)
    assert report["rank_tokens"] == 800 and "whole sequence" in report["per_token_of"]
    assert any("L/2" in r["shape"] and r["bytes_per_token"] for r in report["rows"])
    # what is left fixed does not grow: the same bytes at both lengths (weights, LoRA state, buckets)
    assert abs(report["fixed_bytes"] - steps[1000].breakdown["fixed_bytes"]) <= 0.02 * report["fixed_bytes"]


def test_max_context_line_and_json_give_bytes_per_token_of_the_whole_sequence(tmp_path, capsys):
    """Both fits' slopes are restated per token of L (the search runs over a rank's L/N tokens): the printed
    KiB/token (the local fit) is the slope of one GPU's traced peak in L, and says so; the JSON says its unit."""
    path = write_config(tmp_path, patch_kernels=False, sequence_parallel=2)
    prepared = PreparedModel(load_plan_config(path), "fastsft")
    slope = (prepared.trace(2000).peak_bytes - prepared.trace(1000).peak_bytes) / 1000
    budget = prepared.trace(3000).peak_bytes
    out = tmp_path / "plan.json"
    code = main(["plan", path, "--seq-len", "1024", "--gpu-memory", f"{budget}b", "--reserve", "0", "--max-context",
                 "--json", str(out)])
    text = capsys.readouterr().out
    found = json.loads(out.read_text())["recipes"]["fastsft"]["max_context"]
    assert code == 0 and "whole sequence" in found["unit"]
    for fit in (found["linear_fit"], found["local_fit"]):
        assert abs(fit["b_bytes_per_unit"] - slope) <= 0.05 * slope, (fit, slope)
    line = next(t for t in text.splitlines() if "max context at" in t)
    printed = float(line.split(" + ")[1].split(" KiB/token")[0]) * 1024
    assert abs(printed - slope) <= 0.05 * slope + 52 and "KiB/token of the whole sequence, one GPU's" in line, line
