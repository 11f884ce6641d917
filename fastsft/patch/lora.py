"""Route peft LoRA layers through ``fastsft_kernels.lora_linear``.

``apply(model)`` replaces ``forward`` on each eligible peft ``LoraLayer`` instance
(a ``Linear`` base or a bitsandbytes ``Linear4bit`` base) with one fused call; the
class is never touched, so merge/unmerge, ``merge_and_unload`` and
``save_pretrained`` work exactly as in peft. ``revert(model)`` deletes the
instance attribute, restoring peft's forward.

Per call, the fast path runs only when it computes what peft would: one active
adapter, not merged, adapters enabled, plain LoRA or DoRA (no other variant), no
per-sample ``adapter_names``, rank <= 128. Under torch.autocast the dense path
computes in the autocast dtype, as ``F.linear`` would. Otherwise that call takes
peft's own forward and the reason is logged once per layer. DoRA, dropout in
training and a LoRA bias run through ``lora_linear_ex`` (peft's formulas, see
``fastsft_kernels.lora_dora``); plain calls through ``lora_linear``.

Layers that share x in Llama-family attention (q/k/v) and MLPs (gate/up) are then
wired into groups that run as one ``lora_linear_fused`` call (``lora_fused``).
"""
from __future__ import annotations

import logging
import types
from typing import List, Optional

import torch

logger = logging.getLogger("fastsft")

_PATCHED = "_fastsft_lora_patched"
_NAME = "_fastsft_lora_name"
_LOGGED = "_fastsft_lora_logged"
_IS_4BIT = "_fastsft_lora_4bit"
_GROUP = "_fastsft_lora_group"  # (lora_fused.ProjectionGroup, index) on members of a fused group


def _peft_classes():
    """(peft lora Linear, peft lora Linear4bit or None, LoraLayer) -- None when peft is missing."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear, LoraLayer
    except ImportError:
        return None
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except (ImportError, AttributeError):  # bitsandbytes missing: peft defines no Linear4bit
        LoraLinear4bit = None
    return LoraLinear, LoraLinear4bit, LoraLayer


def _is_bnb_4bit(layer: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(layer, bnb.nn.Linear4bit)


def _static_reason(module: torch.nn.Module, classes) -> Optional[str]:
    """Why this LoraLayer can never use the fast path (None when it can)."""
    lora_linear_cls, lora_4bit_cls, _ = classes
    base = module.get_base_layer()
    if lora_4bit_cls is not None and isinstance(module, lora_4bit_cls):
        if not _is_bnb_4bit(base):
            return f"base layer {type(base).__name__} is not a bitsandbytes Linear4bit"
        return None
    if type(module) is not lora_linear_cls:
        dora = " with DoRA" if any(getattr(module, "use_dora", {}).values()) else ""
        return f"{type(module).__name__} LoRA layers{dora} are not supported (only Linear and Linear4bit bases)"
    if type(base) is not torch.nn.Linear:
        return f"base layer {type(base).__name__} is not a torch.nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weights) is not supported"
    return None


def _call_reason(module: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> Optional[str]:
    """Why this call must take peft's path (None when the fused kernel computes the same thing)."""
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    if kwargs.get("adapter_names") is not None:
        return "per-sample adapter_names"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused path runs exactly one)"
    name = active[0]
    variant = getattr(module, "lora_variant", {}).get(name)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return f"LoRA variant {type(variant).__name__}"
    if module.use_dora.get(name, False) and name not in getattr(module, "lora_magnitude_vector", {}):
        return "DoRA without a magnitude vector"
    if getattr(module, "lora_bias", {}).get(name, False) and module.lora_B[name].bias is None:
        return "lora_bias=True without a lora_B bias"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)) and dropout.training:
        return f"dropout module {type(dropout).__name__}"  # eval: any dropout module is the identity
    if module.lora_A[name].weight.shape[0] > 128:
        return f"rank {module.lora_A[name].weight.shape[0]} > 128"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"input dtype {x.dtype}"
    autocast = _autocast_dtype(x)
    if autocast is not None and autocast not in (torch.float16, torch.bfloat16, torch.float32):
        return f"autocast dtype {autocast}"
    base = module.get_base_layer()
    weight = base.weight
    if module.__dict__.get(_IS_4BIT):
        if getattr(weight, "quant_state", None) is None:
            return "4-bit weight has no quant_state"
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return "bitsandbytes repacked this 4-bit weight for its CPU kernel"
    elif autocast is None and weight.dtype != x.dtype:
        return f"input dtype {x.dtype} differs from the base weight dtype {weight.dtype}"
    if x.device != weight.device:
        return "input and weight on different devices"
    return None


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in effect for x's device, or None when autocast is off."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _log_once(module: torch.nn.Module, reason: str) -> None:
    logged = module.__dict__.setdefault(_LOGGED, set())
    if reason not in logged:
        logged.add(reason)
        logger.info("fastsft lora: %s: peft path for this call (%s)", module.__dict__.get(_NAME, "?"), reason)


