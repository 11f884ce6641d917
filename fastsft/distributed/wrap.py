"""Wrap the model the builder returns for data parallelism: DDP or FSDP2 (``fully_shard``).

``distributed: auto`` picks DDP for LoRA / QLoRA (the frozen base is replicated,
only the adapter gradients are all-reduced) and FSDP2 for full fine-tuning
(parameters, gradients and optimizer state sharded). ``distributed: fsdp`` also
shards a LoRA / QLoRA base. Gradients are *summed* across ranks (not averaged):
every rank's loss is already divided by the trained-token count of the whole
global window, so the sum is the single-process gradient.
"""
from __future__ import annotations

import logging
from typing import List

import torch
import torch.distributed as dist

from fastsft.errors import ConfigError

logger = logging.getLogger("fastsft.distributed")

STRATEGIES = ("auto", "ddp", "fsdp")


def resolve_strategy(config) -> str:
    choice = getattr(config, "distributed", "auto")
    if choice == "auto":
        return "fsdp" if config.mode == "full" else "ddp"
    return choice


def _sum_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids)
    wrapped.register_comm_hook(None, _sum_allreduce_hook)
    return wrapped


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The transformer blocks (transformers' ``_no_split_modules`` classes): one FSDP unit each."""
    from fastsft.patch import base_model_of

    names = set(getattr(base_model_of(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"distributed: fsdp cannot find the decoder layers of {type(base_model_of(model)).__name__} "
            f"(no modules of its _no_split_modules {sorted(names)}); use distributed: ddp"
        )
    return layers


def _bnb_linear4bit_class():
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - a dependency
        return None
    return bnb.nn.Linear4bit


def _prepare_4bit_for_fsdp(model: torch.nn.Module, config) -> None:
    """Let the fused LoRA kernel read the all-gathered 4-bit weights.

    FSDP2 turns each Params4bit into a plain DTensor, and the weight it all-gathers
    for the forward is a plain tensor without bitsandbytes' ``quant_state``. A
    forward pre-hook on each LoRA layer puts the quant_state (captured before
    sharding) back on the all-gathered weight, inside FSDP's all-gather window,
    so fastsft's NF4/FP4 LoRA kernel dequantizes the unsharded packed weight.
    bitsandbytes' own 4-bit forward is not run under FSDP2: measured on this
    torch/bitsandbytes, it loses the quantization state and gives a wrong loss
    from the second forward on. A pre-hook on every Linear4bit turns that path into
    a clear error instead of a silently wrong run.
    """
    linear4bit = _bnb_linear4bit_class()
    if linear4bit is None:
        return
    quantized = {id(m): m for m in model.modules() if isinstance(m, linear4bit)}
    if not quantized:
        return
    if not config.patch_kernels:
        raise ConfigError(
            "mode: qlora with distributed: fsdp needs patch_kernels: true (bitsandbytes' own 4-bit forward "
            "loses its quantization state under FSDP2 all-gathers); set patch_kernels: true or distributed: ddp"
        )
    covered = set()
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and id(base) in quantized:
            covered.add(id(base))
            quant_state = base.weight.quant_state
            module.register_forward_pre_hook(_restore_quant_state(base, quant_state))
    bare = [m for key, m in quantized.items() if key not in covered]
    if bare:
        raise ConfigError(
            f"mode: qlora with distributed: fsdp needs a LoRA adapter on every 4-bit linear layer "
            f"({len(bare)} have none): set lora_target_modules: all-linear, or use distributed: ddp"
        )
    for module in quantized.values():
        module.register_forward_pre_hook(_refuse_bnb_forward)


def _restore_quant_state(base: torch.nn.Module, quant_state):
    def hook(module, args):
        weight = base.weight  # the all-gathered (unsharded) packed weight inside FSDP's window
        if getattr(weight, "quant_state", None) is None:
            weight.quant_state = quant_state
    return hook


def _refuse_bnb_forward(module, args):
    raise RuntimeError(
        "bitsandbytes' 4-bit forward ran under FSDP2 (the fused LoRA kernel fell back to peft for this layer, "
        "see the 'fastsft lora' log line): this loses the quantization state and is not supported; "
        "use distributed: ddp for this run"
    )


def wrap_fsdp(model: torch.nn.Module, config, device: torch.device, compute_dtype: torch.dtype) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if config.precision == "fp16" or compute_dtype == torch.float16:
        raise ConfigError("distributed: fsdp does not support precision fp16 (its grad scaler is not sharded); "
                          "use bf16, or distributed: ddp")
    _prepare_4bit_for_fsdp(model, config)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute: parameters all-gathered in bf16, gradients reduced in fp32; integer (4-bit
    # packed) parameters are never cast by FSDP2, so they shard as they are stored
    low = compute_dtype if compute_dtype != torch.float32 else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    units = decoder_layers(model) + [model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    for unit in units:  # a plain SUM reduce-scatter (see the module docstring); gloo has no PREMUL_SUM
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def wrap_model(model: torch.nn.Module, config, device: torch.device, compute_dtype: torch.dtype) -> tuple:
    """(wrapped model, strategy name)."""
    strategy = resolve_strategy(config)
    if strategy == "ddp":
        return wrap_ddp(model, device), strategy
    return wrap_fsdp(model, config, device, compute_dtype), strategy


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP (FSDP2 wraps in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def full_tensor(value):
    """A DTensor's global value (a no-op on plain tensors)."""
    to_full = getattr(value, "full_tensor", None)
    return to_full() if callable(to_full) else value


__all__ = ["STRATEGIES", "resolve_strategy", "wrap_model", "unwrap", "decoder_layers", "full_tensor"]
