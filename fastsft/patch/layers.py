"""RMSNorm, RoPE and SwiGLU patching of a model's modules (per instance, reversible).

- rms_norm: each known RMSNorm module's forward -> fastsft_kernels.rms_norm with
  the family's casting (offset 0: Llama style; offset 1: Gemma's (1 + w)).
  Qwen3's and Gemma-3's q_norm/k_norm (over head_dim) are the same classes.
- swiglu: each known MLP whose activation is SiLU -> down(swiglu(gate(x), up(x)))
  (Phi-3: its fused gate_up_proj is split by a view, no copy). Gemma's MLPs use
  gelu(tanh): GeGLU has no kernel here, so they are left to PyTorch and reported.
- rope: each known attention module gets its own copy of the class's forward
  whose globals map ``apply_rotary_pos_emb`` to the kernel. Nothing global is
  touched -- other models in the process keep the stock function -- and
  gradient checkpointing recomputes through the same patched forward. A forward
  wrapped by decorators (transformers' ``deprecate_kwarg``) is unwrapped, copied
  and wrapped again in the same decorators. The copy
  sees a snapshot of the modeling module's globals taken at patch time (other
  names in that module rebound later are not seen by the patched forward;
  objects mutated in place, such as the attention-function registry, are).

Each kernel is a torch.library operator (torch.ops.fastsft.*), so torch.compile traces
through the rms_norm, swiglu and rope calls without a graph break (single nodes of its graph).
The rotary copies' globals live in a module registered in sys.modules under its own name
(see _scope_module), so dynamo's guards read the patched function, not the stock one.
"""
from __future__ import annotations

import functools
import logging
import sys
import types
from typing import Callable, Dict, List

import torch

import fastsft_kernels as fk

from . import base_model_of, tiled_mlp
from .dtypes import ConstantCasts, autocast_dtype, to_autocast
from .families import (
    is_known_attention, is_patched, is_rms_norm_like, mlp_layout, norm_info,
    original_forward, restore_forward, set_forward,
)

logger = logging.getLogger("fastsft.patch")

WHICH = ("rms_norm", "rope", "swiglu")
_TAGS = {"rms_norm": "fastsft.rms_norm", "rope": "fastsft.rope", "swiglu": "fastsft.swiglu"}


# ---------------------------------------------------------------- kernels (torch.library operators)
def _rms_norm(x, weight, eps, offset):
    return fk.rms_norm(x, weight, eps, offset=offset)


def _swiglu(gate, up):
    return fk.swiglu(gate, up)


def _rope(q, k, cos, sin):
    return fk.rope(q, k, cos, sin)


# ---------------------------------------------------------------- rms_norm
def _make_norm_forward(offset: float, eps_attr: str) -> Callable:
    def forward(self, hidden_states):
        dtype = out_dtype = autocast_dtype(hidden_states)
        if dtype is not None and hidden_states.dtype == torch.float32:
            # an fp32 residual stream under autocast (fp32 weights): normalized in fp32 as transformers
            # does, and its gradient stays fp32; rounding it to the autocast dtype at every norm compounds
            # down the layers (issue 27: layer 0's k_proj LoRA gradient 3.2x PyTorch's bf16 error, 1.4x
            # with this). The next linear casts the output, as it casts transformers'.
            dtype = None
        # under autocast: x in the autocast dtype; the Llama-style weight too, since the output has the
        # promoted dtype of x and weight. Gemma's (1 + w) is applied in fp32 and rounded to x's dtype:
        # its weight stays as is.
        weight = to_autocast(self.weight, dtype) if offset == 0.0 else self.weight
        if hidden_states.dtype == torch.float32 and weight.dtype != torch.float32:
            weight = weight.float()  # one dtype for the kernel (a 16-bit norm weight on an fp32 residual)
        out = _rms_norm(to_autocast(hidden_states, dtype), weight, getattr(self, eps_attr), offset)
        # the next linear reads the compute dtype (the dtype contract, tests/perf/test_dtype_flow.py): the
        # same values its autocast cast would give, and the gradient still reaches the norm's fp32 backward
        return out if out_dtype is None else out.to(out_dtype)

    return forward


