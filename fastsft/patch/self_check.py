"""Self-check at step 0: every patched op, once, on the first batch's real shapes, dtypes and device.

``patch_model(model, self_check=True)`` (the trainer does this wherever the kernels run) hooks the
model's first forward: before it runs, the same forward is run once more with the public ops of
``fastsft_kernels`` recorded (the first call of each op: its real inputs), then each recorded op
is run forward and backward three ways on those inputs, with one fixed random output gradient:

- the op itself (the Triton kernel on a GPU, or through the interpreter on CPU);
- the oracle: ``fastsft_kernels.reference`` on the inputs upcast (16-bit -> fp32, fp32 -> fp64);
- PyTorch in the same dtype: the reference computing in the inputs' own dtype.

The rule (FlashAttention's and CCE's): the op's error against the oracle, for its output and every
input gradient, is at most twice PyTorch's same-dtype error, or a floor of one rounding of the dtype
(fp32 1e-5, bf16 4e-3, fp16 5e-4) where PyTorch happens to be exact. An op over the rule is
switched back to PyTorch for the run (its patch component is reverted) with one line naming it and
the figures; the forward then runs on what remains patched.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

logger = logging.getLogger("fastsft.patch")

# public op of fastsft_kernels -> the patch component that calls it
OP_COMPONENT: Dict[str, str] = {
    "rms_norm": "rms_norm",
    "rope": "rope",
    "swiglu": "swiglu",
    "varlen_attention": "attention",
    "lora_linear": "lora",
    "lora_linear_fused": "lora",
    "lora_linear_ex": "lora",  # DoRA, dropout in training, a LoRA bias
    "lora_linear_ex_fused": "lora",
    "linear_cross_entropy": "cross_entropy",
    "cross_entropy": "cross_entropy",
}
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4, torch.float64: 1e-12}
FACTOR = 2.0
_HOOK_ATTR = "_fastsft_self_check_hook"


@dataclass
class OpCheck:
    op: str
    dtype: torch.dtype
    shapes: str
    worst: str = ""  # "output" or "grad of argument i"
    error: float = 0.0  # the op's error against the oracle, at `worst`
    torch_error: float = 0.0  # PyTorch's same-dtype error there
    bound: float = 0.0
    details: List[Tuple[str, float, float]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(err <= max(FACTOR * ref, FLOOR.get(self.dtype, 1e-5)) for _, err, ref in self.details)

    def line(self) -> str:
        return (f"{self.op} ({_dtype_name(self.dtype)}, {self.shapes}): {self.worst} error {self.error:.2e} "
                f"against the fp32 reference, PyTorch {_dtype_name(self.dtype)} {self.torch_error:.2e}, "
                f"bound {self.bound:.2e}")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------ recording the first call of each op
@contextlib.contextmanager
def record_ops(ops=tuple(OP_COMPONENT)):
    """Within the block, the first call of each public op of fastsft_kernels is recorded:
    {op: (args, kwargs, requires_grad of each tensor argument)}."""
    import fastsft_kernels as fk

    calls: Dict[str, tuple] = {}
    originals = {name: getattr(fk, name) for name in ops}

    def wrap(name: str, fn: Callable):
        def recorded(*args, **kwargs):
            if name not in calls:
                calls[name] = (_detached(args), _detached(kwargs), _grad_flags(args), _grad_flags(kwargs))
            return fn(*args, **kwargs)
        return recorded

    for name, fn in originals.items():
        setattr(fk, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(fk, name, fn)


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _detached(value):
    return _map(value, lambda t: t.detach())


def _grad_flags(value):
    return _map(value, lambda t: bool(t.requires_grad))


def _leaves(value, flags, cast: Optional[Callable] = None):
    """Fresh leaves of the recorded inputs (cast if given); those that required grad require it again."""
    if isinstance(value, torch.Tensor):
        t = cast(value) if cast is not None and value.is_floating_point() else value
        # a detached alias, not a copy (the ops never write their inputs): at 8B the lm_head alone is 1 GB
        return t.detach().requires_grad_(bool(flags) and t.is_floating_point())
    if isinstance(value, (list, tuple)):
        return type(value)(_leaves(v, f, cast) for v, f in zip(value, flags))
    if isinstance(value, dict):
        return {k: _leaves(v, flags[k], cast) for k, v in value.items()}
    return value


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments fn takes (the kernels' schedule hints, dequant_rows, ..., are not the math)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _run(fn, args, kwargs, flags, kwflags, cotangent_seed: int, cast=None):
    """Outputs and input gradients of fn on fresh leaves, with seeded random output gradients."""
    a = _leaves(args, flags, cast)
    k = _accepted(fn, _leaves(kwargs, kwflags, cast))
    outs = _tensors(fn(*a, **k))
    inputs = [t for t in _tensors(a) + _tensors(k) if t.requires_grad]
    grads: List[Optional[torch.Tensor]] = [None] * len(inputs)
    diff = [o for o in outs if o.requires_grad]
    if diff and inputs:
        gen = torch.Generator(device="cpu").manual_seed(cotangent_seed)
        cot = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(device=o.device, dtype=o.dtype)
               for o in diff]
        grads = list(torch.autograd.grad(diff, inputs, cot, allow_unused=True))
    return [o.detach() for o in outs], [g.detach() if g is not None else None for g in grads]


@contextlib.contextmanager
def _reference_in_own_dtype():
    """The reference ops computing in their inputs' dtype: what plain PyTorch does in that dtype."""
    from fastsft_kernels import reference

    original = reference._compute_dtype
    reference._compute_dtype = lambda t: t.dtype
    try:
        yield
    finally:
        reference._compute_dtype = original


