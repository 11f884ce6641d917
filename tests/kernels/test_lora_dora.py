"""Parity of fastsft_kernels.lora_linear_ex: DoRA, QDoRA, dropout on the LoRA input, LoRA bias.

Oracles: fastsft_kernels.reference.lora_linear_ex in float64 (every dtype, dense and
NF4/FP4/double-quant bases, ranks 1-128, both 4-bit strategies), and peft 0.21's own
LoRA layers (Linear and bnb Linear4bit with use_dora=True, lora_bias=True, and
dropout with the mask forced equal through DROPOUT_MASK_HOOK): the outputs and
every gradient, the DoRA magnitude's included. Without the hook: keep rate,
scaling and seeded reproducibility of the drawn masks.
"""
import pytest
import torch

import fastsft_kernels as fk
from fastsft_kernels import lora_dora, reference
from fastsft_kernels.testing import assert_close

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
import bitsandbytes.functional as bnbf  # noqa: E402

BOUNDS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _make(seed, dtype, *, lead=(37,), in_f=96, out_f=80, rank=8, bias=True, quant=None, nested=False, dora=True,
          p=0.0, lora_bias=False, device="cpu"):
    """(op kwargs, float64 reference kwargs, the tensors whose gradients are compared)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    a = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
    b = torch.randn(out_f, rank, generator=g) * 0.5
    bi = torch.randn(out_f, generator=g).to(dtype) if bias else None
    m = (torch.rand(out_f, generator=g) + 0.5) * (w.float().norm(dim=1) + 0.1) if dora else None
    lb = torch.randn(out_f, generator=g) if lora_bias else None
    mask = (torch.rand(*lead, in_f, generator=g) >= p) if p else None
    qs = None
    if quant is not None:
        w, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant, compress_statistics=nested)
        qs.to(device)
    w = w.to(device)
    mask = None if mask is None else mask.to(device)
    leaves = {"x": x, "a": a, "b": b, "bias": bi, "magnitude": m, "lora_bias": lb}
    leaves = {k: v.to(device).requires_grad_(True) for k, v in leaves.items() if v is not None}
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}

    def kwargs(t, weight):
        return dict(x=t["x"], weight=weight, lora_a=t["a"], lora_b=t["b"], scaling=1.5, bias=t.get("bias"),
                    quant_state=qs, magnitude=t.get("magnitude"), dropout_p=p, dropout_mask=mask,
                    lora_bias=t.get("lora_bias"))

    ref_w = w if quant is not None else w.double()
    return kwargs(leaves, w), kwargs(ref_leaves, ref_w), leaves, ref_leaves


def _check(seed, dtype, bound=None, dequant_rows=None, **cfg):
    ours, ref, leaves, ref_leaves = _make(seed, dtype, **cfg)
    y = fk.lora_linear_ex(**ours, dequant_rows=dequant_rows)
    y_ref = reference.lora_linear_ex(**ref)
    assert y.dtype == dtype and y.shape == y_ref.shape
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(y.device)
    y.backward(g)
    y_ref.backward(g.double())
    bound = bound or BOUNDS[dtype]
    assert_close(y, y_ref, bound, "y")
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert_close(t.grad, ref_leaves[name].grad, bound, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 16, 128])
@pytest.mark.parametrize("bias", [True, False])  # without bias nor dropout, DoRA's backward reads y (not z)
def test_dora_dense_matches_reference(dtype, rank, bias):
    _check(1, dtype, rank=rank, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant,nested", [("nf4", False), ("fp4", False), ("nf4", True)])
@pytest.mark.parametrize("dequant_rows", [0, None])  # dequantize + cuBLAS / the in-register Triton GEMM
def test_qdora_matches_reference(dtype, quant, nested, dequant_rows):
    _check(2, dtype, quant=quant, nested=nested, rank=5, dequant_rows=dequant_rows)
    _check(3, dtype, quant=quant, nested=nested, rank=5, dequant_rows=dequant_rows, bias=False)


@pytest.mark.parametrize("rank", [1, 128])
def test_qdora_rank_extremes_match_reference(rank):
    for dequant_rows in (0, None):
        _check(2, torch.bfloat16, quant="nf4", nested=True, rank=rank, dequant_rows=dequant_rows, p=0.1)
        _check(2, torch.bfloat16, quant="nf4", nested=True, rank=rank, dequant_rows=dequant_rows, bias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_dropout_forced_mask_matches_reference(dtype, dora):
    _check(3, dtype, dora=dora, p=0.3, lead=(3, 11))


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_lora_bias_and_dropout_match_reference(quant):
    _check(4, torch.float32, dora=False, lora_bias=True, p=0.2, quant=quant, dequant_rows=0)
    _check(5, torch.bfloat16, dora=False, lora_bias=True, bias=False, quant=quant)


def test_fused_members_mix_dora_dropout_and_plain():
    # q/k/v-like: a DoRA member with dropout, a plain member with dropout, a plain member
    torch.manual_seed(6)
    x = torch.randn(29, 64, requires_grad=True)
    ws = [torch.randn(o, 64) / 8 for o in (48, 16, 16)]
    a_s = [(torch.randn(r, 64) / 8).requires_grad_(True) for r in (4, 8, 3)]
    b_s = [(torch.randn(o, r) * 0.5).requires_grad_(True) for o, r in zip((48, 16, 16), (4, 8, 3))]
    mag = (ws[0].norm(dim=1) * 1.3).requires_grad_(True)
    masks = [torch.rand(29, 64) >= 0.25, torch.rand(29, 64) >= 0.1, None]
    ps = [0.25, 0.1, 0.0]
    ys = fk.lora_linear_ex_fused(x, ws, a_s, b_s, [0.5, 2.0, 1.0], magnitudes=[mag, None, None], dropout_ps=ps,
                                 dropout_masks=masks)
    gs = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, gs)
    got = [x.grad, mag.grad] + [t.grad for t in a_s + b_s]
    leaves = [x, mag] + a_s + b_s
    for t in leaves:
        t.grad = None
    refs = [reference.lora_linear_ex(x, w, a, b, s, magnitude=m, dropout_p=p, dropout_mask=mk)
            for w, a, b, s, m, p, mk in zip(ws, a_s, b_s, [0.5, 2.0, 1.0], [mag, None, None], ps, masks)]
    torch.autograd.backward(refs, gs)
    for y, r in zip(ys, refs):
        assert_close(y, r, 1e-5, "y")
    for i, (o, t) in enumerate(zip(got, leaves)):
        assert_close(o, t.grad, 1e-5, f"grad {i}")


def test_row_norm_matches_dense_norm():
    torch.manual_seed(7)
    w, a, b = torch.randn(40, 72), torch.randn(6, 72), torch.randn(40, 6)
    expected = torch.linalg.norm(w.double() + 0.7 * (b.double() @ a.double()), dim=1)
    assert_close(lora_dora.weight_row_norm(w, a, b, 0.7), expected, 1e-5, "row norm")


# --------------------------------------------------------------------------- against peft's layers
def _peft_config(rank, alpha, **extra):
    cfg = dict(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False)
    cfg.update(extra)
    return peft.LoraConfig(**cfg)


class _ForcedDropout(torch.nn.Dropout):
    """nn.Dropout whose mask is given (peft's side of the forced-mask comparison)."""

    def __init__(self, p, mask):
        super().__init__(p)
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p) if self.training else x


