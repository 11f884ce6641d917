"""Optimizer (torch AdamW, bitsandbytes 8-bit / paged AdamW) and learning-rate schedule."""
from __future__ import annotations

import math
from typing import Iterable, List

import torch

from fastsft.errors import ConfigError


def _param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters (check 'mode' and 'lora_target_modules')")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if config.optimizer == "adamw":
        device = groups[0]["params"][0].device
        # torch's fused AdamW (one kernel for all parameters) where the device has it
        fused = device.type in ("cuda", "cpu") and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16) for g in groups for p in g["params"]
        )
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ConfigError(f"optimizer {config.optimizer!r} needs bitsandbytes ({exc})") from None
    classes = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
    }
    return classes[config.optimizer](groups, **kwargs)


def warmup_steps_for(config, total_steps: int) -> int:
    if config.warmup_steps > 0:
        return int(config.warmup_steps)
    return int(math.ceil(config.warmup_ratio * total_steps))


def lr_factor(step: int, *, kind: str, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate for the update number `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # guarded by the config's choices
        raise ConfigError(f"lr_scheduler {kind!r} is not one of linear, cosine, constant")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int):
    warmup = warmup_steps_for(config, total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, kind=config.lr_scheduler, warmup=warmup, total=total_steps, min_ratio=config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_parameters(model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
