"""Helpers for testing fastsft_kernels (and kernels built on top of it).

- ``install_interpreter_bf16_dot_shim``: works around a gap in Triton's CPU
  interpreter, which stores bfloat16 as raw uint16 bit patterns and hands those
  bits straight to ``np.matmul`` in ``tl.dot`` (triton issue 11584), so a bf16
  dot multiplies integers, not numbers. The shim converts bf16 ``tl.dot``
  operands to float32 first. It changes the interpreter only (never GPU code)
  and is installed only when ``TRITON_INTERPRET=1``. Kernels still upcast to
  fp32 for their own elementwise arithmetic, which is right on the GPU too.
- ``poison_outputs``: fill every buffer the launchers allocate with NaN.
- ``rel_err``: ||out - ref|| / ||ref||, computed in float64.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ._triton_utils import set_output_poisoning

_SHIM_FLAG = "_fastsft_bf16_dot_shim"


def install_interpreter_bf16_dot_shim() -> bool:
    """Patch the interpreter's tl.dot to compute bf16 operands as float32.

    Returns True when the shim is (already) active, False when not under the
    interpreter (TRITON_INTERPRET unset), where nothing is changed.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, _SHIM_FLAG, False):
        return True
    original_dot = builder_cls.create_dot

    def as_float32(handle):
        if handle.get_element_ty() == tl.bfloat16:
            data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data.reshape(handle.data.shape), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    setattr(builder_cls, _SHIM_FLAG, True)
    return True


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within the block, kernel output buffers start as NaN instead of garbage."""
    set_output_poisoning(enabled)
    try:
        yield
    finally:
        set_output_poisoning(False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| in float64 (NaN anywhere -> inf)."""
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise ValueError(f"shape mismatch: {tuple(out64.shape)} vs reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, bound: float, what: str = "output") -> None:
    """Fail unless rel_err(out, ref) <= bound, with the measured error in the message."""
    err = rel_err(out, ref)
    assert err <= bound, f"{what}: relative error {err:.3e} exceeds bound {bound:.1e}"