def _compare_with_peft(layer, x, dora, p, quant_state=None, dtype=torch.float32, bound=1e-5):
    base = layer.get_base_layer()
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) >= p) if p else None
    if p:
        layer.lora_dropout["default"] = _ForcedDropout(p, mask)
    if dora:  # move the magnitude away from its initial ||W + s B A|| so that c != 1
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, base.out_features))
    layer.train()
    y_peft = layer(x)
    g = torch.randn(y_peft.shape, generator=torch.Generator().manual_seed(8)).to(y_peft.dtype)
    y_peft.backward(g)
    params = {n: t for n, t in layer.named_parameters() if t.requires_grad}
    expected = {n: t.grad.clone() for n, t in params.items()}
    expected_x = x.grad.clone()
    x.grad = None
    layer.zero_grad()
    lora_b = layer.lora_B["default"]
    weight = base.weight.data if quant_state is not None else base.weight
    y = fk.lora_linear_ex(x, weight, layer.lora_A["default"].weight, lora_b.weight, layer.scaling["default"],
                          bias=base.bias, quant_state=quant_state,
                          magnitude=layer.lora_magnitude_vector["default"].weight if dora else None,
                          dropout_p=p, dropout_mask=mask, lora_bias=lora_b.bias)
    y.backward(g)
    assert_close(y, y_peft, bound, "y vs peft")
    assert_close(x.grad, expected_x, bound, "dx vs peft")
    assert expected and all(t.grad is not None for t in params.values())
    for n, t in params.items():
        assert_close(t.grad, expected[n], bound, f"{n} vs peft")
    if dora:
        assert any("lora_magnitude_vector" in n for n in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_matches_peft_linear(dtype, p):
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(21)
    base = torch.nn.Linear(96, 80, bias=p == 0.0).to(dtype)  # no bias with dropout: both y and z paths
    layer = LoraLinear(base, "default", _peft_config(8, 12, use_dora=True), r=8, lora_alpha=12)
    layer.to(dtype)  # adapters in the model dtype: both paths then compute in it
    x = torch.randn(3, 13, 96, dtype=dtype, requires_grad=True)
    _compare_with_peft(layer, x, True, p, dtype=dtype, bound=1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_bias_and_dropout_match_peft_linear(p):
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(22)
    base = torch.nn.Linear(64, 48, bias=False)
    layer = LoraLinear(base, "default", _peft_config(4, 8, lora_bias=True), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].bias.normal_()
    x = torch.randn(21, 64, requires_grad=True)
    _compare_with_peft(layer, x, False, p)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_qdora_matches_peft_linear4bit(quant_type, nested, p):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    torch.manual_seed(23)
    dense = torch.nn.Linear(128, 72, bias=True)
    base = bnb.nn.Linear4bit(128, 72, bias=True, compute_dtype=torch.float32, quant_type=quant_type)
    base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                    blocksize=64, compress_statistics=nested)
    base.bias = torch.nn.Parameter(dense.bias.data.clone())
    base = base.to("cpu")
    layer = LoraLinear4bit(base, "default", _peft_config(8, 16, use_dora=True), r=8, lora_alpha=16)
    x = torch.randn(3, 11, 128, requires_grad=True)
    _compare_with_peft(layer, x, True, p, quant_state=base.weight.quant_state)


@pytest.mark.parametrize("rank", [1, 128])
@pytest.mark.parametrize("four_bit", [False, True])
def test_rank_extremes_match_peft(rank, four_bit):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(24)
    dense = torch.nn.Linear(128, 64, bias=True)
    if four_bit:
        base = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        blocksize=64, compress_statistics=True)
        base.bias = torch.nn.Parameter(dense.bias.data.clone())
        layer = LoraLinear4bit(base.to("cpu"), "default", _peft_config(rank, rank, use_dora=True), r=rank,
                               lora_alpha=rank)
    else:
        layer = LoraLinear(dense, "default", _peft_config(rank, rank, use_dora=True), r=rank, lora_alpha=rank)
    x = torch.randn(2, 17, 128, requires_grad=True)
    qs = layer.get_base_layer().weight.quant_state if four_bit else None
    _compare_with_peft(layer, x, True, 0.1, quant_state=qs)


