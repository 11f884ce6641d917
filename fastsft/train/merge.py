"""`fastsft merge`: fold a LoRA adapter into its base model and save a plain transformers model."""
from __future__ import annotations

import json
import os
from typing import Optional

from fastsft.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp16")


def _base_path(adapter_dir: str, recorded: Optional[str], override: Optional[str]) -> str:
    if override:
        return override
    if not recorded:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model; pass --base")
    if os.path.isdir(recorded) or not (recorded.startswith("/") or recorded.startswith(".")):
        return recorded  # a directory, or a hub name
    # a tiny-llama run stores its base next to the adapter; the run folder may have moved since
    moved = os.path.join(adapter_dir, os.path.basename(recorded.rstrip("/")))
    if os.path.isdir(moved):
        return moved
    raise ConfigError(f"the adapter's base model {recorded!r} does not exist; pass --base DIR")


def merge_adapter(adapter_dir: str, output_dir: str, *, dtype: str = "auto", base: Optional[str] = None) -> str:
    """Write base + adapter merged into `output_dir` (safetensors + config + tokenizer). Returns output_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"--adapter {adapter_dir!r} holds no adapter_config.json (is it a LoRA/QLoRA output_dir or checkpoint?)")
    with open(config_path, encoding="utf-8") as handle:
        adapter_config = json.load(handle)
    base_path = _base_path(adapter_dir, adapter_config.get("base_model_name_or_path"), base)
    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # the base is loaded unquantized even for a QLoRA adapter: merging into 4-bit weights would round the update away
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, adapter_dir)
    merged = model.merge_and_unload()
    os.makedirs(output_dir, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True)
    has_tokenizer = any(os.path.isfile(os.path.join(adapter_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base_path)
    tokenizer.save_pretrained(output_dir)
    return output_dir
