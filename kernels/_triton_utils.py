"""Helpers shared by the Triton launchers: dispatch rule, block sizes, input checks."""
from __future__ import annotations

import os
from typing import Iterable

import torch

# dtypes the kernels accept for activations / weights
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1


def triton_on_cpu() -> bool:
    """True when CPU tensors should run the Triton kernels through the interpreter."""
    return os.environ.get("FASTSFT_TRITON_ON_CPU", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """The dispatch rule: CUDA -> Triton; CPU -> reference unless FASTSFT_TRITON_ON_CPU=1."""
    if tensor.is_cuda:
        return True
    if tensor.device.type == "cpu" and triton_on_cpu():
        _interpreter_shims()
        return True
    return False


_SHIMS = []


def _interpreter_shims() -> None:
    """Kernels on CPU tensors run under Triton's interpreter, whose bf16 tl.dot multiplies raw bit
    patterns and whose fp32 -> bf16 cast truncates (fastsft_kernels.testing): without the shims a
    bf16 run trains on garbage (issue 27: step-1 loss 31.7 against 4.9). Installed on first use, in
    every process that runs them, not only under the test suite."""
    if not _SHIMS and is_interpreter():
        from .testing import install_interpreter_shims

        _SHIMS.append(install_interpreter_shims())


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version() -> tuple:
    """(major, minor) of the Triton in use: the launchers pick some tiles per version."""
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def needs_int64(*numels: int) -> bool:
    """True when some offset (e.g. rows * stride) can pass int32."""
    return any(int(n) > INT32_MAX for n in numels)


def check_float(name: str, tensor: torch.Tensor, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    dtypes = tuple(dtypes)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; expected one of {names}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device; got {listing}")


# ---------------------------------------------------------------- output allocation
# Launchers allocate every output and gradient buffer through these helpers. The
# test suite turns on poisoning (fastsft_kernels.testing.poison_outputs), which
# fills new buffers with NaN (floats) or a large sentinel (integers) so any
# element a kernel forgets to write fails the parity check instead of passing
# on whatever memory happened to hold.
_POISON = {"on": False}


def set_output_poisoning(enabled: bool) -> None:
    _POISON["on"] = bool(enabled)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if _POISON["on"]:
        if t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.bool else True)
    return t


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs (poisoned under the test suite)."""
    return _poison(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty_like for kernel outputs (poisoned under the test suite)."""
    return _poison(torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format))