# --------------------------------------------------------------------------- drawn masks
def test_drawn_mask_keep_rate_scaling_and_seed():
    # W = 0 and A = B = identity, s = 1: y is x_d itself, so y / x shows the mask and its scale
    n, p = 64, 0.3
    x = torch.randn(256, n) + 3.0  # no zeros in x
    eye = torch.eye(n)

    def run(seed):
        torch.manual_seed(seed)
        return fk.lora_linear_ex(x, torch.zeros(n, n), eye, eye, 1.0, dropout_p=p)

    y = run(0)
    ratio = y / x
    kept = ratio != 0
    assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), 1e-6, "scale of kept inputs")
    rate = kept.float().mean().item()
    # 16384 Bernoulli(0.7) draws: 5 standard deviations is 0.018
    assert abs(rate - (1 - p)) < 0.018, rate
    assert torch.equal(run(0), y), "the same seed must draw the same mask (resume-exact)"
    assert not torch.equal(run(1), y)
    torch.manual_seed(0)
    fk.lora_linear_ex(x, torch.zeros(n, n), eye, eye, 1.0, dropout_p=0.0)  # p = 0 draws nothing
    assert torch.equal(fk.lora_linear_ex(x, torch.zeros(n, n), eye, eye, 1.0, dropout_p=p), y)


def test_mask_hook_forces_the_mask(monkeypatch):
    mask = torch.rand(7, 32) >= 0.5
    monkeypatch.setattr(lora_dora, "DROPOUT_MASK_HOOK", lambda p, shape, device: mask)
    x, w, a, b = torch.randn(7, 32), torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4)
    y = fk.lora_linear_ex(x, w, a, b, 1.0, dropout_p=0.5)
    assert_close(y, reference.lora_linear_ex(x, w, a, b, 1.0, dropout_p=0.5, dropout_mask=mask), 1e-5, "y")


