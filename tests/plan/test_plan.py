"""fastsft plan: the traced step against a real one, the paths a real run takes, the search, the CLI."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fastsft.cli import main
from fastsft.errors import ConfigError
from fastsft.plan import Margin, load_plan_config, max_context, parse_size, prepare
from fastsft.plan.search import search_max
from fastsft.plan.step import PreparedModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {
    "model_type": "llama", "vocab_size": 3001, "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def write_config(tmp_path, **keys):
    data = {"model": "tiny-test", "model_config": dict(TINY), "mode": "lora", "lora_r": 8, "precision": "bf16",
            "gradient_checkpointing": True, "max_seq_length": 256}
    data.update(keys)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def profiled_peak(prepared, seq_len, tmp_path):
    """Peak bytes of the real step, from the CPU allocator's own accounting in torch.profiler's memory
    events (independent of the planner's tracker), plus what existed before the step."""
    from torch.profiler import ProfilerActivity, profile

    tensors = list(prepared.model.parameters()) + list(prepared.model.buffers())
    tensors += [v for state in prepared.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    existing = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        prepared.run_real(seq_len)
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    running = peak = 0
    for event in events:
        if event.get("Device Type", 0) == 0:  # CPU
            running += event["Bytes"]
            peak = max(peak, running)
    assert peak > 0
    return existing + peak


@pytest.mark.parametrize("recipe, keys", [
    ("hf", {"mode": "lora"}),
    ("hf", {"mode": "full", "gradient_checkpointing": False}),
    ("fastsft", {"mode": "lora", "patch_kernels": False}),
])
def test_traced_peak_within_10_percent_of_the_real_step(tmp_path, recipe, keys):
    config = load_plan_config(write_config(tmp_path, **keys))
    seq_len = 384
    traced = PreparedModel(config, recipe).trace(seq_len)
    torch.manual_seed(0)
    measured = profiled_peak(PreparedModel(config, recipe, fake=False), seq_len, tmp_path)
    assert abs(traced.peak_bytes - measured) / measured < 0.10, (traced.peak_bytes, measured)
    parts = (traced.weights_bytes + traced.trainable_bytes + traced.activations_bytes + traced.transient_bytes)
    assert parts == traced.peak_bytes  # the breakdown adds up to the peak


def test_no_sequence_by_sequence_tensor(tmp_path):
    """transformers takes fake tensors for tracing and would build an L x L mask; a real run does not."""
    config = load_plan_config(write_config(tmp_path))
    seq_len = 512
    step = PreparedModel(config, "hf").trace(seq_len)
    square = {op: shape for op, shape in step.largest_2d.items() if list(shape[-2:]) == [seq_len, seq_len]}
    assert not square, square
    assert step.peak_phase == "backward"


def test_qlora_weights_are_the_packed_4bit_tensors(tmp_path):
    """NF4 + double quantization, as bitsandbytes stores it: packed 4-bit data, 8-bit absmax per 64
    values, fp32 absmax per 256 of those, the two code books and the offset; the rest in bf16."""
    config = load_plan_config(write_config(tmp_path, mode="qlora", patch_kernels=False))
    step = prepare(config, "fastsft").trace(256)
    h, kv, ff = 256, 128, 688
    expected = 0
    for out_f, in_f in [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)] * 2:
        n = out_f * in_f
        blocks = (n + 63) // 64
        expected += (n + 1) // 2 + blocks + 4 * ((blocks + 255) // 256) + 4 * 16 + 4 * 256 + 4
    expected += 2 * (2 * 3001 * h) + 2 * h * (2 * 2 + 1)  # embeddings, lm_head, norms (bf16)
    rotary = step.weights_bytes - expected  # the rotary embedding's inv_freq buffer (fp32)
    assert 0 <= rotary <= 4 * 128, (step.weights_bytes, expected)
    assert step.peak_bytes > step.weights_bytes


def test_peak_is_linear_in_length_and_the_search_brackets_it(tmp_path):
    config = load_plan_config(write_config(tmp_path))
    prepared = prepare(config, "hf")
    peaks = [prepared.trace(n).peak_bytes for n in (256, 512, 768)]
    assert abs((peaks[2] - peaks[1]) - (peaks[1] - peaks[0])) <= 0.001 * peaks[2]
    gpu = peaks[0] + (peaks[1] - peaks[0]) * 5  # room for about 1536 tokens, before the margin
    margin = Margin(reserve_bytes=0, slack=0.0)
    found = max_context(config, gpu, recipe="hf", margin=margin, model_state=prepared)
    assert prepared.trace(found.best).peak_bytes <= gpu < prepared.trace(found.best + 1).peak_bytes


def test_search_to_one_percent_on_a_curve():
    peak = lambda n: 10 ** 9 + 2 * 10 ** 5 * n + 40 * n * n  # noqa: E731  (eager attention: quadratic)
    found = search_max(peak, 3 * 10 ** 9)
    assert peak(found.best) <= 3 * 10 ** 9
    assert any(v <= found.best * 1.01 and p > 3 * 10 ** 9 for v, p in found.traces)


@pytest.mark.parametrize("text, expected", [("80GB", 80 * 2 ** 30), ("24 GiB", 24 * 2 ** 30),
                                            ("40960MB", 40 * 2 ** 30), ("0.5TB", 2 ** 39)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_cli_prints_the_figures_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", write_config(tmp_path), "--recipe", "hf", "--gpu-memory", "1GB", "--reserve", "0.1GB",
                 "--max-context", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    for needle in ("not measured on a GPU", "peak device memory", "weights", "saved activations", "transient",
                   "FLOPs per step", "max context at 1GB"):
        assert needle in text
    report = json.loads(out.read_text())
    step = report["recipes"]["hf"]["step"]
    assert step["peak_bytes"] > 0 and step["flops_model"] > 0 and step["tokens_per_step"] == 256
    assert report["recipes"]["hf"]["max_context"]["best"] > 256


@pytest.mark.parametrize("keys, args, needle", [
    ({"model_config": {"model_type": "t5"}}, [], "no causal-LM class"),
    ({"model": "nobody-here/no-such-model-xyz", "model_config": {}}, [], "no cached config.json"),
    ({}, ["--gpu-memory", "eighty"], "80GB"),
    ({}, ["--recipe", "unsloth"], "choose from"),
    ({}, ["--max-context"], "--gpu-memory"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, keys, args, needle):
    path = write_config(tmp_path, **keys)
    code = main(["plan", path, "--json", str(tmp_path / "p.json"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err


def test_hf2024_loss_holds_more_than_todays(tmp_path):
    config = load_plan_config(write_config(tmp_path))
    today = prepare(config, "hf").trace(256)
    old = prepare(config, "hf2024").trace(256)
    assert old.peak_bytes > today.peak_bytes  # fp32 logits held, plus the shifted copy


def test_plan_check_plans_every_measured_e2e_row(tmp_path, monkeypatch):
    """The GPU suite's stage p: a planned peak next to each measured one (here a made-up measurement)."""
    payload = {"benchmark": "e2e_x", "config": {"lora_rank": 8, "lora_alpha": 16}, "results": [
        {"case": "tiny-llama/lora/seq128", "provider": "hf", "peak_mb": 10.0, "precision": "bf16",
         "grad_ckpt": True, "tokens_per_step": 100, "docs_per_step": 2, "padded_fraction_if_padded": 0.2},
        {"case": "tiny-llama/lora/seq128", "provider": "hf+liger", "peak_mb": 9.0},
        {"case": "tiny-llama/lora/seq128", "provider": "fastsft", "error": "x"},
    ]}
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "e2e_x.json").write_text(json.dumps(payload))
    out = tmp_path / "plan_check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_check", "--e2e-dir", str(tmp_path / "e2e"),
                           "--out", str(out), "--budget", "300"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["provider"] == "hf"
    assert rows[0]["planned_shape"] == [2, 62] and rows[0]["plan_peak_mb"] > 0
    assert rows[0]["plan_over_measured"] == pytest.approx(rows[0]["plan_peak_mb"] / 10.0)


def test_plan_table_plumbing(tmp_path):
    spec = importlib.util.spec_from_file_location("_plan_table", os.path.join(REPO, "benchmarks", "plan_table.py"))
    plan_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_table)
    margin = Margin(reserve_bytes=0, slack=0.0)
    row = plan_table.run_case(write_config(tmp_path), "hf", margin)
    assert set(row["max_context"]) == set(plan_table.GPUS)
    assert row["max_context"]["80GB"] > row["max_context"]["24GB"] > 0
    row["label"] = "hf"
    report = {"label": plan_table.LABEL, "margin": margin.describe(), "fastsft_note": "kernels off",
              "cases": [{"name": "tiny", "config": "x", "rows": [row]}], "calibration": [dict(row, label="hf")]}
    table = plan_table.markdown(report)
    assert "traced on CPU, not measured on a GPU" in table and "| tiny | hf |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{plan_table.BEGIN}\nold\n{plan_table.END}\nrest\n")
    assert plan_table.update_readme(str(readme), table)
    assert "old" not in readme.read_text() and "| tiny | hf |" in readme.read_text()
    plan_table.plot(report, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_offloaded_activations_move_to_host(tmp_path):
    plain = prepare(load_plan_config(write_config(tmp_path, patch_kernels=False)), "fastsft").trace(512)
    config = load_plan_config(write_config(tmp_path, patch_kernels=False, offload_activations=True))
    offloaded = prepare(config, "fastsft").trace(512)
    assert plain.host_bytes == 0 and offloaded.host_bytes > 0
    assert offloaded.activations_bytes < plain.activations_bytes


def test_accumulation_keeps_the_window_gradients_alive(tmp_path):
    config = load_plan_config(write_config(tmp_path, patch_kernels=False, gradient_accumulation_steps=3))
    step = prepare(config, "fastsft").trace(256)
    assert step.tokens_per_step == 3 * 256 and step.accumulation == 3
    assert step.grads_bytes == step.trainable_params_bytes > 0  # fp32 LoRA gradients from the earlier micro-batches


def test_max_batch_and_other_families(tmp_path):
    from fastsft.plan import max_batch

    config = load_plan_config(write_config(tmp_path, patch_kernels=False))
    prepared = prepare(config, "fastsft")
    one, two = prepared.trace(128, 1).peak_bytes, prepared.trace(128, 2).peak_bytes
    found = max_batch(config, one + int(3.5 * (two - one)), 128, margin=Margin(0, 0.0), model_state=prepared)
    assert found.best == 4
    gemma = dict(TINY, model_type="gemma2", head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                 tie_word_embeddings=True)
    qwen3 = dict(TINY, model_type="qwen3", head_dim=64)
    for arch in (gemma, qwen3):
        step = prepare(load_plan_config(write_config(tmp_path, model_config=arch)), "hf").trace(128)
        assert step.peak_bytes > step.weights_bytes > 0


def test_cpu_ops_choice_never_reaches_the_trace(tmp_path, monkeypatch):
    """cpu_ops (fastest by default) times ops on real CPU tensors; the planner traces the GPU run's kernels."""
    from fastsft.patch import cpu_choice, self_check

    def timed(*args, **kwargs):
        raise AssertionError("the planner ran the CPU-ops choice")

    monkeypatch.setattr(cpu_choice, "choose", timed)
    monkeypatch.setattr(self_check, "kernels_active", lambda module: False)  # the reference path, as on CPU
    config = load_plan_config(write_config(tmp_path, cpu_ops="fastest"))
    assert config.cpu_ops == "fastest"
    step = prepare(config, "fastsft").trace(256)
    assert step.peak_bytes > 0 and not step.flops_uncounted_ops


def test_torch_compile_is_said_to_be_traced_eager(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", write_config(tmp_path, torch_compile=True), "--json", str(out)]) == 0
    assert "torch_compile: true is traced as the eager step" in capsys.readouterr().out
    assert json.loads(out.read_text())["recipes"]["fastsft"]["torch_compile"] == "traced as the eager step"


def test_model_config_flag_replaces_the_files_block_as_in_train(tmp_path):
    """`--model_config` on the command line wins over the file's block (the last flag wins), and a file
    without one takes the flag's architecture: the same reading `fastsft train` gives the file and flags."""
    flagged = dict(TINY, hidden_size=96, num_hidden_layers=3)
    path = write_config(tmp_path)
    config = load_plan_config(path, ["--model_config", json.dumps(dict(TINY, hidden_size=32)),
                                     "--model_config", json.dumps(flagged)])
    assert config.model_config == flagged
    bare = yaml.safe_load(open(path))
    del bare["model_config"]
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare))
    config = load_plan_config(str(tmp_path / "bare.yaml"), ["--model_config", json.dumps(flagged)])
    assert config.model_config == flagged
    with pytest.raises(ConfigError, match="--model_config.*expected a mapping"):
        load_plan_config(path, ["--model_config", "7"])


@pytest.mark.parametrize("zero", ["0", "0GB", "0GiB", "0MB", "0.0 kib", "0b"])
def test_any_zero_reserve_is_accepted_and_a_zero_gpu_is_not(tmp_path, capsys, zero):
    out = tmp_path / "plan.json"
    code = main(["plan", write_config(tmp_path), "--recipe", "hf", "--reserve", zero, "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["margin"]["reserve_bytes"] == 0
    code = main(["plan", write_config(tmp_path), "--recipe", "hf", "--gpu-memory", zero, "--json", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--gpu-memory" in err, err
