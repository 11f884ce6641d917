"""Every public op is a torch.library operator in the ``fastsft`` namespace that passes opcheck.

``torch.library.opcheck`` runs, per op and sample: the schema check (mutations and aliasing
as declared), the fake-tensor check (the fake implementation's outputs match the real ones in
shape, dtype and strides), the autograd registration check and AOT dispatch with dynamic
shapes (forward + backward traced through the fake implementations). Each sample runs on both
CPU paths: the reference (``FASTSFT_TRITON_ON_CPU=0``) and the Triton kernels through the
interpreter (the suite's default). Backward operators get their own opcheck.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastsft_kernels as fk

fk.load_operators()
ops = torch.ops.fastsft

PATHS = ["reference", "triton"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "1" if request.param == "triton" else "0")
    return request.param


def _check(op, args, kwargs=None):
    result = torch.library.opcheck(op, args, kwargs or {})
    assert set(result.values()) == {"SUCCESS"}, result


def _g(*shape, dtype=torch.float32, grad=True):
    return (torch.randn(*shape) * 2).to(dtype).requires_grad_(grad)


# ------------------------------------------------------------------ norm / swiglu / rope
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(path, offset, dtype):
    torch.manual_seed(0)
    _check(ops.rms_norm.default, (_g(3, 5, 24, dtype=dtype), _g(24, dtype=dtype), 1e-6, offset))
    x = _g(7, 24, grad=False)
    y, rstd = ops.rms_norm(x, _g(24, grad=False), 1e-6, offset)
    _check(ops.rms_norm_backward.default, (torch.randn(7, 24), x, torch.randn(24), rstd, 1e-6, offset))


def test_swiglu(path):
    torch.manual_seed(1)
    _check(ops.swiglu.default, (_g(3, 5, 40), _g(3, 5, 40)))
    _check(ops.swiglu_backward.default, (torch.randn(9, 40), torch.randn(9, 40), torch.randn(9, 40)))


@pytest.mark.parametrize("rot", [16, 10])
def test_rope(path, rot):
    torch.manual_seed(2)
    # Hugging Face hands over (batch, heads, seq, dim) views of (batch, seq, heads, dim) buffers
    q = _g(2, 7, 4, 16).transpose(1, 2)
    k = _g(2, 7, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(2, 7, rot), torch.randn(2, 7, rot)
    _check(ops.rope.default, (q, k, cos, sin))
    _check(ops.rope_backward.default, (torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), cos, sin))


# ------------------------------------------------------------------ losses
def _labels(n, vocab, ignored=3):
    labels = torch.randint(0, vocab, (n,))
    labels[:ignored] = -100
    return labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(path, reduction):
    torch.manual_seed(3)
    logits, labels = _g(13, 61), _labels(13, 61)
    _check(ops.cross_entropy.default, (logits, labels, -100, reduction, None, None, 0.1, 1e-3, 30.0))
    _check(ops.cross_entropy.default, (logits, labels, -100, reduction, torch.tensor(20.0), None, 0.0, 0.0, None))
    _check(ops.cross_entropy.default, (logits, labels, -100, reduction, None, 25.0, 0.0, 0.0, None))
    lg = logits.detach()
    _, stats, divisor = ops.cross_entropy(lg, labels, -100, reduction, None, None, 0.0, 0.0, None)
    grad_out = torch.randn(13) if reduction == "none" else torch.tensor(0.7)
    _check(ops.cross_entropy_backward.default, (grad_out, lg, labels, stats, divisor, -100, reduction, 0.0, 0.0, None))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy(path, reduction, bias):
    torch.manual_seed(4)
    hidden, weight, labels = _g(21, 24), _g(67, 24), _labels(21, 67)
    b = _g(67) if bias else None
    for needs in [(True, True, bias), (True, False, False)]:
        _check(ops.linear_cross_entropy.default,
               (hidden, weight, b, labels, -100, reduction, None, None, 20.0, 1e-4, 0.05, 8, *needs))
    args = (hidden.detach(), weight.detach(), b.detach() if bias else None, labels)
    _, _, _, _, stats, divisor = ops.linear_cross_entropy(*args, -100, reduction, None, None, None, 0.0, 0.0, 8,
                                                          False, False, False)
    grad_out = torch.randn(21) if reduction == "none" else torch.tensor(1.3)
    _check(ops.linear_cross_entropy_backward.default,
           (grad_out, *args, stats, divisor, -100, reduction, None, 0.0, 0.0, 8, True, True, bias))


def test_linear_cross_entropy_scale_grads(path):
    torch.manual_seed(5)
    gh, gw, gb = torch.randn(9, 8), torch.randn(11, 8), torch.randn(11)
    _check(ops.linear_cross_entropy_scale_grads.default, (gh, gw, gb, torch.tensor(0.5)))


# ------------------------------------------------------------------ fake tracing follows the kernels
class _Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_fake_linear_cross_entropy_never_builds_full_logits(monkeypatch):
    """Under FakeTensorMode the public function runs the operator's fake implementation, even
    where a real CPU call would take the reference path: the trace holds the kernel's memory
    behaviour (one chunk of logits), not the reference's (tokens x vocab logits)."""
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    n, vocab, chunk = 4096, 32000, 256
    with _Allocations() as seen, FakeTensorMode():
        hidden = torch.empty(n, 64, requires_grad=True)
        weight = torch.empty(vocab, 64, requires_grad=True)
        labels = torch.zeros(n, dtype=torch.long)
        loss = fk.linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        loss.backward()
    assert (n, vocab) not in seen.shapes, "full logits were materialised"
    assert "fastsft.linear_cross_entropy" in seen.ops and "fastsft.linear_cross_entropy_scale_grads" in seen.ops
    assert hidden.grad is not None and hidden.grad.shape == (n, 64) and weight.grad.shape == (vocab, 64)


