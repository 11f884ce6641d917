"""`fastsft merge --base-weights exact|original` on a CPU QLoRA run: the drift report and what it claims."""
import json

import pytest
import torch

from fastsft.cli import main
from fastsft.demo_data import make_records, write_jsonl

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py
TINY = "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1}"


def qlora_run(tmp_path, precision):
    train, _ = make_records(24, 1, seed=3)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
                    f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 3\nprogress_bar: 'off'\nmode: qlora\n"
                    f"lora_r: 4\nlearning_rate: 0.05\nprecision: {precision}\neval_at_start: false\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(path)]) == 0
    return tmp_path / "out"


def test_exact_merge_reproduces_the_trained_qlora_model_and_original_drifts(tmp_path, capsys):
    out = qlora_run(tmp_path, "fp32")
    reports = {}
    for mode in ("exact", "original"):
        target = tmp_path / f"merged-{mode}"
        assert main(["merge", "--adapter", str(out), "--output", str(target), "--base-weights", mode,
                     "--dtype", "fp32"]) == 0
        assert "drift vs the trained model (dequantized 4-bit base + adapter)" in capsys.readouterr().out
        reports[mode] = json.loads((target / "merge_report.json").read_text())
        assert reports[mode]["tokens"] > 0 and reports[mode]["base_weights"] == mode
    # exact: the same function as the trained model up to fp32 summation order
    assert reports["exact"]["max_abs_logit_diff"] < 1e-4
    # original: the 16-bit checkpoint is not what training saw; the 4-bit error shows up
    assert reports["original"]["max_abs_logit_diff"] > 20 * reports["exact"]["max_abs_logit_diff"]
    assert reports["original"]["mean_kl"] > reports["exact"]["mean_kl"]


def test_exact_bf16_merge_is_within_bf16_rounding(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from fastsft.export.drift import held_out_examples, logits_of
    from fastsft.train.merge import load_trained_model, _run_settings

    out = qlora_run(tmp_path, "bf16")
    target = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--output", str(target)]) == 0  # exact, auto -> bf16
    report = json.loads((target / "merge_report.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(target)
    assert merged.dtype == torch.bfloat16 and report["dtype"] == "bfloat16"
    trained = load_trained_model(str(out / "base_model"), str(out), _run_settings(str(out)))
    from transformers import AutoTokenizer

    examples, _ = held_out_examples(str(out), AutoTokenizer.from_pretrained(out))
    scale = max(float(t.abs().max()) for t in logits_of(trained, examples))
    # the trained model itself computes in bf16: a few bf16 ulps of the largest logit
    assert report["max_abs_logit_diff"] <= 4 * scale * 2 ** -8
    assert report["mean_kl"] < 1e-4


def test_merge_refuses_bad_input_cleanly(tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base"}))
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not exist; pass --base DIR" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / ".tmp-x").exists()
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "x"), "--base-weights", "fp8"]) == 2
    assert "--base-weights 'fp8'" in capsys.readouterr().err


def test_the_merge_decodes_4bit_rows_shorter_than_a_block_exactly():
    """fastsft merge's base weights: the flat NF4 layout (fastsft_kernels' reference) for a (64, 32) weight in
    blocks of 64 -- within NF4's own rounding of the original weight, and equal to bitsandbytes' decode
    where its CPU kernel is right (rows of whole blocks)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from fastsft.train.merge import dequantized_base_state

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    weights = {}
    for name, (out_f, in_f) in {"short": (64, 32), "whole": (64, 128)}.items():
        w = torch.randn(out_f, in_f)
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
        model.add_module(name, layer.to("cpu"))
        weights[name] = w
    state = dequantized_base_state(model)
    for name, w in weights.items():
        blocks = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        error = (state[f"{name}.weight"] - w).reshape(-1, 64).abs()
        assert bool((error <= 0.16 * blocks).all()), name  # half the widest gap between NF4 codes (0.304)
    whole = model.whole.weight
    assert torch.equal(state["whole.weight"], bnb.functional.dequantize_4bit(whole.data, whole.quant_state))
