"""Parity of fastsft_kernels.varlen_attention (forward and dq/dk/dv) with the float64
per-document reference, plus input validation and determinism.

CPU: the Triton kernels run through the interpreter (tests/conftest.py), whose block
sizes are BLOCK_M=32 / BLOCK_N=16 (forward, dQ) and 32 key x 16 query rows (dK/dV),
so the document lengths below sit on, and one off, those block edges.
"""

import pytest
import torch

import fastsft_kernels as fk
from fastsft_kernels import reference
from fastsft_kernels.attention import make_cu_seqlens
from fastsft_kernels.testing import assert_close

# Bounds against float64. fp32: ieee dots, differences are summation order.
# fp16 / bf16: the output and gradients are rounded to the input dtype, and, as in
# FlashAttention, P and dS are rounded to it before their matmuls; bf16 has an 8-bit
# mantissa (2^-9 relative rounding per element), so its gradient bound is 1.5e-2.
BOUNDS = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1e-2, 1.5e-2)}
EDGE_LENGTHS = [1, 15, 16, 17, 31, 32, 33, 3]  # 148 tokens


def cu_of(lengths, device):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def make_inputs(lengths, n_heads, n_kv, head_dim, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)  # generated in place: GPU cases are large
    total = sum(lengths)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q, k, v = rnd(total, n_heads, head_dim), rnd(total, n_kv, head_dim), rnd(total, n_kv, head_dim)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), rnd(total, n_heads, head_dim)


def check_parity(lengths, n_heads, n_kv, head_dim, dtype, device, seed=0, bounds=None, **kw):
    q, k, v, dout = make_inputs(lengths, n_heads, n_kv, head_dim, dtype, device, seed)
    cu = cu_of(lengths, device)
    out = fk.varlen_attention(q, k, v, cu, max(lengths), **kw)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.varlen_attention(q64, k64, v64, cu, max(lengths), **kw)
    ref.backward(dout.double())
    out_bound, grad_bound = bounds or BOUNDS[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, out_bound, "out")
    assert_close(q.grad, q64.grad, grad_bound, "dq")
    assert_close(k.grad, k64.grad, grad_bound, "dk")
    assert_close(v.grad, v64.grad, grad_bound, "dv")
    return q, k, v, dout, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_block_edge_lengths(dtype, device):
    check_parity(EDGE_LENGTHS, 4, 2, 16, dtype, device, seed=1)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2), (8, 1)])
def test_gqa_ratios(n_heads, n_kv, device):
    check_parity([5, 33, 20], n_heads, n_kv, 16, torch.bfloat16, device, seed=2)


def test_many_short_documents_next_to_a_long_one(device):
    check_parity([1, 1, 2, 1, 3, 1, 70, 1, 4, 2], 2, 1, 32, torch.float16, device, seed=3)


def test_empty_documents_in_cu_seqlens(device):
    q, k, v, dout = make_inputs([9, 14], 2, 1, 16, torch.float32, device, seed=4)
    cu = torch.tensor([0, 0, 9, 9, 23, 23], dtype=torch.int32, device=device)
    out = fk.varlen_attention(q, k, v, cu, 14)
    ref = reference.varlen_attention(q.detach().double(), k.detach().double(), v.detach().double(), cu, 14)
    assert_close(out, ref, 1e-5)


@pytest.mark.parametrize("dtype,kw", [
    (torch.bfloat16, dict(window=7)),
    (torch.float16, dict(window=1)),  # every query sees only itself
    (torch.float32, dict(window=20, softcap=1.5)),
    (torch.bfloat16, dict(softcap=2.0, softmax_scale=0.4)),
    (torch.float16, dict(causal=False)),
    (torch.float32, dict(causal=False, window=6)),
])
def test_window_softcap_and_non_causal(dtype, kw, device):
    check_parity([1, 17, 40, 9], 4, 2, 16, dtype, device, seed=5, **kw)


@pytest.mark.parametrize("head_dim", [24, 64, 80])
def test_head_dims(head_dim, device):
    # 24 and 80 are not powers of two (masked head_dim lanes); 64 is a real model size
    check_parity([17, 30], 2, 1, head_dim, torch.bfloat16, device, seed=6)


