"""``torch_compile: true``: the trained model compiled before the first step (what TRL's
``torch_compile`` does), with ``nn.Module.compile`` -- in place, so parameter names, the
optimizer, checkpoints and ``save_pretrained`` see the same module as without it.

The patched model has no graph break (tests/test_torch_compile.py), so the whole forward of a
micro-batch is one graph and AOT autograd gives one backward graph; the kernels stay opaque
``torch.ops.fastsft`` operators inside them. Backend "auto" is "inductor"; inductor on a CPU
builds C++, so without a C++ compiler "auto" takes "aot_eager" (said in one line) and an
explicit "inductor" is refused. The step-0 self-check and the timed ``cpu_ops`` choice run in
eager mode only: a compiled run drops their first-forward hook and says so in one line.
"""
from __future__ import annotations

import functools
import shutil
from typing import Callable

import torch

from fastsft.errors import ConfigError

# debugging backends that torch._dynamo.list_backends() hides by default
_DEBUG_BACKENDS = ("eager", "aot_eager", "aot_eager_decomp_partition")
_CPU_FALLBACK = "aot_eager"
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")  # transformers', peft's


@functools.lru_cache(maxsize=None)
def backends() -> tuple:
    return tuple(sorted(set(torch._dynamo.list_backends(exclude_tags=())) | set(_DEBUG_BACKENDS)))


def check_backend(name: str) -> None:
    if name != "auto" and name not in backends():
        raise ConfigError(f"config key 'torch_compile_backend': {name!r} is not a torch.compile backend here "
                          f"(auto or one of {', '.join(backends())})")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would call on CPU (its own choice: $CXX, else c++ / g++ / clang++)."""
    import os

    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def choose_backend(name: str, device: torch.device, say: Callable[[str], None]) -> str:
    """The backend a run uses on ``device`` for the configured ``name``."""
    check_backend(name)
    if device.type != "cpu" or name not in ("auto", "inductor"):
        return "inductor" if name == "auto" else name
    if cpp_compiler() is not None:
        return "inductor"
    if name == "inductor":
        raise ConfigError("config key 'torch_compile_backend': inductor on CPU needs a C++ compiler (none found: "
                          "set CXX or install g++), or use aot_eager")
    say(f"torch_compile: no C++ compiler for inductor on CPU; backend {_CPU_FALLBACK}")
    return _CPU_FALLBACK


def compile_model(model: torch.nn.Module, config, device: torch.device, say: Callable[[str], None]) -> None:
    """Compile ``model`` in place when ``config.torch_compile`` is set."""
    if not getattr(config, "torch_compile", False):
        return
    backend = choose_backend(getattr(config, "torch_compile_backend", "auto"), device, say)
    _drop_first_forward_hooks(model, say)
    if getattr(config, "gradient_checkpointing", False):
        prepare_checkpointing_for_compile(model)
    model.compile(backend=backend)
    note = " (inductor on CPU: the first step builds C++, minutes on a small machine)" \
        if backend == "inductor" and device.type == "cpu" else ""
    say(f"torch_compile: model compiled with backend {backend}; the first step traces it{note}")


def _drop_first_forward_hooks(model: torch.nn.Module, say: Callable[[str], None]) -> None:
    """The step-0 self-check and the cpu_ops choice re-patch the model from a first-forward hook; inside a
    compiled forward they cannot (nothing may re-patch a traced model), so they are removed and said."""
    from fastsft.patch import self_check

    hooked = [m for m in model.modules() if getattr(m, self_check._HOOK_ATTR, None) is not None]
    for module in hooked:
        self_check.remove(module)
    if hooked:
        say("torch_compile: the step-0 self-check / cpu_ops choice do not run in a compiled model; every patch "
            "is kept as applied")


def prepare_checkpointing_for_compile(model: torch.nn.Module) -> None:
    """What a compiled, non-reentrant checkpointed layer needs to stay one graph.

    - The fused q/k/v and gate/up LoRA groups (fastsft.patch.lora_fused) hand a member's output to
      the next member through a Python object; inside a checkpointed layer dynamo refuses that side
      effect unless the backward's recompute may skip it. It may: the compiled recompute recomputes
      the traced tensors, and the group's state is empty again at the end of every forward.
    - peft's input-grad hook (requires_grad_ on the embeddings' output) exists for reentrant
      checkpointing; fastsft checkpoints non-reentrant, and the hook would break the graph."""
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for module in model.modules():
        if getattr(module, "_require_grads_hooks", None) or getattr(module, "_require_grads_hook", None) is not None:
            module.disable_input_require_grads()
    # transformers' gradient_checkpointing_enable and peft each register one; the second registration
    # overwrites the first's handle, so the hooks are found on the embeddings by their names
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
                del module._forward_hooks[key]  # what its RemovableHandle.remove() deletes
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
