"""lora_linear's two strategies (in-kernel 4-bit dequant vs dequantize-once + cuBLAS; Triton
epilogue GEMM vs cuBLAS for a dense base) against peft's own layers, the row dispatcher,
the shared workspace, the per-weight QuantState cache and the host-side config prune.

The parity grid pairs the values instead of crossing them (the CPU tier runs the
kernels in Triton's interpreter): every dtype, base (dense, NF4, FP4, with and
without double quantization), bias or not, rank (1, 8, 16, 64, 128), leading dims
and strategy appears, each dtype with each base and each strategy.
Oracle: peft's modules in float64 (dense base) or peft + bitsandbytes in fp32 (4-bit
base, the precision bitsandbytes' CPU path computes in).
"""
import importlib

import pytest
import torch

import fastsft_kernels as fk
from fastsft_kernels.lora import lora_linear_fused
from fastsft_kernels.testing import assert_close

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
lora_mod = importlib.import_module("fastsft_kernels.lora")
quant_mod = importlib.import_module("fastsft_kernels.quant")

# bound per dtype of x: fp32 is exact-fp32 math; 16-bit rounds the inputs, each operand and the output
# (the cuBLAS strategy rounds y once more before the rank-r addmm: still well inside)
BOUNDS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
FORCE = {"triton": dict(dequant_rows=10**9, dense_base="triton"), "cublas": dict(dequant_rows=0, dense_base="cublas")}

# dtype, base, nested, bias, rank, lead, strategy, dense weight requires grad
GRID = [
    (torch.float32, "dense", False, True, 1, (37,), "cublas", True),
    (torch.float32, "dense", False, False, 16, (2, 13), "triton", False),
    (torch.float16, "dense", False, False, 8, (3, 11), "triton", True),
    (torch.float16, "dense", False, True, 128, (23,), "cublas", False),
    (torch.bfloat16, "dense", False, True, 128, (2, 9), "cublas", True),
    (torch.bfloat16, "dense", False, False, 16, (29,), "triton", False),
    (torch.float32, "nf4", True, False, 64, (2, 11), "triton", False),
    (torch.float32, "fp4", True, True, 128, (19,), "cublas", False),
    (torch.float16, "nf4", False, True, 16, (37,), "cublas", False),
    (torch.float16, "fp4", True, False, 64, (2, 13), "triton", False),
    (torch.bfloat16, "nf4", True, True, 8, (3, 7), "cublas", False),
    (torch.bfloat16, "fp4", False, False, 1, (23,), "triton", False),
]


def _config(rank, alpha):
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False)


def _peft_pair(seed, dtype, base_kind, nested, bias, rank, in_f, out_f, weight_grad=False):
    """(peft oracle layer, the tensors fastsft gets: weight, quant_state, bias, lora_a, lora_b, scaling)."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    dense.weight.data /= 2
    if base_kind == "dense":
        base = torch.nn.Linear(in_f, out_f, bias=bias).double()
        base.weight.data.copy_(dense.weight.data.to(dtype))  # the oracle sees the same rounded W
        if bias:
            base.bias.data.copy_(dense.bias.data.to(dtype))
        base.weight.requires_grad_(weight_grad)
        layer = peft.tuners.lora.layer.Linear(base, "default", _config(rank, 2 * rank), r=rank, lora_alpha=2 * rank)
        layer.double()
        ours_w = base.weight.detach().to(dtype).requires_grad_(weight_grad)
        ours_b = base.bias.detach().to(dtype).requires_grad_(True) if bias else None
        qs = None
    else:
        from peft.tuners.lora.bnb import Linear4bit

        base = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type=base_kind)
        base.weight = bnb.nn.Params4bit(dense.weight.data.to(dtype), requires_grad=False, quant_type=base_kind,
                                        blocksize=64, compress_statistics=nested)
        if bias:
            base.bias = torch.nn.Parameter(dense.bias.data.to(dtype).float())
        base = base.to("cpu")
        layer = Linear4bit(base, "default", _config(rank, 2 * rank), r=rank, lora_alpha=2 * rank)
        ours_w, qs = base.weight.data, base.weight.quant_state
        ours_b = base.bias.detach().to(dtype).requires_grad_(True) if bias else None
    layer.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 0.5)  # a live LoRA term
    ours_a = a.detach().float().requires_grad_(True)
    ours_bb = b.detach().float().requires_grad_(True)
    return layer, dict(weight=ours_w, quant_state=qs, bias=ours_b, lora_a=ours_a, lora_b=ours_bb,
                       scaling=float(layer.scaling["default"]))


def _oracle(layer, x, g):
    """peft's output and gradients (x, lora_a, lora_b, base weight, bias) for x, upstream g."""
    ref_dtype = torch.float64 if not hasattr(layer.get_base_layer().weight, "quant_state") else torch.float32
    xr = x.detach().to(ref_dtype).requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(xr)
    y.backward(g.to(y.dtype))
    base = layer.get_base_layer()
    return dict(y=y.detach(), dx=xr.grad, dA=layer.lora_A["default"].weight.grad,
                dB=layer.lora_B["default"].weight.grad,
                dW=base.weight.grad if base.weight.requires_grad else None,
                dbias=base.bias.grad if base.bias is not None else None)


