"""The test harness itself: interpreter bf16 dot shim, output poisoning, rel_err."""
import os

import pytest
import torch

from fastsft_kernels import _triton_utils
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
