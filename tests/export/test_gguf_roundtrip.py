"""GGUF export round trip: write a merged tiny Llama with `fastsft export gguf`, load it back with transformers'
own GGUF loader, compare logits and the tokenizer's chat rendering."""
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
    assert "not supported yet" in capsys.readouterr().err and not (tmp_path / "o.gguf").exists()