def test_fake_tracing_runs_every_simple_op(monkeypatch):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    with FakeTensorMode():
        x = torch.empty(2, 6, 32, requires_grad=True)
        w = torch.empty(32, requires_grad=True)
        y = fk.rms_norm(x, w, 1e-6)
        q = torch.empty(2, 6, 4, 32).transpose(1, 2)
        k = torch.empty(2, 6, 2, 32).transpose(1, 2)
        qo, ko = fk.rope(q, k, torch.empty(2, 6, 32), torch.empty(2, 6, 32))
        h = fk.swiglu(y, y)
        loss = fk.cross_entropy(h.reshape(12, 32), torch.zeros(12, dtype=torch.long))
        loss.backward()
    assert qo.stride() == q.stride() and x.grad.shape == x.shape and w.grad.shape == w.shape


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("window,softcap", [(None, None), (5, 20.0)])
def test_varlen_attention(path, window, softcap):
    from fastsft_kernels.attention import make_cu_seqlens

    torch.manual_seed(6)
    cu = make_cu_seqlens([0, 7, 8, 19], "cpu")
    q, k, v = _g(19, 4, 16), _g(19, 2, 16), _g(19, 2, 16)
    _check(ops.varlen_attention.default, (q, k, v, cu, 11, True, 0.25, window, softcap))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = ops.varlen_attention(qd, kd, vd, cu, 11, True, 0.25, window, softcap)
    _check(ops.varlen_attention_backward.default,
           (torch.randn(19, 4, 16), qd, kd, vd, out, lse, cu, 11, True, 0.25, window, softcap))


