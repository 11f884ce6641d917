"""The fine-tuning stacks the end-to-end benchmark compares.

Each provider starts from the same random-weight model (e2e_models.build_model,
same seed, same LoRA/QLoRA settings, same dtype) and trains it with the same
step (train_step: forward with labels, backward, AdamW step). Providers differ
only in how the model runs and how a step's documents are laid out:

    hf         transformers + peft, SDPA attention, padded batches
    hf+liger   the same, with Liger-Kernel's patch for the architecture
    hf-packed  transformers padding-free packing (DataCollatorWithFlattening) with flash-attn
    fastsft    fastsft.patch_model on the peft model, packed batches (fastsft.data)
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Provider:
    name: str
    batch_format: str                          # e2e_data.BATCH_FORMATS
    description: str
    # why it cannot run here (None: it can); device is "cuda" or "cpu"
    unavailable: Callable[[str], Optional[str]]
    # attention implementation given to transformers, from the architecture's baseline choice
    attention: Callable[[object], str]
    # called before the model is built (class-level patches) and after (instance patches)
    before_build: Callable[[object], None]
    after_build: Callable[[object], object]


def _nothing(*_):
    return None


def _same(model):
    return model


def _baseline_attention(arch) -> str:
    return arch.hf_attention


# ---------------------------------------------------------------- hf+liger
def _liger_unavailable(device: str) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e '.[bench]')"
    if device != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


def _apply_liger(arch) -> None:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from .e2e_models import build_config

    model_type = build_config(arch).model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"Liger-Kernel has no patch for model type {model_type!r}")
    # defaults: RoPE, RMSNorm, SwiGLU/GeGLU and the fused linear cross-entropy loss
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]()


# ---------------------------------------------------------------- hf-packed
def _flash_unavailable(device: str) -> Optional[str]:
    if device != "cuda":
        return "flash-attn needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install -e '.[flash]')"
    return None


# ---------------------------------------------------------------- fastsft
def _fastsft_unavailable(device: str) -> Optional[str]:
    return None


def _apply_fastsft(model):
    import fastsft

    patched = fastsft.patch_model(model)
    return model if patched is None else patched


PROVIDERS = {
    p.name: p
    for p in (
        Provider("hf", "padded", "transformers + peft, SDPA attention (eager for Gemma-2), padded batches",
                 lambda device: None, _baseline_attention, _nothing, _same),
        Provider("hf+liger", "padded", "hf with Liger-Kernel's patch (RoPE, RMSNorm, SwiGLU, fused linear CE)",
                 _liger_unavailable, _baseline_attention, _apply_liger, _same),
        Provider("hf-packed", "flattened", "transformers padding-free packing with flash-attn 2",
                 _flash_unavailable, lambda arch: "flash_attention_2", _nothing, _same),
        Provider("fastsft", "packed", "fastsft.patch_model, packed batches (fastsft.data)",
                 _fastsft_unavailable, _baseline_attention, _nothing, _apply_fastsft),
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
    """`autocast-bf16` is transformers Trainer's bf16=True: ops run in bf16, fp32 adapters stay fp32."""
    if precision == "autocast-bf16":
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