@pytest.mark.parametrize("dtype,base_kind,nested,bias,rank,lead,strategy,weight_grad", GRID,
                         ids=[f"{str(c[0])[6:]}-{c[1]}{'-dq' if c[2] else ''}-{'bias' if c[3] else 'nobias'}-r{c[4]}"
                              f"-{'x'.join(map(str, c[5]))}-{c[6]}{'-dW' if c[7] else ''}" for c in GRID])
def test_lora_linear_matches_peft(dtype, base_kind, nested, bias, rank, lead, strategy, weight_grad):
    in_f, out_f = 128, 45
    layer, t = _peft_pair(hash((rank, lead)) % 1000, dtype, base_kind, nested, bias, rank, in_f, out_f, weight_grad)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(*lead, in_f, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(*lead, out_f, generator=gen).to(dtype)
    ref = _oracle(layer, x, g)
    y = fk.lora_linear(x, t["weight"], t["lora_a"], t["lora_b"], t["scaling"], bias=t["bias"],
                       quant_state=t["quant_state"], **FORCE[strategy])
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    y.backward(g)
    bound = BOUNDS[dtype]
    assert_close(y, ref["y"], bound, "y")
    assert_close(x.grad, ref["dx"], bound, "dx")
    assert_close(t["lora_a"].grad, ref["dA"], bound, "dA")
    assert_close(t["lora_b"].grad, ref["dB"], bound, "dB")
    if bias:
        assert_close(t["bias"].grad, ref["dbias"], bound, "dbias")
    if weight_grad:
        assert t["weight"].grad.dtype == dtype
        assert_close(t["weight"].grad, ref["dW"], bound, "dW")


# dtype, kind (q/k/v or gate/up), bases, strategy
FUSED_GRID = [
    (torch.bfloat16, (72, 24, 24), ("dense", "dense", "dense"), "cublas"),
    (torch.float16, (56, 56), ("nf4", "nf4"), "triton"),
    (torch.float32, (72, 24, 24), ("fp4", "dense", "nf4"), "cublas"),
    (torch.bfloat16, (56, 56), ("nf4", "nf4"), "cublas"),
]


@pytest.mark.parametrize("dtype,outs,bases,strategy", FUSED_GRID)
def test_fused_projections_match_peft(dtype, outs, bases, strategy):
    in_f, ranks = 128, (8, 16, 1)[:len(outs)]
    pairs = [_peft_pair(50 + i, dtype, kind, i % 2 == 0, i == 0, r, in_f, n)
             for i, (n, kind, r) in enumerate(zip(outs, bases, ranks))]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, in_f, generator=gen).to(dtype).requires_grad_(True)
    gs = [torch.randn(2, 11, n, generator=gen).to(dtype) for n in outs]
    refs = []
    for (layer, _), g in zip(pairs, gs):
        refs.append(_oracle(layer, x, g))
    ts = [t for _, t in pairs]
    ys = lora_linear_fused(x, [t["weight"] for t in ts], [t["lora_a"] for t in ts], [t["lora_b"] for t in ts],
                           [t["scaling"] for t in ts], biases=[t["bias"] for t in ts],
                           quant_states=[t["quant_state"] for t in ts], **FORCE[strategy])
    torch.autograd.backward(ys, gs)
    bound = BOUNDS[dtype]
    for i, (y, t, ref) in enumerate(zip(ys, ts, refs)):
        assert_close(y, ref["y"], bound, f"y[{i}]")
        assert_close(t["lora_a"].grad, ref["dA"], bound, f"dA[{i}]")
        assert_close(t["lora_b"].grad, ref["dB"], bound, f"dB[{i}]")
    assert_close(ts[0]["bias"].grad, refs[0]["dbias"], bound, "dbias[0]")
    assert_close(x.grad, sum(r["dx"] for r in refs), bound, "dx (summed over projections)")