def _apply_rms_norm(model) -> List[str]:
    done: Dict[str, int] = {}
    skipped = set()
    for _, module in model.named_modules():
        info = norm_info(module)
        if info is None:
            if is_rms_norm_like(module):
                skipped.add(type(module).__name__)
            continue
        offset, eps_attr = info
        set_forward(module, _make_norm_forward(offset, eps_attr), _TAGS["rms_norm"])
        done[type(module).__name__] = done.get(type(module).__name__, 0) + 1
    if skipped:
        logger.warning("rms_norm: unknown norm classes left to PyTorch: %s", ", ".join(sorted(skipped)))
    return [f"{n} x{c}" for n, c in sorted(done.items())]


# ---------------------------------------------------------------- swiglu
def _is_silu(act) -> bool:
    if isinstance(act, torch.nn.SiLU):
        return True
    if type(act).__name__ == "SiLUActivation":
        return True
    return act is torch.nn.functional.silu


def _swiglu_in_compute_dtype(gate, up):
    dtype = autocast_dtype(gate)  # the projections' outputs already are, under autocast
    return _swiglu(to_autocast(gate, dtype), to_autocast(up, dtype))


def _split_mlp_body(self, x):
    return self.down_proj(_swiglu_in_compute_dtype(self.gate_proj(x), self.up_proj(x)))


def _fused_mlp_body(self, hidden_states):
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return self.down_proj(_swiglu_in_compute_dtype(gate, up))


# over token tiles when long (fastsft.patch.tiled_mlp sets the module's tile size)
def _split_mlp_forward(self, x):
    return tiled_mlp.run(self, x, functools.partial(_split_mlp_body, self))


def _fused_mlp_forward(self, hidden_states):
    return tiled_mlp.run(self, hidden_states, functools.partial(_fused_mlp_body, self))


def _apply_swiglu(model) -> List[str]:
    done: Dict[str, int] = {}
    not_silu = set()
    for _, module in model.named_modules():
        layout = mlp_layout(module)
        if layout is None:
            continue
        act = getattr(module, "act_fn", None) if layout == "split" else getattr(module, "activation_fn", None)
        if not _is_silu(act):
            not_silu.add(f"{type(module).__name__} ({type(act).__name__})")
            continue
        fn = _split_mlp_forward if layout == "split" else _fused_mlp_forward
        set_forward(module, fn, _TAGS["swiglu"])
        done[type(module).__name__] = done.get(type(module).__name__, 0) + 1
    if not_silu:
        logger.warning("swiglu: MLPs whose activation is not SiLU are left to PyTorch "
                       "(no GeGLU kernel): %s", ", ".join(sorted(not_silu)))
    return [f"{n} x{c}" for n, c in sorted(done.items())]


# ---------------------------------------------------------------- rope
# cos/sin come in the residual stream's dtype (fp32 in full fine-tuning): under autocast
# they are cast once per forward and shared by every layer
_ROPE_CASTS = ConstantCasts()


