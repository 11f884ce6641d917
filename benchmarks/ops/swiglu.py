"""swiglu benchmark: fastsft vs torch (silu(gate) * up) vs Liger's LigerSiLUMulFunction."""
from __future__ import annotations

import torch

from .norm import measure_providers, smoke_providers


def _torch_swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up  # what the HF MLP computes


def _fastsft_swiglu(gate, up):
    import fastsft_kernels as fk

    return fk.swiglu(gate, up)


def _liger_swiglu(gate, up):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


PROVIDERS = {"fastsft": _fastsft_swiglu, "torch": _torch_swiglu, "liger": _liger_swiglu}
# (name, tokens, intermediate): Llama-3-8B, Qwen2.5-7B, Llama-2-7B
CASES = [("llama3_8b_16k_x_14336", 16384, 14336), ("qwen25_7b_16k_x_18944", 16384, 18944),
         ("llama2_7b_16k_x_11008", 16384, 11008)]


def _inputs(tokens, inter, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    gate = torch.randn(tokens, inter, device=device, dtype=dtype, generator=g).requires_grad_()
    up = torch.randn(tokens, inter, device=device, dtype=dtype, generator=g).requires_grad_()
    return gate, up


def run(op, args):
    cases = CASES[:1] if args.quick else CASES
    results = []
    for name, tokens, inter in cases:
        sets = [_inputs(tokens, inter, torch.bfloat16, "cuda", s) for s in range(2)]
        n = tokens * inter * 2
        nbytes = {"fwd": 3 * n, "bwd": 5 * n, "full": 8 * n}  # bwd recomputes silu from gate, up
        results.extend(measure_providers(name, PROVIDERS, sets, nbytes, args))
        del sets
    config = {"dtype": "bfloat16", "cases": [dict(zip(("name", "tokens", "intermediate"), c)) for c in cases],
              "bytes": "fwd: read gate, up + write h; bwd: read dh, gate, up + write dgate, dup"}
    return config, results, "torch"


def smoke(op, args):
    inputs = _inputs(37, 150, torch.float32, "cpu", 0)
    return smoke_providers("tiny", PROVIDERS, inputs, args)
