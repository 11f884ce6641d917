"""Helpers for testing fastsft_kernels (and kernels built on top of it).

- ``install_interpreter_shims``: makes Triton's CPU interpreter compute bf16 as
  the GPU does. Both shims change the interpreter only (never GPU code) and are
  installed only when ``TRITON_INTERPRET=1``:
  - ``install_interpreter_bf16_dot_shim``: the interpreter stores bfloat16 as raw
    uint16 bit patterns and hands those bits straight to ``np.matmul`` in
    ``tl.dot`` (triton issue 11584), so a bf16 dot multiplies integers, not
    numbers. The shim converts bf16 ``tl.dot`` operands to float32 first.
    Kernels still upcast to fp32 for their own elementwise arithmetic, which is
    right on the GPU too.
  - ``install_interpreter_bf16_rounding_shim``: the interpreter converts fp32 ->
    bf16 (``.to(tl.bfloat16)``, a store to a bf16 pointer, bf16 constants) by
    truncating the mantissa, where the GPU (``cvt.rn.bf16.f32``) and torch round
    to nearest even: truncation doubles the bf16 error the CPU tier measures and
    biases it towards zero. The shim rounds to nearest even, NaN kept quiet.
- ``install_interpreter_scalar_index_shim`` (Triton < 3.7 only): 3.6's interpreter turns a
  scalar computed in the kernel into a Python int (a ``range`` bound such as
  ``tl.minimum(start + n, rows)``) with ``int()`` of its one-element array, which NumPy 2
  rejects; 3.7 squeezes the array first, and so does the shim.
- ``poison_outputs``: fill every buffer the launchers allocate with NaN.
- ``HostSyncRecorder``: records torch calls that wait for the device or read a value back.
- ``rel_err``: ||out - ref|| / ||ref||, computed in float64.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ._triton_utils import set_output_poisoning, triton_version

_SHIM_FLAG = "_fastsft_bf16_dot_shim"


def _patch_interpreter_builder(flag: str, method: str, make_replacement) -> bool:
    """Replace ``InterpreterBuilder.<method>`` by ``make_replacement(original)`` once per process.

    Returns True when the patch is (already) active, False when not under the
    interpreter (TRITON_INTERPRET unset), where nothing is changed.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if not getattr(builder_cls, flag, False):
        setattr(builder_cls, method, make_replacement(getattr(builder_cls, method)))
        setattr(builder_cls, flag, True)
    return True


def install_interpreter_bf16_dot_shim() -> bool:
    """Patch the interpreter's tl.dot to compute bf16 operands as float32 (True when active)."""

    def make(original_dot):
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        def as_float32(handle):
            if handle.get_element_ty() == tl.bfloat16:
                data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interpreter.TensorHandle(data.reshape(handle.data.shape), tl.float32)
            return handle

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return original_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

        return create_dot

    return _patch_interpreter_builder(_SHIM_FLAG, "create_dot", make)


_ROUNDING_SHIM_FLAG = "_fastsft_bf16_rounding_shim"


def float32_to_bfloat16_bits(data):
    """uint16 bf16 bit patterns of a float32 numpy array, rounded to nearest even.

    Adding 0x7FFF plus the lowest kept bit, then dropping 16 bits, rounds ties to
    even and carries into the exponent (up to inf) as the hardware does; NaN
    keeps its sign and becomes a quiet NaN instead of rounding into inf.
    """
    import numpy as np

    bits = np.ascontiguousarray(data, dtype=np.float32).reshape(-1).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).reshape(np.shape(data))


def install_interpreter_bf16_rounding_shim() -> bool:
    """Patch the interpreter's fp32 -> bf16 cast to round to nearest even (see module doc; True when active)."""

    def make(original_cast):
        import triton.language as tl
        from triton.runtime import interpreter

        def cast_impl(self, src, dst_type):
            # Only fp32 -> bf16 changes; every other cast (and bf16 -> fp32, exact) is the original.
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return interpreter.TensorHandle(float32_to_bfloat16_bits(src.data), tl.bfloat16)
            return original_cast(self, src, dst_type)

        return cast_impl

    return _patch_interpreter_builder(_ROUNDING_SHIM_FLAG, "cast_impl", make)


_INDEX_SHIM_FLAG = "_fastsft_scalar_index_shim"


def install_interpreter_scalar_index_shim() -> bool:
    """On Triton < 3.7, make a scalar tensor usable as a loop bound under the interpreter (see module doc).

    True when the shim is active or not needed (Triton >= 3.7), False off the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from triton.runtime import interpreter

    if triton_version() >= (3, 7):
        return True
    original = interpreter._patch_lang_tensor
    if getattr(original, _INDEX_SHIM_FLAG, False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    setattr(patch_lang_tensor, _INDEX_SHIM_FLAG, True)
    interpreter._patch_lang_tensor = patch_lang_tensor  # _patch_lang looks it up at each launch
    return True


def install_interpreter_shims() -> bool:
    """Every interpreter shim (bf16 tl.dot operands, fp32 -> bf16 rounding, Triton 3.6's scalar loop
    bounds); a no-op off the interpreter."""
    dot = install_interpreter_bf16_dot_shim()
    rounding = install_interpreter_bf16_rounding_shim()
    index = install_interpreter_scalar_index_shim()
    return dot and rounding and index


# Tensor methods / torch functions that wait for the device or read a value back to the host.
HOST_SYNC_NAMES = frozenset({
    "item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "masked_select", "unique", "equal",
    "is_nonzero", "__bool__", "__int__", "__float__", "__index__", "allclose",
})


class HostSyncRecorder(torch.overrides.TorchFunctionMode):
    """``with HostSyncRecorder() as rec: ...``; ``rec.syncs`` lists the syncing calls made.

    Sees Python-level torch calls (kernel launchers, autograd Functions' backward),
    not what C++ does internally.
    """

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNC_NAMES:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


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