def _err(out: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> float:
    from fastsft_kernels.testing import rel_err

    if out is None or ref is None:
        return 0.0 if out is None and ref is None else float("inf")
    return rel_err(out, ref)


def check_op(name: str, recorded: tuple, seed: int = 0) -> OpCheck:
    import fastsft_kernels as fk
    from fastsft_kernels import reference

    args, kwargs, flags, kwflags = recorded
    floats = [t for t in _tensors(args) + _tensors(kwargs) if t.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    args, kwargs, flags, kwflags = recorded = with_fixed_dropout_masks(name, recorded)
    ref_fn = getattr(reference, name, None)
    if ref_fn is None:
        ref_fn = {"lora_linear_fused": _lora_linear_fused_reference,
                  "lora_linear_ex_fused": _lora_linear_ex_fused_reference}[name]
    shapes = ", ".join("x".join(map(str, t.shape)) for t in _tensors(args)[:2])
    result = OpCheck(name, dtype, shapes)
    out, grads = _run(getattr(fk, name), args, kwargs, flags, kwflags, seed)
    oracle_out, oracle_grads = _run(ref_fn, args, kwargs, flags, kwflags, seed,
                                    cast=lambda t: t.to(oracle_dtype))
    with _reference_in_own_dtype():
        torch_out, torch_grads = _run(ref_fn, args, kwargs, flags, kwflags, seed)
    where = [f"output {i}" if len(out) > 1 else "output" for i in range(len(out))]
    where += [f"gradient {i}" for i in range(len(grads))]
    for label, mine, ref, base in zip(where, out + grads, oracle_out + oracle_grads, torch_out + torch_grads):
        result.details.append((label, _err(mine, ref), _err(base, ref)))
    floor = FLOOR.get(dtype, 1e-5)
    label, err, base = max(result.details, key=lambda d: d[1] / max(FACTOR * d[2], floor))
    result.worst, result.error, result.torch_error, result.bound = label, err, base, max(FACTOR * base, floor)
    return result


def _lora_linear_fused_reference(x, weights, lora_as, lora_bs, scalings, *, biases=None, quant_states=None,
                                 **_schedule):
    from fastsft_kernels import reference

    n = len(weights)
    biases = biases or [None] * n
    quant_states = quant_states or [None] * n
    return [reference.lora_linear(x, w, a, b, s, bias=bias, quant_state=q)
            for w, a, b, s, bias, q in zip(weights, lora_as, lora_bs, scalings, biases, quant_states)]


def _lora_linear_ex_fused_reference(x, weights, lora_as, lora_bs, scalings, *, biases=None, quant_states=None,
                                    magnitudes=None, dropout_ps=None, dropout_masks=None, lora_biases=None,
                                    **_schedule):
    from fastsft_kernels import reference

    n = len(weights)
    none = [None] * n
    return [reference.lora_linear_ex(x, w, a, b, s, bias=bias, quant_state=q, magnitude=m, dropout_p=p,
                                     dropout_mask=mask, lora_bias=lb)
            for w, a, b, s, bias, q, m, p, mask, lb in zip(
                weights, lora_as, lora_bs, scalings, biases or none, quant_states or none, magnitudes or none,
                dropout_ps or [0.0] * n, dropout_masks or none, lora_biases or none)]


def with_fixed_dropout_masks(name: str, recorded: tuple) -> tuple:
    """The recorded call with its dropout masks drawn once, so that every run of it (the op, the oracle,
    PyTorch, a timing) drops the same elements; calls without dropout come back as they are."""
    args, kwargs, flags, kwflags = recorded
    if name not in ("lora_linear_ex", "lora_linear_ex_fused"):
        return recorded
    from fastsft_kernels.lora_dora import draw_dropout_mask

    x = args[0]
    kwargs, kwflags = dict(kwargs), dict(kwflags)
    if name == "lora_linear_ex":
        p = kwargs.get("dropout_p", 0.0)
        if p and kwargs.get("dropout_mask") is None:
            kwargs["dropout_mask"], kwflags["dropout_mask"] = draw_dropout_mask(p, x.shape, x.device), False
    else:
        ps = kwargs.get("dropout_ps") or []
        masks = list(kwargs.get("dropout_masks") or [None] * len(ps))
        if any(p and m is None for p, m in zip(ps, masks)):
            kwargs["dropout_masks"] = [m if m is not None or not p else draw_dropout_mask(p, x.shape, x.device)
                                       for p, m in zip(ps, masks)]
            kwflags["dropout_masks"] = [False] * len(ps)
    return args, kwargs, flags, kwflags


def kernels_active(model) -> bool:
    """Do the public ops run kernels for this model's tensors (a GPU, or the interpreter on CPU)?"""
    from fastsft_kernels._triton_utils import use_triton

    param = next(iter(model.parameters()), None)
    return param is not None and use_triton(param)


def keep_mlp_tiles(model) -> None:
    """After components are switched back: an MLP tiled through the swiglu patch (long_context) gets
    the stock tiled forward, so switching swiglu back does not silently drop its tiling."""
    from . import base_model_of, tiled_mlp

    for module in base_model_of(model).modules():
        if tiled_mlp.tile_tokens_of(module) and not tiled_mlp.is_patched(module, tiled_mlp._SWIGLU_TAG) \
                and not tiled_mlp.is_patched(module, tiled_mlp._TAG):
            tiled_mlp.set_forward(module, tiled_mlp._stock_tiled_forward, tiled_mlp._TAG)


def run_self_check(model, args: tuple, kwargs: dict) -> List[OpCheck]:
    """Record the ops of one forward of `model` on (args, kwargs), check each; switch failing ones back."""
    with record_ops() as calls, torch.enable_grad():
        out = model(*args, **kwargs)
    del out
    # the ops get their recorded dtypes; autocast (the caller's, around the first forward) would turn
    # the oracle's fp32 matmuls into 16-bit ones
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        checks = [check_op(name, recorded) for name, recorded in calls.items()]
    failed = _agree_across_ranks({OP_COMPONENT[c.op] for c in checks if not c.passed})
    for check in checks:
        if not check.passed:
            logger.warning("self-check: %s; over the rule (at most %gx PyTorch's error), so %s runs PyTorch's "
                           "code for this run", check.line(), FACTOR, OP_COMPONENT[check.op])
    failed = switchable(failed, "self-check")
    if failed:
        switch_back(model, failed)
    elif checks:
        logger.info("self-check: %d ops within %gx PyTorch's error on the first batch (%s)", len(checks), FACTOR,
                    ", ".join(f"{c.op} {c.error:.1e}" for c in checks))
    return checks


_COMPONENTS = ("cross_entropy", "lora", "attention", "rms_norm", "rope", "swiglu")


def _agree_across_ranks(failed: set) -> List[str]:
    """Under torch.distributed every rank switches back the same components: those failing on any rank
    (ranks running different code would compute different things, or wait on each other's collectives)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # fastsft's group has a CPU (gloo) side; a group of NCCL alone (another trainer's) reduces on the GPU
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flags = torch.tensor([float(c in failed) for c in _COMPONENTS], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed = {c for c, f in zip(_COMPONENTS, flags.tolist()) if f}
    return sorted(failed)


def switchable(components, who: str) -> List[str]:
    """The components that may go back to transformers' code: all but attention under sequence
    parallelism (the Ulysses exchange lives in fastsft's attention; transformers' own would attend
    within the rank's shard), which is said in one line."""
    from fastsft.distributed import ulysses

    components = sorted(components)
    if "attention" in components and ulysses.active() is not None:
        components.remove("attention")
        logger.warning("%s: attention stays fastsft's under sequence parallelism (it carries the exchange)", who)
    return components


def switch_back(model, components) -> None:
    """Run transformers' code for `components` from now on; every other patch stays as it is."""
    from . import patch_model, patch_state

    state = patch_state(model)
    patch_model(model, **{name: name in state and name not in components for name in _COMPONENTS})
    keep_mlp_tiles(model)


def install(model, *, check: bool = True, fastest_on_cpu: bool = False) -> None:
    """Before the first forward of `model` with gradients (once): the self-check where the ops run
    kernels (check), or the per-op CPU choice where they run PyTorch's reference (fastest_on_cpu)."""
    remove(model)
    state = {"running": False}

    def hook(module, args, kwargs):
        if state["running"] or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None  # inside torch.compile nothing may re-patch the model: the check runs eagerly or not at all
        state["running"] = True
        try:
            remove(module)
            if kernels_active(module):
                if check:
                    run_self_check(module, args, kwargs)
            elif fastest_on_cpu and next(module.parameters()).device.type == "cpu":
                from .cpu_choice import choose

                choose(module, args, kwargs)
            elif check:
                logger.info("self-check: skipped, the ops run PyTorch's reference on %s tensors",
                            next(module.parameters()).device.type)
        finally:
            state["running"] = False
        return None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    object.__setattr__(model, _HOOK_ATTR, handle)


def remove(model) -> None:
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        object.__delattr__(model, _HOOK_ATTR)


__all__ = ["install", "remove", "run_self_check", "check_op", "record_ops", "OpCheck", "OP_COMPONENT"]
