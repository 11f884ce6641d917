"""The saved adapter folder is a plain peft adapter: same adapter_config.json keys and tensor names as peft's
own saving of the same LoRA, loads in plain peft, and carries the tokenizer with its chat template."""
import json

import pytest
from safetensors import safe_open

from fastsft.cli import main
from fastsft.demo_data import make_records, write_jsonl

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py
TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"


def test_adapter_folder_matches_peft_own_saving(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, _ = make_records(24, 1, seed=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    (tmp_path / "run.yaml").write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"output_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    out = tmp_path / "out"
    ours = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    reference = get_peft_model(base, LoraConfig(r=ours["r"], lora_alpha=ours["lora_alpha"], task_type="CAUSAL_LM",
                                                target_modules=ours["target_modules"]))
    reference.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)  # no fastsft-only keys, none missing
    assert ours["peft_type"] == "LORA" and ours["task_type"] == "CAUSAL_LM"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(".lora_" in k for k in a.keys())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), str(out))
    assert any(float(p.abs().sum()) > 0 for n, p in loaded.named_parameters() if "lora_B" in n)  # trained
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token is not None