# ------------------------------------------------------------------ LoRA and 4-bit weights
def _nf4(out_f, in_f, nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(torch.randn(out_f, in_f), blocksize=64, quant_type="nf4",
                                       compress_statistics=nested)
    return packed, state


def _lora_args(x2, weights, states, lora_as, lora_bs, biases, strategies):
    from fastsft_kernels.lora import _state_args

    quant = [list(c) for c in zip(*[_state_args(w, q) for w, q in zip(weights, states)])]
    return (x2, weights, lora_as, lora_bs, [0.5, 2.0][:len(weights)],
            [b if b is not None else torch.empty(0) for b in biases], [b is not None for b in biases],
            *quant, strategies)


@pytest.mark.parametrize("strategies", [["cublas", "triton"], ["triton", "cublas"]])
def test_lora_linear_dense(path, strategies):
    torch.manual_seed(7)
    x2 = _g(9, 64)
    weights = [_g(48, 64, grad=False), _g(32, 64)]  # a frozen base and a trained one
    args = _lora_args(x2, weights, [None, None], [_g(4, 64), _g(2, 64)], [_g(48, 4), _g(32, 2)],
                      [_g(48), None], strategies)
    _check(ops.lora_linear.default, args)
    outs = ops.lora_linear(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grads = [torch.randn_like(o) for o in outs[:2]]
    detached = [[t.detach() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
                for a in args[1:]]
    _check(ops.lora_linear_backward.default,
           (grads, x2.detach(), outs[2], *detached[:5], *detached[5:-1], detached[-1], True, [False, True],
            [True, True], [True, True], [True, False]))


@pytest.mark.parametrize("nested", [False, True])
def test_lora_linear_4bit(path, nested):
    torch.manual_seed(8)
    packed, state = _nf4(64, 64, nested)
    x2 = _g(5, 64)
    args = _lora_args(x2, [packed], [state], [_g(4, 64)], [_g(64, 4)], [None], ["triton"])
    _check(ops.lora_linear.default, args)


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit(path, nested):
    from fastsft_kernels.lora import _state_args

    packed, state = _nf4(64, 64, nested)
    _check(ops.dequantize_4bit.default, (packed, *_state_args(packed, state), torch.bfloat16))


def test_fake_tracing_runs_attention_and_qlora(monkeypatch):
    """cu_seqlens and the quant state are operator arguments: nothing reads a device value under fake tensors."""
    from fastsft_kernels.attention import make_cu_seqlens

    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    packed, state = _nf4(64, 64, True)
    cu = make_cu_seqlens([0, 5, 12], "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(12, 64, requires_grad=True)
        a, b = torch.empty(4, 64, requires_grad=True), torch.empty(64, 4, requires_grad=True)
        y = fk.lora_linear(x, packed, a, b, 2.0, quant_state=state)
        out = fk.varlen_attention(y.view(12, 4, 16), y.view(12, 4, 16), y.view(12, 4, 16), cu, 7)
        out.sum().backward()
    assert x.grad.shape == (12, 64) and a.grad.shape == (4, 64) and b.grad.shape == (64, 4)


# ------------------------------------------------------------------ torch.compile sees one node per op
def test_compiled_ops_have_no_graph_break_and_match_eager(path):
    """fullgraph=True (a break would raise) with AOT autograd over every op's forward and backward."""
    from fastsft_kernels.attention import make_cu_seqlens

    torch.manual_seed(9)
    cu = make_cu_seqlens([0, 5, 12], "cpu")
    packed, state = _nf4(64, 64, True)
    x0, w_norm = torch.randn(12, 64), torch.randn(64)
    a, b = torch.randn(8, 64) * 0.1, torch.randn(64, 8) * 0.1
    head, labels = torch.randn(67, 32) * 0.1, _labels(12, 67)

    def step(x, w_norm, a, b, head):
        h = fk.rms_norm(x, w_norm, 1e-6)
        y = fk.lora_linear(h, packed, a, b, 2.0, quant_state=state)
        q = y.view(12, 4, 16)
        o = fk.varlen_attention(q, q, q, cu, 7).reshape(12, 64)
        g = fk.swiglu(o[:, :32], o[:, 32:])
        return fk.linear_cross_entropy(g, head, labels)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x0, w_norm, a, b, head)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    eager = run(step)
    compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ LoRA with DoRA, dropout, a LoRA bias
def _ex_args(x2, weights, states, lora_as, lora_bs, biases=None, mags=None, masks=None, ps=None, strategies=None):
    """fastsft::lora_linear_ex's arguments; masks are drawn by the caller (the operator is deterministic)."""
    from fastsft_kernels.lora import _state_args

    n = len(weights)
    biases, mags = biases or [None] * n, mags or [None] * n
    masks, ps = masks or [None] * n, ps or [0.0] * n
    quant = [list(c) for c in zip(*[_state_args(w, q) for w, q in zip(weights, states)])]
    return (x2, weights, lora_as, lora_bs, [0.5, 2.0][:n], [b if b is not None else torch.empty(0) for b in biases],
            [b is not None for b in biases], [m if m is not None else torch.empty(0) for m in mags],
            [m is not None for m in mags], masks, ps, *quant, strategies or ["cublas"] * n)


def _mask(shape, p, seed):
    return torch.empty(shape, dtype=torch.bool).bernoulli_(1.0 - p, generator=torch.Generator().manual_seed(seed))


def _detach(args):
    return tuple([t.detach() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else
                 (a.detach() if isinstance(a, torch.Tensor) else a) for a in args)


def _check_ex(args):
    """opcheck the forward, then the backward on the forward's saved outputs (every gradient asked for)."""
    _check(ops.lora_linear_ex.default, args)
    plain = _detach(args)
    n = len(plain[1])
    outs = ops.lora_linear_ex(*plain)
    ys, xas, zs, norms = (list(outs[k * n:(k + 1) * n]) for k in range(4))
    has_bias, is_dora, masks = plain[6], plain[8], plain[9]
    kept = [ys[i] if is_dora[i] and masks[i] is None and not has_bias[i] else torch.empty(0) for i in range(n)]
    grads = [torch.randn_like(y) for y in ys]
    weights = plain[1]
    needs = (True, [w.is_floating_point() for w in weights], [True] * n, [True] * n, list(has_bias), list(is_dora))
    _check(ops.lora_linear_ex_backward.default, (grads, plain[0], xas, zs, norms, kept, *plain[1:], *needs))
    return outs


@pytest.mark.parametrize("case", ["dora", "dora_dropout", "lora_dropout", "lora_bias", "dora_bias"])
def test_lora_linear_ex_dense(path, case):
    torch.manual_seed(10)
    x2 = _g(7, 32)
    dora, p = case.startswith("dora"), 0.25 if "dropout" in case else 0.0
    bias = _g(24) * 0.1 if case.endswith("bias") else None  # lora_bias enters as part of the effective bias
    mags = [(torch.rand(24) + 0.5).requires_grad_()] if dora else None
    masks = [_mask((7, 32), p, 11)] if p else None
    args = _ex_args(x2, [_g(24, 32, grad=False)], [None], [_g(4, 32)], [_g(24, 4)], [bias], mags, masks,
                    [p], ["triton" if case == "lora_dropout" else "cublas"])
    outs = _check_ex(args)
    assert outs[0].shape == (7, 24) and outs[1].shape == (7, 4)
    assert outs[2].numel() == (7 * 24 if dora and (p or bias is not None) else 0)  # z kept only behind a bias/dropout
    assert outs[3].numel() == (24 if dora else 0)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_linear_ex_4bit_dora(path, nested, dropout):
    torch.manual_seed(12)
    packed, state = _nf4(64, 64, nested)
    x2 = _g(5, 64)
    masks = [_mask((5, 64), 0.1, 13)] if dropout else None
    _check_ex(_ex_args(x2, [packed], [state], [_g(4, 64)], [_g(64, 4)], None, [(torch.rand(64) + 0.5).requires_grad_()],
                       masks, [0.1 if dropout else 0.0]))


def test_lora_linear_ex_fused_group_of_two(path):
    """A fused group sharing x: a trained dense base with DoRA + dropout next to a frozen 4-bit plain LoRA."""
    torch.manual_seed(14)
    packed, state = _nf4(64, 64, True)
    x2 = _g(6, 64)
    _check_ex(_ex_args(x2, [_g(48, 64), packed], [None, state], [_g(4, 64), _g(2, 64)], [_g(48, 4), _g(64, 2)],
                       [_g(48), None], [(torch.rand(48) + 0.5).requires_grad_(), None], [_mask((6, 64), 0.2, 15), None],
                       [0.2, 0.0], ["cublas", "triton"]))


def test_fake_tracing_runs_lora_linear_ex(monkeypatch):
    """DoRA with dropout and a LoRA bias, 4-bit base: the public functions trace under FakeTensorMode
    (the mask is drawn outside the operator) and both operators run."""
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    packed, state = _nf4(64, 64, True)
    with _Allocations() as seen, FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(12, 64, requires_grad=True)
        a, b = torch.empty(4, 64, requires_grad=True), torch.empty(64, 4, requires_grad=True)
        m = torch.empty(64, requires_grad=True)
        lb = torch.empty(48, requires_grad=True)
        w = torch.empty(48, 64)
        y = fk.lora_linear_ex(x, packed, a, b, 2.0, quant_state=state, magnitude=m, dropout_p=0.1)
        y2, = fk.lora_linear_ex_fused(x, [w], [torch.empty(4, 64, requires_grad=True)],
                                      [torch.empty(48, 4, requires_grad=True)], [0.5], dropout_ps=[0.1],
                                      lora_biases=[lb])
        (y.sum() + y2.sum()).backward()
    assert {"fastsft.lora_linear_ex", "fastsft.lora_linear_ex_backward"} <= seen.ops
    assert x.grad.shape == (12, 64) and m.grad.shape == (64,) and lb.grad.shape == (48,) and a.grad.shape == (4, 64)


def test_planner_finds_every_kernel_operator():
    """fastsft plan's check lists lora_linear_ex (DoRA / dropout / LoRA bias) and finds it registered."""
    from fastsft.plan.step import KERNEL_OPS, missing_operators

    assert "lora_linear_ex" in KERNEL_OPS
    assert missing_operators() == []
    assert hasattr(ops, "lora_linear_ex") and hasattr(ops, "lora_linear_ex_backward")
