"""The fine-tuning stacks the end-to-end benchmark compares.

Every provider loads the same random-weight checkpoint (e2e_models.save_random_model: saved once to a
local folder, so every stack loads, quantizes and wraps it its own way, the way its users would) with the
same LoRA/QLoRA settings (rank, alpha, dropout 0, the seven projections of every decoder layer), the same
seed, the same activation checkpointing setting, and trains it with the same step (train_step: forward
with labels under torch.autocast(bf16) on a GPU, backward, AdamW). Providers differ in how the model is
built and run and in how a step's documents are laid out:

    hf         the standard transformers + peft recipe: AutoModelForCausalLM.from_pretrained (QLoRA:
               BitsAndBytesConfig NF4 with double quantization and bf16 compute, then peft's
               prepare_model_for_kbit_training), get_peft_model, SDPA attention, padded batches
    hf+liger   hf with Liger-Kernel's patch for the architecture, applied before loading
    hf-packed  hf with flash-attn 2 and transformers' padding-free packing (DataCollatorWithFlattening)
    fastsft    the trainer's own builder, fastsft.train.model.load_model, from a TrainConfig: exactly the
               model `fastsft train` trains (patched with fastsft.patch_model), packed batches
    unsloth    Unsloth's recommended path: FastLanguageModel.from_pretrained + get_peft_model,
               use_gradient_checkpointing="unsloth", padding-free packing (packed_seq_lengths)
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .e2e_models import LORA_TARGETS


@dataclass(frozen=True)
class Provider:
    name: str
    batch_format: str                          # e2e_data.BATCH_FORMATS
    description: str                           # what it runs (the README says the same)
    # why it cannot run here (None: it can); device is "cuda" or "cpu"
    unavailable: Callable[[str], Optional[str]]
    # the model, ready to train, from the saved checkpoint folder job["model_dir"]
    build: Callable[[dict], torch.nn.Module]
    # distributions whose versions the result records for this provider
    packages: tuple = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
    # called in the worker before anything else is imported (Unsloth must come first)
    first_import: Callable[[], None] = lambda: None


def versions(packages) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def compute_dtype(job: dict) -> torch.dtype:
    return torch.float32 if job["precision"] == "fp32" else torch.bfloat16


def _device_map(job: dict):
    return {"": 0} if job["device"] == "cuda" else {"": "cpu"}


def lora_config(job: dict):
    from peft import LoraConfig

    return LoraConfig(r=job["lora_rank"], lora_alpha=job["lora_alpha"], lora_dropout=0.0, bias="none",
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


# ---------------------------------------------------------------- hf: the transformers + peft recipe
def hf_recipe(job: dict, attn_implementation: str):
    """What a transformers + peft user writes (the Trainer's bf16=True mixed precision):
    full: fp32 weights; lora: the base in bf16, fp32 adapters; qlora: BitsAndBytesConfig NF4 (double
    quantization, bf16 compute), prepare_model_for_kbit_training, fp32 adapters."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from .e2e_models import enable_gradient_checkpointing

    dtype = compute_dtype(job)
    # loaded straight onto the device (device_map), as the recipe does
    kwargs = dict(attn_implementation=attn_implementation, device_map=_device_map(job))
    if job["mode"] == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype), dtype=dtype)
    else:
        kwargs["dtype"] = torch.float32 if job["mode"] == "full" else dtype
    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], **kwargs)
    model.config.use_cache = False
    if job["mode"] == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job["grad_ckpt"],
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if job["mode"] == "full":
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, lora_config(job))
    if job["grad_ckpt"] and job["mode"] != "qlora":
        enable_gradient_checkpointing(model, offload=False)  # the Trainer's gradient_checkpointing=True
    return model


def _hf_build(job):
    from .e2e_models import get_arch

    return hf_recipe(job, get_arch(job["model"]).hf_attention)


# ---------------------------------------------------------------- hf+liger
def _liger_unavailable(device: str) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e '.[bench]')"
    if device != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


def _liger_build(job):
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from .e2e_models import build_config, get_arch

    arch = get_arch(job["model"])
    model_type = build_config(arch).model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"Liger-Kernel has no patch for model type {model_type!r}")
    # class-level patch before loading, Liger's defaults: RoPE, RMSNorm, SwiGLU/GeGLU, fused linear CE
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]()
    return hf_recipe(job, arch.hf_attention)


# ---------------------------------------------------------------- hf-packed
def _flash_unavailable(device: str) -> Optional[str]:
    if device != "cuda":
        return "flash-attn needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install -e '.[flash]')"
    return None


# ---------------------------------------------------------------- fastsft: the trainer's own builder
def trainer_config(job: dict):
    """The TrainConfig `fastsft train` would get for this benchmark job."""
    from fastsft.config import TrainConfig

    return TrainConfig(model=job["model_dir"], mode=job["mode"], lora_r=job["lora_rank"],
                       lora_alpha=float(job["lora_alpha"]), lora_dropout=0.0,
                       lora_target_modules=list(LORA_TARGETS), precision=job["precision"],
                       gradient_checkpointing=bool(job["grad_ckpt"]), device=job["device"], seed=job["seed"],
                       max_seq_length=max(job["seq"], job.get("max_context_cap") or 0), patch_kernels=True)


