"""The test harness itself: interpreter bf16 shims (dot, rounding), output poisoning, rel_err."""
import os

import pytest
import torch

from fastsft_kernels import _triton_utils
from fastsft_kernels import testing
from fastsft_kernels.testing import assert_close, rel_err

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")


@interpreted
def test_bf16_dot_shim_gives_real_products():
    import triton
    import triton.language as tl

    @triton.jit
    def matmul_tile(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

    torch.manual_seed(0)
    a = torch.randn(16, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 16, dtype=torch.bfloat16)
    c = torch.full((16, 16), float("nan"))
    matmul_tile[(1,)](a, b, c, N=16)
    assert_close(c, a.double() @ b.double(), 1e-6, "bf16 tl.dot under the interpreter")


def _rounding_cases() -> torch.Tensor:
    """fp32 values whose bf16 rounding differs from truncation, ties, overflow, specials."""
    one_ulp = 2.0**-7  # bf16 spacing just above 1.0
    ties = [1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, -(1.0 + one_ulp / 2), 2.0 + one_ulp]  # 2 down, 2 up (even)
    above_half = [1.0 + one_ulp * 0.5001, 1.0 + one_ulp * 0.4999, 1.9999999]  # up, down, carry into the exponent
    extremes = [3.3961e38, 3.3959e38, -3.4e38, torch.finfo(torch.float32).max]  # -> inf, max, -inf, inf
    specials = [0.0, -0.0, float("inf"), float("-inf"), 1e-40, -3e-39, 9.2e-41]  # subnormals round too
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(997, generator=gen) * torch.logspace(-30, 30, 997)
    return torch.cat([torch.tensor(ties + above_half + extremes + specials, dtype=torch.float32), noise])


@interpreted
@pytest.mark.parametrize("how", ["cast", "store"])
def test_bf16_rounding_shim_rounds_to_nearest_even_like_the_gpu(how):
    """fp32 -> bf16 in the interpreter must give torch's (= the GPU's) round-to-nearest-even bits."""
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(x_ptr, y_ptr, n, EXPLICIT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        if EXPLICIT:
            tl.store(y_ptr + offs, x.to(tl.bfloat16), mask=offs < n)
        else:
            tl.store(y_ptr + offs, x, mask=offs < n)  # the store casts to the pointer's type

    x = _rounding_cases()
    y = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    to_bf16[(1,)](x, y, x.numel(), EXPLICIT=how == "cast", BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16)), "bf16 bits differ from torch's rounding"
    # without the shim the interpreter truncates: these cases would differ from it
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)
    assert (expected.view(torch.int16) != truncated).sum() > 400


def test_bf16_rounding_helper_keeps_nan_and_signs():
    import numpy as np

    x = np.array([float("nan"), -float("nan"), 1.0, -1.0, float("inf")], dtype=np.float32)
    bits = testing.float32_to_bfloat16_bits(x)
    back = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float()
    assert torch.isnan(back[:2]).all() and back[2:].tolist() == [1.0, -1.0, float("inf")]
    assert bits[1] & 0x8000 and not bits[0] & 0x8000


def test_shims_leave_compiled_triton_alone(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert testing.install_interpreter_bf16_rounding_shim() is False
    assert testing.install_interpreter_bf16_dot_shim() is False
    assert testing.install_interpreter_shims() is False


def test_host_sync_recorder_sees_syncs():
    x = torch.arange(6.0)
    with testing.HostSyncRecorder() as recorder:
        (x * 2).sum()
        assert recorder.syncs == []
        x.sum().item()
        x.tolist()
        torch.nonzero(x)
    assert recorder.syncs == ["item", "tolist", "nonzero"]


def test_outputs_are_poisoned_under_the_suite():
    t = _triton_utils.empty(4, 5, dtype=torch.float32, device="cpu")
    assert torch.isnan(t).all()
    i = _triton_utils.empty(3, dtype=torch.int32, device="cpu")
    assert (i == torch.iinfo(torch.int32).max).all()


def test_rel_err():
    ref = torch.tensor([3.0, 4.0])
    assert rel_err(ref, ref) == 0.0
    assert abs(rel_err(torch.tensor([3.0, 4.5]), ref) - 0.1) < 1e-12
    assert rel_err(torch.tensor([float("nan"), 4.0]), ref) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        rel_err(torch.zeros(3), ref)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close(torch.tensor([3.0, 5.0]), ref, 1e-3)


def test_scalar_index_shim_lets_a_kernel_scalar_bound_a_loop(monkeypatch):
    """Triton 3.6's interpreter cannot use a scalar computed in the kernel as a range bound under NumPy 2;
    with the shim (installed by conftest) the same tensor indexes like an int on every version."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert testing.install_interpreter_scalar_index_shim() is True
    scalar = tl.tensor(interpreter.TensorHandle(np.array([7], dtype=np.int64), tl.int64), tl.int64)
    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(tl.tensor, scope)
    try:
        assert list(range(scalar, 10)) == [7, 8, 9]
    finally:
        scope.restore()
