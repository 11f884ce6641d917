"""fastsft_kernels: Triton kernels for the hot paths of supervised fine-tuning.

Every public op dispatches on the device of its inputs: CUDA tensors run the
Triton kernels; CPU tensors run the pure-PyTorch definitions in
``fastsft_kernels.reference``, unless ``FASTSFT_TRITON_ON_CPU=1`` is set (the
test suite sets it together with ``TRITON_INTERPRET=1``), in which case the
Triton path runs through Triton's interpreter.

Each op is a ``torch.library`` operator in the ``fastsft`` namespace (its forward and
backward, each with a fake implementation, so torch.compile and FakeTensor tracing see
through them); the functions here validate their arguments and call the operators.

Ops are imported lazily so that ``import fastsft_kernels`` stays cheap and an
op's module (and Triton) loads only when the op is first used.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module (inside this package) that defines it
_OPS = {
    "cross_entropy": "cross_entropy",
    "linear_cross_entropy": "cross_entropy",
    "lora_linear": "lora",
    "lora_linear_fused": "lora",  # q/k/v or gate/up sharing one x
    "dequantize_4bit": "lora",  # bitsandbytes NF4/FP4 -> dense, in Triton
    "varlen_attention": "attention",
    "rms_norm": "norm",
    "rope": "rope",
    "swiglu": "swiglu",
}

__all__ = sorted(_OPS) + ["reference", "load_operators"]


def load_operators() -> None:
    """Import every op module, so that each ``torch.ops.fastsft.*`` operator is registered
    (calling a public op registers its own; torch.ops lookups need this first)."""
    for module in sorted(set(_OPS.values())):
        importlib.import_module(f".{module}", __name__)


def __getattr__(name: str):
    if name in _OPS:
        module = importlib.import_module(f".{_OPS[name]}", __name__)
        op = getattr(module, name)
        globals()[name] = op  # later lookups skip __getattr__
        return op
    if name in ("reference", "testing"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__


class _Package(types.ModuleType):
    """Keeps `fastsft_kernels.<op>` the op even after its module is imported.

    Importing a submodule binds it as an attribute of the package, and three op
    modules share their op's name (cross_entropy, rope, swiglu): without this,
    `import fastsft_kernels.cross_entropy` anywhere would turn
    `fastsft_kernels.cross_entropy` into a module. Use importlib.import_module
    to reach the module itself.
    """

    def __setattr__(self, name, value):
        if name in _OPS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