def test_strided_inputs_from_transformers_layout(device):
    # transformers hands over (batch=1, heads, seq, dim); the (seq, heads, dim) view is not contiguous
    lengths = [12, 21]
    g = torch.Generator().manual_seed(7)
    qb = torch.randn(1, 4, 33, 16, generator=g).to(device).requires_grad_()
    kb = torch.randn(1, 2, 33, 16, generator=g).to(device).requires_grad_()
    vb = torch.randn(1, 2, 33, 16, generator=g).to(device).requires_grad_()
    q, k, v = (t.transpose(1, 2)[0] for t in (qb, kb, vb))
    assert not q.is_contiguous()
    cu = cu_of(lengths, device)
    out = fk.varlen_attention(q, k, v, cu, 21)
    dout = torch.randn(out.shape, generator=g).to(device)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().contiguous().requires_grad_() for t in (q, k, v))
    ref = reference.varlen_attention(q64, k64, v64, cu, 21)
    ref.backward(dout.double())
    assert_close(out, ref, 1e-5, "out")
    assert_close(qb.grad.transpose(1, 2)[0], q64.grad, 1e-5, "dq")
    assert_close(kb.grad.transpose(1, 2)[0], k64.grad, 1e-5, "dk")


def test_int64_tile_offsets_path(monkeypatch, device):
    # the WIDE (int64 row offsets) variant normally needs > 2^31-element tensors; force it
    from fastsft_kernels import attention

    monkeypatch.setattr(attention, "_wide", lambda rows, *tensors: True)
    check_parity([9, 33], 4, 2, 16, torch.float32, device, seed=14, window=12)


def test_backward_is_deterministic(device):
    q, k, v, dout = make_inputs([5, 40, 18], 8, 2, 16, torch.bfloat16, device, seed=8)
    cu = cu_of([5, 40, 18], device)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        fk.varlen_attention(q, k, v, cu, 40).backward(dout)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_make_cu_seqlens_is_validated_and_cached(device):
    cu = make_cu_seqlens([0, 3, 10], device)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 10]
    from fastsft_kernels.attention import _SEQ_CACHE

    assert _SEQ_CACHE[id(cu)].cu is cu  # calls with this tensor skip the device->host copy
    with pytest.raises(ValueError, match="non-decreasing"):
        make_cu_seqlens([0, 5, 3, 10], device)


def _good(device, dtype=torch.float16):
    q = torch.randn(10, 4, 16, device=device, dtype=dtype)
    k = torch.randn(10, 2, 16, device=device, dtype=dtype)
    return q, k, k.clone(), torch.tensor([0, 4, 10], dtype=torch.int32, device=device)


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v, cu: (q, k.float(), v, cu), "share a dtype"),
    (lambda q, k, v, cu: (q.to(torch.int32), k, v, cu), "dtype"),
    (lambda q, k, v, cu: (q[:, :3], k, v, cu), "multiple"),
    (lambda q, k, v, cu: (q, k, v, cu.long()), "int32"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32)), "end at total_tokens"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([1, 4, 10], dtype=torch.int32)), "start at 0"),
    (lambda q, k, v, cu: (q[0], k, v, cu), "3-D"),
    (lambda q, k, v, cu: (q, k[:9], v[:9], cu), "tokens"),
    (lambda q, k, v, cu: (q, k[..., :8], v[..., :8], cu), "head_dim"),
])
def test_bad_inputs_raise_value_error(mutate, match):
    q, k, v, cu = mutate(*_good("cpu"))
    with pytest.raises(ValueError, match=match):
        fk.varlen_attention(q, k, v, cu, 6)


@pytest.mark.parametrize("kw,match", [
    (dict(max_seqlen=5), "max_seqlen"),
    (dict(window=0), "window"),
    (dict(softcap=-1.0), "softcap"),
    (dict(softmax_scale=float("nan")), "softmax_scale"),
])
def test_bad_options_raise_value_error(kw, match):
    q, k, v, cu = _good("cpu")
    max_seqlen = kw.pop("max_seqlen", 6)
    with pytest.raises(ValueError, match=match):
        fk.varlen_attention(q, k, v, cu, max_seqlen, **kw)


