"""GGUF export round trip of trained tiny Llamas: a merged LoRA run and a QLoRA run folder exported directly
(merged on the way), loaded back with transformers' own GGUF loader; logits, the tokenizer's chat rendering,
and the command's refusals (one line, exit 2, nothing half-written). Every family: test_gguf_families.py."""
import json
import os

import pytest
import torch

from fastsft.cli import main


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from fastsft.demo_data import make_records, write_jsonl

    root = tmp_path_factory.mktemp("gguf")
    train, _ = make_records(24, 1, seed=2)
    write_jsonl(str(root / "train.jsonl"), train)
    (root / "run.yaml").write_text(
        "model: tiny-llama\nmodel_config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"learning_rate: 0.05\npatch_kernels: false\noutput_dir: {root / 'out'}\n")
    assert main(["train", str(root / "run.yaml")]) == 0
    assert main(["merge", "--adapter", str(root / "out"), "--output", str(root / "merged"), "--dtype", "fp32"]) == 0
    return root / "merged"


@pytest.mark.parametrize("qtype,bound", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 5e-2)])
def test_gguf_round_trip(merged, tmp_path, qtype, bound):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"model-{qtype}.gguf"
    assert main(["export", "gguf", str(merged), "--output", str(out), "--type", qtype]) == 0
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = torch.randint(5, ref.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits, back(ids).logits
    scale = float(a.abs().max())
    assert scale > 0.1  # the comparison is not of near-zero logits
    assert float((a - b).abs().max()) <= bound * scale  # f16/bf16: rounding of the weights; q8_0: 8-bit blocks
    tok, tok_back = AutoTokenizer.from_pretrained(merged), AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert tok_back.apply_chat_template(chat, tokenize=False) == text
    assert tok_back(text)["input_ids"] == tok(text)["input_ids"]
    assert tok_back.eos_token_id == tok.eos_token_id


def test_export_refuses_bad_input(merged, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(merged), "--output", str(out), "--type", "q3_x"]) == 2
    assert "--type 'q3_x'" in capsys.readouterr().err
    out.write_text("keep me")
    assert main(["export", "gguf", str(merged), "--output", str(out)]) == 2
    assert out.read_text() == "keep me" and "--overwrite" in capsys.readouterr().err
    cfg = (merged / "config.json").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(cfg.replace('"llama"', '"gpt2"'))
    assert main(["export", "gguf", str(tmp_path / "other"), "--output", str(tmp_path / "o.gguf")]) == 2
    assert "is not supported" in capsys.readouterr().err and not (tmp_path / "o.gguf").exists()
    assert main(["export", "gguf", str(tmp_path / "nowhere"), "--output", str(tmp_path / "n.gguf")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_export_from_a_lora_run_folder_equals_merge_then_export(merged, tmp_path, capsys):
    """`fastsft export gguf RUN_DIR` merges on the way (fp32) and writes what merge + export writes."""
    import gguf

    run = merged.parent / "out"
    direct, via_merge = tmp_path / "run.gguf", tmp_path / "merged.gguf"
    assert main(["export", "gguf", str(run), "--output", str(direct), "--type", "q8_0"]) == 0
    assert main(["export", "gguf", str(merged), "--output", str(via_merge), "--type", "q8_0"]) == 0
    a, b = gguf.GGUFReader(str(direct)), gguf.GGUFReader(str(via_merge))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and bytes(x.data) == bytes(y.data), x.name
    assert sorted(os.listdir(tmp_path)) == ["merged.gguf", "run.gguf"]  # the temporary merge is gone


def qlora_run(root):
    from fastsft.demo_data import make_records, write_jsonl

    train, _ = make_records(24, 1, seed=3)
    write_jsonl(str(root / "train.jsonl"), train)
    (root / "run.yaml").write_text(
        "model: tiny-llama\nmodel_config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 2, num_key_value_heads: 1}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        "max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 3\nprogress_bar: 'off'\nmode: qlora\nlora_r: 4\n"
        f"learning_rate: 0.05\nprecision: fp32\neval_at_start: false\noutput_dir: {root / 'out'}\n")
    assert main(["train", str(root / "run.yaml")]) == 0
    return root / "out"


@pytest.mark.usefixtures("reference_ops")  # tests/conftest.py
def test_export_from_a_qlora_run_folder_is_the_trained_model(tmp_path, capsys):
    """A QLoRA run folder exported directly: merged into the exact 4-bit base training saw, so the GGUF's
    logits are the trained model's (dequantized 4-bit base + adapter) up to f16 rounding of the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.export.drift import held_out_examples
    from fastsft.train.merge import _run_settings, dequantized_base_state, load_quantized_base, load_trained_model

    run = qlora_run(tmp_path)
    out = tmp_path / "gguf" / "model.gguf"
    out.parent.mkdir()
    assert main(["export", "gguf", str(run), "--output", str(out), "--type", "f16"]) == 0
    assert "GGUF written to" in capsys.readouterr().out
    settings = _run_settings(str(run))
    state = dequantized_base_state(load_quantized_base(str(run / "base_model"), settings))
    trained = load_trained_model(str(run / "base_model"), str(run), settings, state).eval()
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    examples, _ = held_out_examples(str(run), AutoTokenizer.from_pretrained(run))
    ids = torch.tensor([examples[0]])
    with torch.no_grad():
        a, b = trained(ids).logits, back(ids).logits
    scale = float(a.abs().max())
    assert scale > 0.1
    exact = float((a - b).abs().max())
    assert exact <= 5e-3 * scale  # f16 weights; the 4-bit base is not re-rounded
    # the 16-bit checkpoint instead: the quantization error training never saw shows up
    original = tmp_path / "gguf" / "original.gguf"
    assert main(["export", "gguf", str(run), "--output", str(original), "--base-weights", "original"]) == 0
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=original.name, dtype=torch.float32)
    with torch.no_grad():
        assert float((a - back(ids).logits).abs().max()) > 5 * exact


def test_export_refuses_an_adapter_whose_base_is_gone(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base"}))
    out = tmp_path / "a.gguf"
    assert main(["export", "gguf", str(tmp_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist; pass --base DIR" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".fastsft-merge")]


@pytest.mark.usefixtures("reference_ops")  # tests/conftest.py
def test_export_from_a_full_run_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from fastsft.demo_data import make_records, write_jsonl

    train, _ = make_records(16, 1, seed=4)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    (tmp_path / "run.yaml").write_text(
        "model: tiny-llama\nmodel_config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        "max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nprogress_bar: 'off'\nmode: full\n"
        f"learning_rate: 0.01\neval_at_start: false\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    out = tmp_path / "gguf" / "full.gguf"
    out.parent.mkdir()
    assert main(["export", "gguf", str(tmp_path / "out"), "--output", str(out), "--type", "f32"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ids = torch.randint(5, 250, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ref(ids).logits, back(ids).logits
    assert float(a.abs().max()) > 0.1
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())  # f32: exact up to summation order
