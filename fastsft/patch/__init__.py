"""One-call patching of Hugging Face causal LMs with fastsft_kernels.

    import fastsft
    model = fastsft.patch_model(model)      # same object, kernels swapped in
    fastsft.unpatch_model(model)            # original behaviour back

Every component is a module in this package exposing
    apply(model, **options) -> list[str]   # what it patched (human-readable)
    revert(model) -> None                  # undo exactly what apply did
and acts on the model *instance* (bound forwards / attributes on its modules),
never on transformers' classes or module globals, so other models in the same
process are untouched and unpatching is exact. Component modules are imported
lazily: a missing or failing component is logged as an error and the others
still apply (patch_model never fails silently, and never half-fails loudly
either: it reports what it could and could not do).

The model may be a plain transformers model, a peft-wrapped model
(``PeftModel``; patched through its base model) or a 4-bit bitsandbytes model.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Dict, List, Optional

import torch

logger = logging.getLogger("fastsft.patch")

# component flag -> module under fastsft.patch that implements it
COMPONENTS: Dict[str, str] = {
    "lora": "lora",
    "attention": "attention",
    "rms_norm": "layers",
    "rope": "layers",
    "swiglu": "layers",
    "cross_entropy": "loss",
}
# apply order: LoRA routing first (it swaps layer internals), the loss last
# (it wraps the outermost forward).
_ORDER = ("lora", "attention", "rms_norm", "rope", "swiglu", "cross_entropy")

_STATE_ATTR = "_fastsft_patch_state"


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            return get_base()
        except Exception:  # a non-peft model with an unrelated method of that name
            pass
    return model


def patch_state(model: torch.nn.Module) -> Dict[str, List[str]]:
    """{component: [what it patched]} for the components applied to ``model``."""
    state = getattr(base_model_of(model), _STATE_ATTR, None)
    return dict(state) if state else {}


def _component_module(name: str):
    return importlib.import_module(f"{__name__}.{COMPONENTS[name]}")


class _PerModuleLinesToDebug(logging.Filter):
    """The LoRA component logs one INFO line per layer (about 224 at 8B); patch_model logs
    their one-line summary instead, so those lines are kept at DEBUG only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not record.pathname.endswith(f"patch{os.sep}lora.py"):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _lora_summary(lines: List[str]) -> str:
    """One short line of counts from the per-layer lines (those go to DEBUG):
    '14 layers on lora_linear (14 dense), 4 groups fused, 2 on peft's path (dora: 2)'."""
    single = [line for line in lines if ": lora_linear (" in line]
    kinds: Dict[str, int] = {}
    for line in single:
        kind = line.split(": lora_linear (", 1)[1].split(" base", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    text = f"{len(single)} layers on lora_linear ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})" \
        if single else "no layer on lora_linear"
    fused = sum(line.endswith("-> lora_linear_fused") for line in lines)
    packed = sum("(packed) -> lora_linear" in line for line in lines)
    if fused:
        text += f", {fused} q/k/v or gate/up groups fused"
    if packed:
        text += f", {packed} packed projections"
    unfused = sum(" not fused (" in line for line in lines)
    if unfused:
        text += f", {unfused} groups not fused (a member on peft's path)"
    kept = [line for line in lines if "kept on peft's path (" in line]
    if kept:
        reasons: Dict[str, int] = {}
        for line in kept:
            reason = line.rsplit("(", 1)[-1].rstrip(")")
            reasons[reason] = reasons.get(reason, 0) + 1
        text += f"; {len(kept)} on peft's path (" + "; ".join(f"{r}: {n}" for r, n in sorted(reasons.items())) + ")"
    return text


def _summary(name: str, done: List[str]) -> str:
    return _lora_summary(done) if name == "lora" else "; ".join(done)


def _apply_component(name: str, model: torch.nn.Module, options: dict) -> Optional[List[str]]:
    if name == "lora":
        quiet = _PerModuleLinesToDebug()
        root = logging.getLogger("fastsft")
        root.addFilter(quiet)
        try:
            return _apply_component_logged(name, model, options)
        finally:
            root.removeFilter(quiet)
    return _apply_component_logged(name, model, options)


def _apply_component_logged(name: str, model: torch.nn.Module, options: dict) -> Optional[List[str]]:
    try:
        module = _component_module(name)
    except ImportError as exc:
        logger.error("patch_model: component %r is unavailable (%s); left unpatched", name, exc)
        return None
    try:
        if module.__name__.endswith(".layers"):
            done = module.apply(model, which=name, **options)
        else:
            done = module.apply(model, **options)
    except Exception as exc:  # one component failing must not leave the others undone
        logger.error("patch_model: component %r failed and was left unpatched: %s: %s",
                     name, type(exc).__name__, exc)
        try:
            _revert_component(name, model)
        except Exception:
            logger.exception("patch_model: reverting the failed component %r also failed", name)
        return None
    return list(done or [])


def _revert_component(name: str, model: torch.nn.Module) -> None:
    module = _component_module(name)
    if module.__name__.endswith(".layers"):
        module.revert(model, which=name)
    else:
        module.revert(model)


def patch_model(
    model: torch.nn.Module,
    *,
    cross_entropy: bool = True,
    lora: bool = True,
    attention: bool = True,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    attention_backend: str = "triton",
    self_check: bool = False,
    fastest_on_cpu: bool = False,
) -> torch.nn.Module:
    """Swap fastsft_kernels into ``model`` (in place) and return the same model.

    Each flag turns one component on. Calling it again is idempotent: components
    already applied stay as they are, newly requested ones are applied, and ones
    now switched off are reverted. What was and was not patched is logged (INFO
    for what was patched, WARNING for what a model does not support).

    self_check: before the model's first forward with gradients, each patched op runs once on that
    batch's real inputs against the fp32 reference; one over the error rule is switched back to
    PyTorch for the run, with one line naming it (fastsft.patch.self_check).
    fastest_on_cpu: where the ops run PyTorch's reference (CPU tensors), time each patched op against
    transformers' own code on that first batch and keep only the faster (fastsft.patch.cpu_choice).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_compiled_call_impl", None) is not None or type(model).__name__ == "OptimizedModule":
        raise ValueError("model is already torch.compile'd; call fastsft.patch_model(model) before torch.compile")
    wanted = {"cross_entropy": cross_entropy, "lora": lora, "attention": attention,
              "rms_norm": rms_norm, "rope": rope, "swiglu": swiglu}
    base = base_model_of(model)
    state: Dict[str, List[str]] = dict(getattr(base, _STATE_ATTR, None) or {})

    # switched off since the last call -> revert (reverse order of application)
    for name in reversed(_ORDER):
        if name in state and not wanted[name]:
            _revert_component(name, model)
            del state[name]

    for name in _ORDER:
        if not wanted[name] or name in state:
            continue
        options = {"backend": attention_backend} if name == "attention" else {}
        done = _apply_component(name, model, options)
        if done is None:
            continue
        if done:
            state[name] = done
            logger.info("%s: %s", name, _summary(name, done))
        else:
            # applied cleanly but found nothing to patch (e.g. lora=True on a model without LoRA layers)
            logger.info("%s: nothing to patch in %s", name, type(base).__name__)
    object.__setattr__(base, _STATE_ATTR, state)
    from . import self_check as _self_check  # issue 27

    if self_check or fastest_on_cpu:
        _self_check.install(model, check=self_check, fastest_on_cpu=fastest_on_cpu)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_model: every component it applied is reverted; returns the model."""
    base = base_model_of(model)
    state: Dict[str, List[str]] = dict(getattr(base, _STATE_ATTR, None) or {})
    for name in reversed(_ORDER):
        if name in state:
            _revert_component(name, model)
            del state[name]
    if hasattr(base, _STATE_ATTR):
        object.__delattr__(base, _STATE_ATTR)
    return model


__all__ = ["patch_model", "unpatch_model", "patch_state", "base_model_of", "COMPONENTS"]
