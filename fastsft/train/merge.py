"""`fastsft merge`: fold a LoRA / QLoRA adapter into its base model and save a plain transformers model.

A QLoRA adapter was trained against the 4-bit base, not against the 16-bit checkpoint it was quantized
from. `base_weights="exact"` (the default) merges into bitsandbytes' own dequantization of that 4-bit
base, adds the LoRA update in fp32 and rounds once to the output dtype; "original" merges into the
16-bit checkpoint (the model drifts by the quantization error). Either way the merged model's logits are
compared with the trained model's (4-bit base + adapter) and the drift is written to merge_report.json.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional

from fastsft.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp16")
BASE_WEIGHTS = ("exact", "original")
log = logging.getLogger("fastsft.merge")


def _base_path(adapter_dir: str, recorded: Optional[str], override: Optional[str]) -> str:
    if override:
        return override
    if not recorded:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model; pass --base")
    if os.path.isdir(recorded) or not (recorded.startswith("/") or recorded.startswith(".")):
        return recorded  # a directory, or a hub name
    # a tiny-llama run stores its base next to the adapter; the run folder may have moved since
    for folder in (adapter_dir, os.path.dirname(os.path.dirname(os.path.abspath(adapter_dir)))):
        moved = os.path.join(folder, os.path.basename(recorded.rstrip("/")))
        if os.path.isdir(moved):
            return moved
    raise ConfigError(f"the adapter's base model {recorded!r} does not exist; pass --base DIR")


def _run_settings(adapter_dir: str) -> dict:
    """mode, precision and 4-bit settings of the run that trained the adapter (empty: no fastsft run)."""
    import yaml

    from fastsft.export.drift import find_run_config

    path = find_run_config(adapter_dir)
    if path is None:
        return {}
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def _compute_dtype(settings: dict):
    """The dtype the run computed in (the 4-bit base was dequantized to it)."""
    import torch

    name = settings.get("precision", "auto")
    if name == "auto":  # resolve_precision: bf16 on a bf16 GPU, fp16 on an older one, fp32 on CPU
        device = settings.get("device", "auto")
        if device == "cpu" or not torch.cuda.is_available():
            name = "fp32"
        else:
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_quantized_base(base_path: str, settings: dict):
    """The base exactly as a QLoRA run loads it: bitsandbytes 4-bit (quantized here on CPU; the blockwise
    absmax quantization is deterministic, so the codes are those the run trained against)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = _compute_dtype(settings)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(settings.get("bnb_4bit_use_double_quant", True)),
        bnb_4bit_compute_dtype=compute,
    )
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=compute, quantization_config=quant,
                                                device_map={"": "cpu"},
                                                trust_remote_code=bool(settings.get("trust_remote_code", False)))


def dequantized_base_state(quantized) -> dict:
    """Every base weight as the trained model multiplied by it: Linear4bit weights decoded by
    fastsft_kernels' reference dequantize (the layout fastsft's LoRA kernels read before their matmul;
    equal to bitsandbytes' CUDA dequantize, while its AVX-512 CPU kernel in 0.50 decodes rows that are not
    a whole number of blocks wrong), the rest as loaded."""
    import bitsandbytes as bnb
    from fastsft_kernels.reference import dequantize_4bit

    state = {}
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            state[f"{name}.weight"] = dequantize_4bit(weight.data, weight.quant_state)
    for name, param in quantized.named_parameters():
        state.setdefault(name, param.detach())
    return state


def _model_with_state(base_path: str, state: Optional[dict], dtype, settings: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype,
                                                 trust_remote_code=bool(settings.get("trust_remote_code", False)))
    if state is not None:
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise ConfigError(f"the 4-bit base's weights do not match {base_path!r}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
    return model


def load_trained_model(base_path: str, adapter_dir: str, settings: dict, state: Optional[dict] = None):
    """The model as training computed it: the base in the compute dtype (QLoRA: `state`, the dequantized
    4-bit base) plus the adapter. bitsandbytes' own CPU forward is not the reference: it runs a bf16
    GEMV whatever the compute dtype, which training on a GPU never did."""
    from peft import PeftModel

    model = _model_with_state(base_path, state, _compute_dtype(settings), settings)
    return PeftModel.from_pretrained(model, adapter_dir)


def merge_adapter(adapter_dir: str, output_dir: str, *, dtype: str = "auto", base: Optional[str] = None,
                  base_weights: str = "exact", overwrite: bool = False, report_drift: bool = True) -> dict:
    """Write base + adapter merged into `output_dir` (safetensors + config + tokenizer + merge_report.json).

    Written under a temporary name and renamed at the end: an interrupted merge leaves nothing under
    `output_dir`. Returns the drift report.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.export import drift

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if base_weights not in BASE_WEIGHTS:
        raise ConfigError(f"--base-weights {base_weights!r} is not one of {', '.join(BASE_WEIGHTS)}")
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"--adapter {adapter_dir!r} holds no adapter_config.json (is it a LoRA/QLoRA output_dir or checkpoint?)")
    with open(config_path, encoding="utf-8") as handle:
        adapter_config = json.load(handle)
    base_path = _base_path(adapter_dir, adapter_config.get("base_model_name_or_path"), base)
    settings = _run_settings(adapter_dir)
    qlora = settings.get("mode") == "qlora"
    wanted = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    has_tokenizer = any(os.path.isfile(os.path.join(adapter_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base_path)

    state = dequantized_base_state(load_quantized_base(base_path, settings)) if qlora else None
    trained = load_trained_model(base_path, adapter_dir, settings, state) if report_drift else None
    if qlora and base_weights == "exact":
        out_dtype = wanted or _compute_dtype(settings)
        model = _model_with_state(base_path, state, torch.float32, settings)
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()  # the update is added in fp32
        merged = merged.to(out_dtype)  # rounded once
    else:
        # "original": the 16-bit checkpoint (a LoRA adapter was trained on exactly that)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=wanted or "auto")
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()

    report = {"adapter": os.path.abspath(adapter_dir), "base": base_path, "mode": settings.get("mode", "lora"),
              "base_weights": base_weights if qlora else "original",
              "dtype": str(next(merged.parameters()).dtype).replace("torch.", "")}
    if report_drift:
        examples, source = drift.held_out_examples(adapter_dir, tokenizer)
        numbers = drift.compare_logits(drift.logits_of(trained, examples), drift.logits_of(merged, examples))
        report.update(numbers, examples=len(examples), example_source=source,
                      reference="dequantized 4-bit base + adapter" if qlora else "base + adapter")
        log.info(drift.drift_line(report))
    del trained, state

    output_dir = output_dir.rstrip("/")
    tmp = os.path.join(os.path.dirname(os.path.abspath(output_dir)), f".tmp-{os.path.basename(output_dir)}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        drift.write_report(tmp, report)
        if os.path.exists(output_dir):
            if not overwrite and os.listdir(output_dir):
                raise ConfigError(f"--output {output_dir!r} is not empty: pass --overwrite")
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