# --------------------------------------------------------------------------- the dispatcher
def test_pick_strategy_by_rows_argument_and_env(monkeypatch):
    monkeypatch.delenv(lora_mod.DEQUANT_ROWS_ENV, raising=False)
    monkeypatch.delenv(lora_mod.DENSE_BASE_ENV, raising=False)
    pick = lora_mod.pick_strategy
    assert pick(1023, True) == "triton" and pick(1024, True) == "cublas"
    assert pick(10, True, dequant_rows=10) == "cublas" and pick(9, True, dequant_rows=10) == "triton"
    assert pick(5, False) == "cublas" and pick(10**6, False, dense_base="triton") == "triton"
    monkeypatch.setenv(lora_mod.DEQUANT_ROWS_ENV, "64")
    assert pick(64, True) == "cublas" and pick(63, True) == "triton"
    assert pick(63, True, dequant_rows=0) == "cublas"  # the argument wins over the env
    monkeypatch.setenv(lora_mod.DENSE_BASE_ENV, "triton")
    assert pick(4096, False) == "triton"
    monkeypatch.setenv(lora_mod.DEQUANT_ROWS_ENV, "many")
    with pytest.raises(ValueError, match="FASTSFT_LORA_DEQUANT_ROWS"):
        pick(1, True)
    monkeypatch.setenv(lora_mod.DENSE_BASE_ENV, "magma")
    with pytest.raises(ValueError, match="FASTSFT_LORA_DENSE_BASE"):
        pick(1, False)
    with pytest.raises(ValueError, match="dequant_rows"):
        pick(1, True, dequant_rows=-1)


def _spy(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)


def test_rows_pick_the_path_workspace_is_shared_and_nothing_dense_is_saved(monkeypatch):
    """At rows >= the threshold a 4-bit W is dequantized into the shared workspace in forward
    and again in backward (nothing dense saved); below it the Triton kernel runs."""
    monkeypatch.setenv(lora_mod.DEQUANT_ROWS_ENV, "20")
    lora_mod._WORKSPACES.clear()
    calls = {}
    for name in ("_matmul", "_cublas_lora"):
        _spy(monkeypatch, lora_mod, name, calls)
    _spy(monkeypatch, lora_mod, "dequantize_into", calls)
    layers = [_peft_pair(70 + i, torch.bfloat16, "nf4", True, False, 4, 64, n)[1] for i, n in enumerate((40, 24))]
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    for rows, expect in ((21, "_cublas_lora"), (19, "_matmul")):
        calls.clear()
        x = torch.randn(rows, 64).to(torch.bfloat16).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ys = [fk.lora_linear(x, t["weight"], t["lora_a"], t["lora_b"], t["scaling"],
                                 quant_state=t["quant_state"]) for t in layers]
        torch.autograd.backward(ys, [torch.randn_like(y) for y in ys])
        assert calls.get(expect) == 4 and len(calls) == (1 if expect == "_matmul" else 2), calls
        if expect == "_cublas_lora":
            assert calls["dequantize_into"] == 4  # each layer: once in forward, once in backward
        # saved for backward: x, the rank-r xa, the packed bytes and the adapter; never a dense W
        assert not [s for s in saved if s[0] in ((40, 64), (24, 64)) and s[1].is_floating_point], saved
    # one workspace per device and dtype, the size of the largest layer
    assert lora_mod.workspace_bytes() == {"cpu bfloat16": 40 * 64 * 2}