def _fastsft_build(job):
    # looked up at call time, so that a test can spy on the trainer's builder
    from fastsft.train import model as trainer_model

    config = trainer_config(job)
    device = trainer_model.resolve_device(config)
    precision = trainer_model.resolve_precision(config, device)
    torch.manual_seed(job["seed"])
    return trainer_model.load_model(job["model_dir"], config, device, precision)


# ---------------------------------------------------------------- unsloth
UNSLOTH_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_SKIP_TORCHVISION_CHECK": "1", "UNSLOTH_SKIP_TRANSFORMERS_DEPENDENCY_CHECK": "1",
    "HF_HUB_ENABLE_HF_TRANSFER": "0",
}


def _unsloth_unavailable(device: str) -> Optional[str]:
    if device != "cuda":
        return "Unsloth needs a CUDA GPU to import (it raises at import time without one)"
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (benchmarks/device_wheels.sh carries it to the GPU machine)"
    return None


class NetworkBlocked(RuntimeError):
    pass


def block_network() -> None:
    """Any connection to a non-local address fails at once with one clear line (the GPU machine has no
    network: a library that reaches out would otherwise hang until its own timeout)."""
    original = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("localhost", "127.0.0.1", "::1") and self.family != socket.AF_UNIX:
            raise NetworkBlocked(f"unsloth provider: a network connection to {address!r} was attempted with "
                                 f"the hub offline (HF_HUB_OFFLINE=1); refusing it")
        return original(self, address)

    socket.socket.connect = connect


def _unsloth_first_import() -> None:
    os.environ.update(UNSLOTH_ENV)
    block_network()
    import unsloth  # noqa: F401  (Unsloth patches transformers and peft when imported first)


def _unsloth_build(job):
    from unsloth import FastLanguageModel

    full = job["mode"] == "full"
    ckpt = "unsloth" if job["grad_ckpt"] else False
    torch.manual_seed(job["seed"])
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=job["model_dir"], max_seq_length=max(job["seq"], job.get("max_context_cap") or 0),
        dtype=compute_dtype(job), load_in_4bit=job["mode"] == "qlora", full_finetuning=full,
        use_gradient_checkpointing=ckpt, local_files_only=True, random_state=job["seed"])
    if not full:
        model = FastLanguageModel.get_peft_model(
            model, r=job["lora_rank"], lora_alpha=job["lora_alpha"], lora_dropout=0.0, bias="none",
            target_modules=list(LORA_TARGETS), use_gradient_checkpointing=ckpt, random_state=job["seed"])
    model.config.use_cache = False
    return model


PROVIDERS = {
    p.name: p
    for p in (
        Provider("hf", "padded", "transformers + peft recipe (QLoRA: BitsAndBytesConfig NF4 + "
                 "prepare_model_for_kbit_training), SDPA attention (eager for Gemma-2), padded batches",
                 lambda device: None, _hf_build),
        Provider("hf+liger", "padded", "hf with Liger-Kernel's patch (RoPE, RMSNorm, SwiGLU, fused linear CE)",
                 _liger_unavailable, _liger_build, packages=("torch", "transformers", "peft", "bitsandbytes",
                                                             "liger-kernel")),
        Provider("hf-packed", "flattened", "hf with flash-attn 2 and padding-free packing "
                 "(DataCollatorWithFlattening)", _flash_unavailable,
                 lambda job: hf_recipe(job, "flash_attention_2"),
                 packages=("torch", "transformers", "peft", "bitsandbytes", "flash-attn")),
        Provider("fastsft", "packed", "fastsft.train.model.load_model from a TrainConfig (the model `fastsft "
                 "train` trains, patched by fastsft.patch_model), packed batches (fastsft.data)",
                 lambda device: None, _fastsft_build,
                 packages=("torch", "triton", "transformers", "peft", "bitsandbytes")),
        Provider("unsloth", "packed-lengths", "Unsloth FastLanguageModel.from_pretrained + get_peft_model, "
                 "gradient checkpointing 'unsloth', padding-free packing (packed_seq_lengths)",
                 _unsloth_unavailable, _unsloth_build, first_import=_unsloth_first_import,
                 packages=("torch", "triton", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo",
                           "xformers")),
    )
}
BASELINE = "hf"


def get_providers(names) -> list:
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    return [PROVIDERS[n] for n in names]


# ---------------------------------------------------------------- the training step
def make_optimizer(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, foreach=True)


def autocast_context(device: str, precision: str):
    """bf16 mixed precision, as `fastsft train --precision bf16` and the Trainer's bf16=True run it."""
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, batch: dict, *, device: str, precision: str) -> torch.Tensor:
    """One optimizer step on one batch, identical for every provider; returns the detached loss."""
    with autocast_context(device, precision):
        loss = model(**batch).loss
    if loss is None:
        raise RuntimeError("the model returned no loss for a batch with labels")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