def _kernel_args(self, x: torch.Tensor) -> dict:
    """What fastsft_kernels.lora_linear needs for this layer and input (call only when eligible).

    Returns x as the kernel must see it ("x", cast to the compute dtype), the
    weight / quant_state / bias / adapter, and "out_dtype" (the dtype peft returns,
    None when it is x's). Dense under autocast: x, W and bias in the autocast dtype,
    as F.linear would do. bitsandbytes Linear4bit: its compute_dtype, output back in
    x's dtype, as Linear4bit.forward does.
    """
    name = next(a for a in self.active_adapters if a in self.lora_A)
    base = self.get_base_layer()
    weight = base.weight
    args = dict(lora_a=self.lora_A[name].weight, lora_b=self.lora_B[name].weight,
                scaling=float(self.scaling[name]), quant_state=None, out_dtype=None, x=x,
                extras=_extras(self, name))
    if not self.__dict__.get(_IS_4BIT):  # dense nn.Linear base
        bias = base.bias
        autocast = _autocast_dtype(x)
        if autocast is not None:
            args["x"], weight = x.to(autocast), weight.to(autocast)
            bias = bias.to(autocast) if bias is not None else None
        args.update(weight=weight, bias=bias)
        return args
    if not getattr(base, "compute_type_is_set", True):
        base.set_compute_type(x)
        base.compute_type_is_set = True
    compute = base.compute_dtype or x.dtype
    args.update(x=x.to(compute), weight=weight.data, quant_state=weight.quant_state,
                bias=base.bias.to(compute) if base.bias is not None else None,
                out_dtype=x.dtype if compute != x.dtype else None)
    return args


def _extras(self, name: str) -> dict:
    """DoRA magnitude, active dropout p and LoRA bias of adapter ``name`` (as peft's forward reads them).

    Plain LoRA drops out when its nn.Dropout is in training mode; DoRA when the layer is
    (peft's DoraLinearVariant tests ``module.training``)."""
    dropout = self.lora_dropout[name]
    dora = bool(self.use_dora.get(name, False))
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    active = (self.training if dora else dropout.training) and p > 0
    return dict(magnitude=self.lora_magnitude_vector[name].weight if dora else None,
                dropout_p=p if active else 0.0,
                lora_bias=self.lora_B[name].bias if getattr(self, "lora_bias", {}).get(name, False) else None)