def _make_fast_apply_rotary(stock: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        # the kernel covers HF's standard call: q/k (batch, heads, seq, dim), cos/sin (batch, seq, rot)
        if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() not in (2, 3):
            return stock(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        dtype = autocast_dtype(q)
        return _rope(to_autocast(q, dtype), to_autocast(k, dtype), _ROPE_CASTS(cos, dtype), _ROPE_CASTS(sin, dtype))

    apply_rotary_pos_emb.__wrapped__ = stock
    return apply_rotary_pos_emb


_FORWARD_COPIES: Dict[type, Callable] = {}


def _with_rotary_kernel(fn: types.FunctionType, cls_name: str) -> types.FunctionType:
    """A copy of the undecorated forward whose globals map apply_rotary_pos_emb to the kernel."""
    if "apply_rotary_pos_emb" not in fn.__code__.co_names or "apply_rotary_pos_emb" not in fn.__globals__:
        raise ValueError(f"{cls_name}.forward does not call a module-level apply_rotary_pos_emb")
    scope = _scope_module(fn, cls_name)
    scope.__dict__["apply_rotary_pos_emb"] = _make_fast_apply_rotary(fn.__globals__["apply_rotary_pos_emb"])
    copy = _copy_function(fn, scope.__dict__, fn.__closure__)
    copy.__module__ = fn.__module__
    return copy


def _scope_module(fn: types.FunctionType, cls_name: str) -> types.ModuleType:
    """A module whose dict is a snapshot of fn's globals, registered in sys.modules under its own name.

    torch.compile resolves the globals of a function it inlines through
    sys.modules[globals["__name__"]] and guards on that module's attributes; a plain dict copy
    that kept the modeling module's __name__ made it guard on the stock apply_rotary_pos_emb
    (whose defaults differ: dynamo 2.13 crashed building the guard). Named after its own module,
    the copy's globals are what dynamo reads and guards."""
    name = f"fastsft_rope_scope.{fn.__globals__.get('__name__', 'unnamed')}.{cls_name}"
    scope = types.ModuleType(name, fn.__globals__.get("__doc__"))
    scope.__dict__.update({k: v for k, v in fn.__globals__.items() if k not in ("__name__", "__spec__", "__loader__")})
    scope.__dict__["__name__"] = name
    sys.modules[name] = scope
    return scope


def _copy_function(fn: types.FunctionType, globals_: dict, closure) -> types.FunctionType:
    copy = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy


def _cell_holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _rewrapped(fn: types.FunctionType, cls_name: str) -> types.FunctionType:
    """fn with its innermost function replaced by the rotary-kernel copy, every decorator kept.

    transformers wraps attention forwards in decorators such as ``deprecate_kwarg``
    (functools.wraps style: the wrapper's closure holds the wrapped function and
    ``__wrapped__`` points at it). Each wrapper layer is re-created around the new
    inner function, so the decorators still rename or check their arguments."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        return _with_rotary_kernel(fn, cls_name)
    if not isinstance(inner, types.FunctionType):
        raise ValueError(f"{cls_name}.forward is wrapped around a {type(inner).__name__}, not a function")
    cells = fn.__closure__ or ()
    holders = [i for i, cell in enumerate(cells) if _cell_holds(cell, inner)]
    if len(holders) != 1:
        raise ValueError(f"{cls_name}.forward is wrapped by a decorator whose closure does not hold the "
                         f"wrapped function once ({fn.__module__}.{fn.__qualname__}); cannot re-wrap it")
    new_inner = _rewrapped(inner, cls_name)
    closure = tuple(types.CellType(new_inner) if i == holders[0] else cell for i, cell in enumerate(cells))
    copy = _copy_function(fn, fn.__globals__, closure)
    copy.__wrapped__ = new_inner
    return copy


def _rope_forward_for(cls: type) -> Callable:
    """cls.forward re-created with apply_rotary_pos_emb bound to the kernel (cached per class)."""
    if cls in _FORWARD_COPIES:
        return _FORWARD_COPIES[cls]
    fn = cls.__dict__.get("forward")
    if not isinstance(fn, types.FunctionType):
        raise ValueError(f"{cls.__name__}.forward is inherited or not a plain function; "
                         "its rotary call cannot be redirected")
    copy = _rewrapped(fn, cls.__name__)
    _FORWARD_COPIES[cls] = copy
    return copy


def _apply_rope(model) -> List[str]:
    done: Dict[str, int] = {}
    for _, module in model.named_modules():
        if not is_known_attention(module):
            continue
        try:
            fn = _rope_forward_for(type(module))
        except ValueError as exc:
            logger.warning("rope: %s; left to PyTorch", exc)
            continue
        set_forward(module, fn, _TAGS["rope"])
        done[type(module).__name__] = done.get(type(module).__name__, 0) + 1
    return [f"{n} x{c}" for n, c in sorted(done.items())]


_APPLY = {"rms_norm": _apply_rms_norm, "rope": _apply_rope, "swiglu": _apply_swiglu}


def apply(model: torch.nn.Module, *, which: str) -> List[str]:
    """Patch one of rms_norm / rope / swiglu on every known module of ``model``."""
    if which not in _APPLY:
        raise ValueError(f"which must be one of {', '.join(WHICH)}; got {which!r}")
    base = base_model_of(model)
    done = _APPLY[which](base)
    if not done:
        logger.warning("%s: no supported module in %s (model_type %r); left to PyTorch",
                       which, type(base).__name__, getattr(getattr(base, "config", None), "model_type", None))
    return done


def revert(model: torch.nn.Module, *, which: str) -> None:
    if which not in _TAGS:
        raise ValueError(f"which must be one of {', '.join(WHICH)}; got {which!r}")
    for _, module in base_model_of(model).named_modules():
        restore_forward(module, _TAGS[which])


__all__ = ["apply", "revert", "is_patched", "original_forward"]
