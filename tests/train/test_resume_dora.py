"""DoRA with LoRA dropout through the trainer: a run resumed from a checkpoint gives the losses of
the uninterrupted run bit for bit (the dropout masks come from the torch RNG the checkpoint keeps),
and the saved adapter is peft's DoRA adapter. (Reference ops: the masks are drawn by lora_linear_ex's
own draw_dropout_mask on either path.)"""
import json
import os

from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl
from fastsft.train import Trainer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def _config(tmp_path, out, **values):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(str(data), make_records(40, 1, seed=1)[0])
    return load_config(None, model="tiny-llama", model_config=TINY, tokenizer_vocab_size=300, dataset=str(data),
                       max_seq_length=64, batch_tokens=128, learning_rate=1e-2, lr_scheduler="constant",
                       output_dir=str(tmp_path / out), progress_bar="off", seed=0, mode="lora", lora_r=4,
                       lora_alpha=8, use_dora=True, lora_dropout=0.1,
                       cpu_ops="patched",  # runs compared bit for bit: no per-run timing choice of ops
                       **values)


def test_dora_dropout_resume_is_exact_and_saves_a_peft_dora_adapter(tmp_path, reference_ops):
    full = Trainer(_config(tmp_path, "a", max_steps=6)).train()
    assert full.status == "completed" and len(set(full.losses)) == 6
    first = Trainer(_config(tmp_path, "b", max_steps=3, save_steps=3)).train()
    second = Trainer(_config(tmp_path, "b", max_steps=6, resume=True)).train()
    assert second.global_step == 6
    assert first.losses + second.losses == full.losses  # bit-identical on CPU, fp32
    adapter = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["lora_dropout"] == 0.1
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "b", "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in key for key in saved)