def test_quant_state_is_validated_and_decoded_once_per_weight(monkeypatch):
    calls = {}
    _spy(monkeypatch, quant_mod, "quant_info", calls)
    _spy(monkeypatch, quant_mod, "_decode_nested_absmax", calls)
    t = _peft_pair(80, torch.float16, "nf4", True, True, 4, 64, 33)[1]
    x = torch.randn(7, 64).to(torch.float16)
    y1 = fk.lora_linear(x, t["weight"], t["lora_a"], t["lora_b"], 1.0, quant_state=t["quant_state"])
    y1.sum().backward()
    y2 = fk.lora_linear(x, t["weight"], t["lora_a"], t["lora_b"], 1.0, quant_state=t["quant_state"])
    assert calls == {"quant_info": 1, "_decode_nested_absmax": 1}
    assert torch.equal(y1, y2)
    # a change to the statistics in place (a new version) invalidates the cache
    t["quant_state"].state2.absmax.mul_(2.0)
    y3 = fk.lora_linear(x, t["weight"], t["lora_a"], t["lora_b"], 1.0, quant_state=t["quant_state"])
    assert calls == {"quant_info": 2, "_decode_nested_absmax": 2}
    base = y3 - fk.lora_linear(x, t["weight"], t["lora_a"], t["lora_b"], 0.0, quant_state=t["quant_state"])
    assert not torch.equal(y3, y1) and torch.isfinite(base).all()
    # so does a new QuantState object (e.g. reloading the weight)
    import copy

    fk.lora_linear(x, t["weight"], t["lora_a"], t["lora_b"], 1.0, quant_state=copy.deepcopy(t["quant_state"]))
    assert calls["quant_info"] == 3


# --------------------------------------------------------------------------- configs per arch
@pytest.mark.parametrize("arch", [90, 80, 86])
def test_configs_fit_the_arch_shared_memory(arch):
    limit = lora_mod.SMEM_LIMIT[divmod(arch, 10)]
    pruned = 0
    for forward in (True, False):
        for is_4bit in (True, False):
            tiles = lora_mod._TILES[is_4bit]
            cfgs = lora_mod.matmul_configs(forward=forward, is_4bit=is_4bit, arch=arch)
            assert cfgs, (forward, is_4bit)
            for c in cfgs:
                assert lora_mod._smem_estimate(c, forward=forward, is_4bit=is_4bit) <= limit
            pruned += len(tiles) - len(cfgs)
            # what the autotuner's host-side hook keeps is exactly this list
            nargs = {"a_ptr": torch.empty(0, dtype=torch.bfloat16)}
            kept = lora_mod._prune_configs(lora_mod._MATMUL_CONFIGS, nargs, W_ROWS_ARE_OUT=forward, IS_4BIT=is_4bit)
            assert [id(c) for c in kept] == [id(c) for c in cfgs] or arch != 90
    # sm_90 (227 KB) keeps every tile; sm_80 (163 KB) and sm_86 (99 KB) lose the largest ones,
    # e.g. the NF4 backward-dx BM128/BN256 tile (168 KB compiled for sm_90)
    big = lora_mod._MATMUL_CONFIGS[1]
    assert (big.kwargs["BLOCK_M"], big.kwargs["BLOCK_N"]) == (128, 256)
    bwd = lora_mod.matmul_configs(forward=False, is_4bit=True, arch=arch)
    assert (big in bwd) == (arch == 90)
    assert (pruned == 0) == (arch == 90)
    names = [e["name"] for e in lora_mod.launch_variants(arch=arch)]
    assert len(names) == len(set(names))
    assert sum(n.startswith("lora_matmul_") for n in names) == 4 * sum(
        len(lora_mod.matmul_configs(forward=f, is_4bit=q, arch=arch)) for f in (True, False) for q in (True, False)) + 8
    assert lora_mod._smem_estimate(big, forward=False, is_4bit=True) >= 168 * 1024


_COMPILE = r'''
import importlib, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
lora = importlib.import_module("fastsft_kernels.lora")
rows = []
for e in lora.launch_variants(arch=90, dtypes=("bf16",), ranks=(16,)):
    if e["name"].endswith("_BM64_BN64_BK64_w4_s4") and "4bit" in e["name"]:
        src = ASTSource(fn=e["fn"], signature=e["signature"], constexprs=e["constexprs"], attrs=e["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=e["options"])
        rows.append([e["name"], k.metadata.shared, e["smem_estimate"], "wgmma" in k.asm["ptx"]])
print(json.dumps(rows))
'''


def test_launch_variants_compile_for_sm90_within_the_estimate():
    """An entry of launch_variants compiles ahead of time for sm_90 (no GPU): wgmma, and the
    compiled shared memory within the estimate the launcher prunes by (a subprocess: the
    interpreter is on in this one)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSFT_TRITON_ON_CPU")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=600, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 4, rows  # NF4 forward, forward + bias, backward dx, backward dx accumulating
    for name, shared, estimate, wgmma in rows:
        assert wgmma, name
        assert 0 < shared <= estimate, (name, shared, estimate)