def test_cpu_dispatch_to_reference_without_interpreter_flag(monkeypatch):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    q, k, v, cu = _good("cpu", torch.float32)
    out = fk.varlen_attention(q, k, v, cu, 6)
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), cu, 6)
    assert_close(out, ref, 1e-5)


# ------------------------------------------------------------------------------ GPU, real sizes
def realistic_lengths(total, seed, lo=128, hi=4096):
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] <= 0:
        lengths.pop()
        lengths[-1] += total - sum(lengths)
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_16k_packed_gqa_head_dim_128(dtype):
    lengths = realistic_lengths(16384, seed=0) + [1, 127, 129]
    check_parity(lengths, 32, 8, 128, dtype, "cuda", seed=10, bounds=BOUNDS[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 256])
@pytest.mark.parametrize("kw", [dict(), dict(window=512, softcap=30.0)])
def test_gpu_head_dims(head_dim, kw):
    lengths = [1, 63, 64, 65, 127, 128, 129, 1500, 700]
    check_parity(lengths, 16, 4, head_dim, torch.bfloat16, "cuda", seed=11, **kw)


@pytest.mark.gpu
def test_gpu_fp32_inputs():
    check_parity([300, 77, 1025], 8, 2, 128, torch.float32, "cuda", seed=12)


@pytest.mark.gpu
@pytest.mark.parametrize("one_long_document", [False, True])
def test_gpu_int64_offsets(one_long_document):
    # total_tokens * heads * head_dim > 2^31. Many 4k documents: int64 document bases,
    # int32 tiles; one 299k-token document: rows * stride itself passes int32 (WIDE tiles).
    n_heads, head_dim, total = 64, 128, 300_000
    assert total * n_heads * head_dim > 2**31
    if one_long_document:
        lengths = [total - 777, 777]
    else:
        lengths = [4096] * (total // 4096) + [total % 4096 - 777, 777]
    q, k, v, dout = make_inputs(lengths, n_heads, 8, head_dim, torch.bfloat16, "cuda", seed=13)
    cu = cu_of(lengths, "cuda")
    out = fk.varlen_attention(q, k, v, cu, max(lengths))
    out.backward(dout)
    tail = slice(total - 777, total)
    q64, k64, v64 = (t.detach()[tail].double().requires_grad_() for t in (q, k, v))
    ref = reference.varlen_attention(q64, k64, v64, cu_of([777], "cuda"), 777)
    ref.backward(dout[tail].double())
    assert_close(out[tail], ref, 1e-2, "out (last document)")
    assert_close(q.grad[tail], q64.grad, 1.5e-2, "dq (last document)")
    assert_close(k.grad[tail], k64.grad, 1.5e-2, "dk (last document)")


def _gpu_tile_tables():
    from fastsft_kernels import attention

    # the fp32 tables use small tiles like the interpreter's own; the window's block ranges
    # are checked on the Hopper tiles (the widest)
    for name, table, windows in (("hopper", attention._HOPPER_16BIT, (None, 70)),
                                 ("ampere", attention._AMPERE_16BIT, (None,))):
        for bucket, cfg in table.items():
            for window in windows:
                yield pytest.param(cfg, window, id=f"{name}-d{bucket}-window{window}")


@pytest.mark.parametrize("cfg,window", list(_gpu_tile_tables()))
def test_gpu_tile_configs_through_the_interpreter(cfg, window, monkeypatch, device):
    # the GPU tables (128-row tiles, 16-query dK/dV steps...) take other block ranges and
    # masks than the interpreter's small blocks: run each table's tiles here on small heads
    from fastsft_kernels import attention

    monkeypatch.setattr(attention, "_configs", lambda head_dim, dtype, arch=90: cfg)
    check_parity([1, 129, 200, 64], 2, 1, 16, torch.float32, device, seed=21, window=window)
