"""Parity of fastsft_kernels.lora_linear (dense and NF4/FP4 base) and its 4-bit dequantization.

Oracle: fastsft_kernels.reference in float64; bitsandbytes for the dequantization;
peft's own LoRA layers for the layer-level parity.
"""
import os

import pytest
import torch

import fastsft_kernels as fk
from fastsft_kernels import reference
from fastsft_kernels.lora import lora_linear_fused
from fastsft_kernels.quant import dequantize_4bit as triton_dequantize_4bit
from fastsft_kernels.testing import assert_close

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# fp32 runs exact fp32 dots; 16-bit inputs round every operand and the output
BOUNDS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantize(w, quant_type="nf4", blocksize=64, nested=False):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _make(seed, dtype, lead=(37,), in_f=96, out_f=80, rank=8, bias=True, quant=None, blocksize=64,
          nested=False, weight_grad=False, lora_dtype=torch.float32, device="cpu"):
    """Fresh random inputs; returns (kernel args, float64 reference args)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    a = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).to(lora_dtype)
    b = (torch.randn(out_f, rank, generator=g) * 0.5).to(lora_dtype)
    bi = torch.randn(out_f, generator=g).to(dtype) if bias else None
    qs = None
    if quant is not None:
        w, qs = _quantize(w, quant, blocksize, nested)
    x, w, a, b, bi = (None if t is None else t.to(device) for t in (x, w, a, b, bi))
    if qs is not None:
        qs.to(device)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    if bi is not None:
        bi.requires_grad_(True)
    if quant is None and weight_grad:
        w.requires_grad_(True)
    ref = dict(
        x=x.detach().double().requires_grad_(True),
        w=w if quant is not None else w.detach().double().requires_grad_(weight_grad),
        a=a.detach().double().requires_grad_(True),
        b=b.detach().double().requires_grad_(True),
        bi=None if bi is None else bi.detach().double().requires_grad_(True),
    )
    return (x, w, a, b, bi, qs), ref


def _check(args, ref, scaling, bound, weight_grad=False, seed=0):
    x, w, a, b, bi, qs = args
    y = fk.lora_linear(x, w, a, b, scaling, bias=bi, quant_state=qs)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], b.shape[0])
    y_ref = reference.lora_linear(ref["x"], ref["w"], ref["a"], ref["b"], scaling, bias=ref["bi"], quant_state=qs)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.dtype).to(y.device)
    y.backward(grad)
    y_ref.backward(grad.double())
    assert_close(y, y_ref, bound, "y")
    assert_close(x.grad, ref["x"].grad, bound, "dx")
    assert_close(a.grad, ref["a"].grad, bound, "dA")
    assert_close(b.grad, ref["b"].grad, bound, "dB")
    assert a.grad.dtype == a.dtype and b.grad.dtype == b.dtype
    if bi is not None:
        assert_close(bi.grad, ref["bi"].grad, bound, "dbias")
    if weight_grad:
        assert_close(w.grad, ref["w"].grad, bound, "dW")
    elif qs is None:
        assert w.grad is None


# --------------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit_matches_bitsandbytes(quant_type, blocksize, nested):
    torch.manual_seed(11)
    # rows a multiple of the blocksize: bitsandbytes 0.50's native CPU kernel is only
    # right there (see test_dequantize_4bit_odd_shapes for other shapes)
    for dtype in DTYPES:
        w = torch.randn(24, 512).to(dtype)
        packed, qs = _quantize(w, quant_type, blocksize, nested)
        expected = bnbf.dequantize_4bit(packed, qs)
        out = triton_dequantize_4bit(packed, qs)
        assert out.dtype == expected.dtype == dtype
        ref = reference.dequantize_4bit(packed, qs)
        assert torch.equal(ref, expected), "the pure-torch oracle must match bitsandbytes bit for bit"
        if dtype == torch.bfloat16 and INTERPRETED:
            # Triton's interpreter rounds fp32 -> bf16 half-up, not to nearest even: 1 ulp at most
            ulp = expected.float().abs() * 2.0 ** -7
            assert ((out.float() - expected.float()).abs() <= ulp).all()
        else:
            assert torch.equal(out, expected)
        # the fp32 values are exact everywhere
        exact = reference.dequantize_4bit(packed, qs, torch.float32)
        assert torch.equal(triton_dequantize_4bit(packed, qs, torch.float32), exact)


@pytest.mark.parametrize("shape", [(37, 95), (80, 96), (5, 63)])
def test_dequantize_4bit_odd_shapes(shape):
    torch.manual_seed(12)
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        w = torch.randn(*shape)
        packed, qs = _quantize(w, quant_type, 64, nested)
        out = triton_dequantize_4bit(packed, qs)
        assert torch.equal(out, reference.dequantize_4bit(packed, qs))
        # and it reconstructs W within the 4-bit quantization error
        assert (out - w).abs().max() <= 0.5 * w.abs().max()


def test_public_dequantize_dispatch():
    torch.manual_seed(13)
    packed, qs = _quantize(torch.randn(16, 64), "nf4", 64, True)
    from fastsft_kernels.lora import dequantize_4bit

    assert torch.equal(dequantize_4bit(packed, qs), reference.dequantize_4bit(packed, qs))


# --------------------------------------------------------------------------- lora_linear parity
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_dense(dtype):
    args, ref = _make(1, dtype)
    _check(args, ref, 0.75, BOUNDS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_dense_trainable_weight_3d(dtype):
    args, ref = _make(2, dtype, lead=(3, 13), in_f=70, out_f=45, rank=5, weight_grad=True)
    _check(args, ref, 2.0, BOUNDS[dtype], weight_grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 64, True), ("fp4", 128, False)])
def test_lora_linear_4bit(dtype, quant_type, blocksize, nested):
    args, ref = _make(3, dtype, quant=quant_type, blocksize=blocksize, nested=nested)
    _check(args, ref, 0.5, BOUNDS[dtype])


@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 256, False), ("fp4", 64, True)])
def test_lora_linear_4bit_odd_in_features_3d(quant_type, blocksize, nested):
    # odd in_features: a row does not start on a byte boundary (per-element nibble path)
    args, ref = _make(4, torch.bfloat16, lead=(2, 11), in_f=95, out_f=37, rank=3, bias=False,
                      quant=quant_type, blocksize=blocksize, nested=nested)
    _check(args, ref, 1.5, BOUNDS[torch.bfloat16])


@pytest.mark.parametrize("blocksize", [64, 256])
def test_lora_linear_4bit_one_block_per_tile_row(blocksize):
    # in_features a multiple of the blocksize: the kernels load one absmax per tile row
    args, ref = _make(8, torch.float16, lead=(29,), in_f=256, out_f=40, rank=6, quant="nf4", blocksize=blocksize,
                      nested=True)
    _check(args, ref, 0.9, BOUNDS[torch.float16])


def test_lora_linear_no_tokens():
    args, ref = _make(9, torch.float32, lead=(0,), in_f=32, out_f=16, rank=4, quant="nf4")
    x, w, a, b, bi, qs = args
    y = fk.lora_linear(x, w, a, b, 1.0, bias=bi, quant_state=qs)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("rank", [1, 16, 128])
def test_lora_linear_ranks(rank):
    args, ref = _make(5, torch.float32, lead=(21,), in_f=48, out_f=33, rank=rank, quant="nf4")
    _check(args, ref, 0.3, BOUNDS[torch.float32])


def test_lora_linear_bf16_adapter_weights():
    # peft may keep the adapter in the model dtype instead of fp32
    args, ref = _make(6, torch.bfloat16, lora_dtype=torch.bfloat16)
    _check(args, ref, 1.0, BOUNDS[torch.bfloat16])


def test_lora_linear_fused_projections():
    """q/k/v-style: three projections of one x (dense, NF4, dense), ranks 8/4/16."""
    torch.manual_seed(7)
    in_f, outs, ranks, scalings = 96, (64, 32, 40), (8, 4, 16), (0.5, 2.0, 1.0)
    x = torch.randn(2, 19, in_f, dtype=torch.bfloat16, requires_grad=True)
    weights, qss = [], []
    for i, n in enumerate(outs):
        w = (torch.randn(n, in_f) / in_f ** 0.5).to(torch.bfloat16)
        if i == 1:
            w, qs = _quantize(w, "nf4", 64, True)
        else:
            qs = None
        weights.append(w)
        qss.append(qs)
    lora_as = [(torch.randn(r, in_f) / in_f ** 0.5).requires_grad_(True) for r in ranks]
    lora_bs = [(torch.randn(n, r) * 0.5).requires_grad_(True) for n, r in zip(outs, ranks)]
    biases = [torch.randn(outs[0], dtype=torch.bfloat16, requires_grad=True), None, None]
    ys = lora_linear_fused(x, weights, lora_as, lora_bs, scalings, biases=biases, quant_states=qss)
    grads = [torch.randn(y.shape).to(y.dtype) for y in ys]
    torch.autograd.backward(ys, grads)

    x64 = x.detach().double().requires_grad_(True)
    a64 = [a.detach().double().requires_grad_(True) for a in lora_as]
    b64 = [b.detach().double().requires_grad_(True) for b in lora_bs]
    bias64 = biases[0].detach().double().requires_grad_(True)
    refs = [reference.lora_linear(x64, w if q is not None else w.double(), a, b, s, quant_state=q,
                                  bias=bias64 if i == 0 else None)
            for i, (w, a, b, s, q) in enumerate(zip(weights, a64, b64, scalings, qss))]
    torch.autograd.backward(refs, [g.double() for g in grads])
    bound = BOUNDS[torch.bfloat16]
    for i in range(3):
        assert_close(ys[i], refs[i], bound, f"y[{i}]")
        assert_close(lora_as[i].grad, a64[i].grad, bound, f"dA[{i}]")
        assert_close(lora_bs[i].grad, b64[i].grad, bound, f"dB[{i}]")
    assert_close(x.grad, x64.grad, bound, "dx")
    assert_close(biases[0].grad, bias64.grad, bound, "dbias")


# --------------------------------------------------------------------------- against peft's layers
def _lora_config(rank, alpha):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False)


def _peft_layer(base, rank=8, alpha=12):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return LoraLinear(base, "default", _lora_config(rank, alpha), r=rank, lora_alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_peft_linear(dtype):
    torch.manual_seed(21)
    base = torch.nn.Linear(96, 80, bias=True).to(dtype)
    layer = _peft_layer(base)
    x = torch.randn(37, 96, dtype=dtype, requires_grad=True)
    y_peft = layer(x)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = [x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone()]
    x.grad = None
    layer.zero_grad()
    y = fk.lora_linear(x, base.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                       layer.scaling["default"], bias=base.bias)
    y.backward(g)
    got = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(y, y_peft, bound, "y vs peft")
    for name, o, e in zip(("dx", "dA", "dB"), got, expected):
        assert_close(o, e, bound, f"{name} vs peft")


def test_matches_peft_linear4bit():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    torch.manual_seed(22)
    dense = torch.nn.Linear(128, 72, bias=True)
    base = bnb.nn.Linear4bit(128, 72, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                    blocksize=64, compress_statistics=True)
    base.bias = torch.nn.Parameter(dense.bias.data.clone())
    base = base.to("cpu")
    layer = LoraLinear4bit(base, "default", _lora_config(8, 16), r=8, lora_alpha=16)
    layer.train()
    x = torch.randn(3, 11, 128, requires_grad=True)
    y_peft = layer(x)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
    x.grad = None
    layer.zero_grad()
    y = fk.lora_linear(x, base.weight.data, a, b, layer.scaling["default"], bias=base.bias,
                       quant_state=base.weight.quant_state)
    y.backward(g)
    assert_close(y, y_peft, 1e-5, "y vs peft+bnb")
    for name, o, e in zip(("dx", "dA", "dB"), (x.grad, a.grad, b.grad), expected):
        assert_close(o, e, 1e-5, f"{name} vs peft+bnb")


# --------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_value_error():
    torch.manual_seed(31)
    x = torch.randn(5, 16)
    w = torch.randn(8, 16)
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ValueError, match="in_features"):
        fk.lora_linear(torch.randn(5, 15), w, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_a"):
        fk.lora_linear(x, w, torch.randn(4, 15), b, 1.0)
    with pytest.raises(ValueError, match="lora_b"):
        fk.lora_linear(x, w, a, torch.randn(8, 3), 1.0)
    with pytest.raises(ValueError, match="rank"):
        fk.lora_linear(x, w, torch.randn(129, 16), torch.randn(8, 129), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        fk.lora_linear(x, w.half(), a, b, 1.0)
    with pytest.raises(ValueError, match="quant_state"):
        fk.lora_linear(x, torch.zeros(64, dtype=torch.uint8), a, b, 1.0)
    with pytest.raises(ValueError, match="bias"):
        fk.lora_linear(x, w, a, b, 1.0, bias=torch.randn(7))
    packed, qs = _quantize(torch.randn(8, 16), "nf4", 64)
    with pytest.raises(ValueError, match="bytes"):
        fk.lora_linear(x, packed[:10], a, b, 1.0, quant_state=qs)


# --------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("rank", [16, 64])
def test_lora_linear_real_size_gpu(quant, rank):
    args, ref = _make(41, torch.bfloat16, lead=(2, 1024), in_f=4096, out_f=4096 + 96, rank=rank, quant=quant,
                      nested=True, device="cuda")
    # float64 reference on the GPU (cuBLAS fp64) keeps this fast
    _check(args, ref, 0.5, 2e-2)


@pytest.mark.gpu
def test_lora_linear_fp32_gpu_odd():
    args, ref = _make(42, torch.float32, lead=(333,), in_f=1000, out_f=777, rank=13, quant="fp4", device="cuda")
    _check(args, ref, 0.5, 1e-5)