def has_extras(extras: dict) -> bool:
    return extras["magnitude"] is not None or extras["dropout_p"] > 0 or extras["lora_bias"] is not None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft LoraLayer.forward with one active plain adapter, as one fused lora_linear call."""
    reason = _call_reason(self, x, kwargs) if not args else "extra positional arguments"
    if reason is not None:
        _log_once(self, reason)
        return type(self).forward(self, x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    self._check_forward_args(x, *args, **kwargs)
    group = self.__dict__.get(_GROUP)
    if group is not None:
        y = group[0].output(group[1], x, kwargs)
        if y is not None:
            return y
    import fastsft_kernels as fk

    k = _kernel_args(self, x)
    # the kernel computes in x's dtype: autocast has nothing left to do inside
    with torch.autocast(x.device.type, enabled=False):
        if has_extras(k["extras"]):  # DoRA / dropout in training / LoRA bias
            y = fk.lora_linear_ex(k["x"], k["weight"], k["lora_a"], k["lora_b"], k["scaling"], bias=k["bias"],
                                  quant_state=k["quant_state"], **k["extras"])
        else:
            y = fk.lora_linear(k["x"], k["weight"], k["lora_a"], k["lora_b"], k["scaling"], bias=k["bias"],
                               quant_state=k["quant_state"])
    return y if k["out_dtype"] is None else y.to(k["out_dtype"])


def apply(model: torch.nn.Module) -> List[str]:
    """Patch every eligible peft LoraLayer of ``model`` in place; return what was done and why.

    Then wire q/k/v and gate/up groups whose layers are all patched through
    ``lora_linear_fused`` (``fastsft.patch.lora_fused``). One INFO line sums it up;
    the per-layer lines go to DEBUG and to the returned report.
    """
    from . import lora_fused

    classes = _peft_classes()
    if classes is None:
        return []
    lora_layer_cls = classes[2]
    lines: List[str] = []
    patched, kept = set(), 0
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer_cls):
            continue
        if module.__dict__.get(_PATCHED):
            continue  # idempotent
        reason = _static_reason(module, classes)
        if reason is not None:
            lines.append(f"{name}: kept on peft's path ({reason})")
            kept += 1
            continue
        base = module.get_base_layer()
        is_4bit = _is_bnb_4bit(base)
        kind = f"4-bit {getattr(base.weight, 'quant_type', '?')}" if is_4bit else "dense"
        if any(module.use_dora.values()):
            kind += " DoRA"
        module.__dict__[_IS_4BIT] = is_4bit
        module.forward = types.MethodType(_fused_forward, module)
        module.__dict__[_PATCHED] = True
        module.__dict__[_NAME] = name
        patched.add(id(module))
        lines.append(f"{name}: lora_linear ({kind} base {base.in_features}->{base.out_features})")
    if not patched:
        for line in lines:
            logger.debug("fastsft lora: %s", line)
        if kept:
            logger.info("fastsft lora: %d LoRA layers kept on peft's path (%s)", kept, lines[0])
        return lines
    group_lines = lora_fused.apply(model, patched, _GROUP)
    lines.extend(group_lines)
    for line in lines:
        logger.debug("fastsft lora: %s", line)
    fused = sum("lora_linear_fused" in line for line in group_lines)
    packed = sum("(packed)" in line for line in group_lines)
    summary = f"fastsft lora: {len(patched)} LoRA layers on lora_linear, {fused} q/k/v or gate/up groups fused"
    if packed:
        summary += f", {packed} packed projections"
    if kept:
        first = next(line for line in lines if "kept on peft's path" in line)
        summary += f"; {kept} kept on peft's path (e.g. {first})"
    logger.info(summary)
    return lines


def fused_calls(model: torch.nn.Module) -> int:
    """How many lora_linear_fused calls the wired groups of ``model`` made so far (eager calls: inside
    torch.compile the counter is left alone, or the graph would be guarded on it)."""
    from . import lora_fused

    return sum(g.fused_calls for g in lora_fused.groups_of(model, _GROUP))


def revert(model: torch.nn.Module) -> None:
    """Restore peft's forward on every layer ``apply`` patched."""
    from . import lora_fused

    lora_fused.revert(model, _GROUP)
    for module in model.modules():
        if module.__dict__.pop(_PATCHED, False):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_NAME, None)
            module.__dict__.pop(_LOGGED, None)
            module.__dict__.pop(_IS_4BIT, None)