def test_bad_inputs_raise_value_error():
    x, w, a, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        fk.lora_linear_ex(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="magnitude"):
        fk.lora_linear_ex(x, w, a, b, 1.0, magnitude=torch.ones(7))
    with pytest.raises(ValueError, match="not supported"):
        fk.lora_linear_ex(x, w, a, b, 1.0, magnitude=torch.ones(8), lora_bias=torch.ones(8))
    with pytest.raises(ValueError, match="dropout_mask"):
        fk.lora_linear_ex(x, w, a, b, 1.0, dropout_p=0.1, dropout_mask=torch.ones(5, 16))


# --------------------------------------------------------------------------- compile tier
def test_launches_only_variants_the_compile_tier_compiles(monkeypatch):
    """lora_linear_ex adds no kernel variant: every launch it makes (DoRA, QDoRA, dropout, bias,
    both 4-bit strategies, bf16/fp16/fp32) is one ``lora.launch_variants`` lists, which the compile
    tier (tests/compile/specs.py) compiles."""
    import re

    from fastsft_kernels import lora

    listed = {re.sub(r"_BM\d+.*$", "", e["name"]) for e in lora.launch_variants((9, 0), dtypes=("bf16", "fp16"),
                                                                                ranks=(16,))}
    dt_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    launched = set()
    real_matmul, real_project, real_reduce = lora_dora._matmul, lora_dora._rank_project, lora_dora._rank_reduce

    def matmul(a, weight, absmax, lo, p, p_strides, scale, bias, out, *, forward, accumulate=False):
        assert lo.shape[1] <= 16
        launched.add(f"lora_matmul_{'fwd' if forward else 'bwd_dx'}_{'4bit' if weight.is_4bit else 'dense'}_"
                     f"{dt_name[a.dtype]}_r16{'_bias' if bias is not None else ''}{'_acc' if accumulate else ''}")
        return real_matmul(a, weight, absmax, lo, p, p_strides, scale, bias, out, forward=forward,
                           accumulate=accumulate)

    def project(x, p, p_strides, r, scale, out=None):
        assert r <= 16
        launched.add(f"rank_project_{dt_name[x.dtype]}_p{dt_name[p.dtype]}_r16")
        return real_project(x, p, p_strides, r, scale, out=out)

    def reduce(y, z, src):
        assert z.shape[1] <= 16 and z.dtype == torch.float32
        launched.add(f"rank_reduce_{dt_name[y.dtype]}_r16")
        return real_reduce(y, z, src)

    monkeypatch.setattr(lora_dora, "_matmul", matmul)
    monkeypatch.setattr(lora_dora, "_rank_project", project)
    monkeypatch.setattr(lora_dora, "_rank_reduce", reduce)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for quant in (None, "nf4"):
            for dora, p in ((True, 0.0), (True, 0.2), (False, 0.2)):
                for rows in (0, None):
                    _check(10, dtype, quant=quant, dora=dora, p=p, rank=16, lead=(9,), in_f=64, out_f=32,
                           dequant_rows=rows)
    assert any(name.startswith("lora_matmul") for name in launched)
    assert launched <= listed, f"variants the compile tier does not compile: {sorted(launched - listed)}"


# --------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_dora_real_size_gpu(quant, p):
    # both 4-bit strategies: 2048 rows take dequantize + cuBLAS, the dequant_rows override the Triton GEMM
    for rows in (None, 2 ** 30):
        _check(41, torch.bfloat16, lead=(2, 1024), in_f=4096, out_f=4096 + 96, rank=16, quant=quant, nested=True,
               p=p, dequant_rows=rows, device="cuda")


@pytest.mark.parametrize("dora,p,bias", [(True, 0.0, True), (True, 0.0, False), (True, 0.3, True), (False, 0.3, True)])
def test_trainable_dense_base_gets_its_gradient(dora, p, bias):
    # not a LoRA setup fastsft's patch makes, but the op keeps lora_linear's contract: a dense W that
    # requires grad gets dW (the DoRA norm stays detached, as in peft)
    ours, ref, leaves, ref_leaves = _make(12, torch.float32, dora=dora, p=p, bias=bias)
    ours["weight"].requires_grad_(True)
    ref["weight"] = ref["weight"].detach().requires_grad_(True)
    y = fk.lora_linear_ex(**ours)
    y_ref = reference.lora_linear_ex(**ref)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(13))
    y.backward(g)
    y_ref.backward(g.double())
    assert_close(ours["weight"].grad, ref["weight"].grad, 1e-5, "dW")
    assert_close(leaves["x"].grad, ref_leaves["x"].grad, 1e-5, "dx")
