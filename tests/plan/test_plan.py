"""fastsft plan: the traced step against a real one, the paths a real run takes, the search, the CLI."""
import json
import math

import pytest
import torch
import yaml

from fastsft.cli import main
from fastsft.plan import Margin, load_plan_config, max_context, parse_size, prepare
from fastsft.plan.search import search_max
from fastsft.plan.step import PreparedModel

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
