"""rope benchmark: fastsft vs torch (HF's apply_rotary_pos_emb) vs Liger's LigerRopeFunction.

Inputs are laid out as the models hand them over: q/k are (batch, heads, seq, dim)
views of (batch, seq, heads, dim) projections; cos/sin are per-token (batch, seq,
rot_dim) from a packed row whose positions restart per document.
"""
from __future__ import annotations

import torch

from .norm import measure_providers, smoke_providers


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _torch_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    q_rot, k_rot = q[..., :rot], k[..., :rot]
    qo = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q[..., rot:]], dim=-1)
    ko = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k[..., rot:]], dim=-1)
    return qo, ko


def _fastsft_rope(q, k, cos, sin):
    import fastsft_kernels as fk

    return fk.rope(q, k, cos, sin)


def _liger_rope(q, k, cos, sin):
    from liger_kernel.ops.rope import LigerRopeFunction

    return LigerRopeFunction.apply(q, k, cos, sin)


PROVIDERS = {"fastsft": _fastsft_rope, "torch": _torch_rope, "liger": _liger_rope}
# (name, tokens, heads, kv_heads, head_dim, rot_dim)
CASES = [("llama3_8b_16k", 16384, 32, 8, 128, 128), ("qwen25_7b_16k", 16384, 28, 4, 128, 128),
         ("phi3_partial_16k", 16384, 32, 32, 96, 48)]


def _inputs(tokens, heads, kv, dim, rot, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, tokens, heads, dim, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, tokens, kv, dim, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    doc = 1024
    pos = (torch.arange(tokens, device=device) % doc)[None].float()  # packed documents, positions restart
    inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, device=device, dtype=torch.float32) / rot))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def run(op, args):
    cases = CASES[:1] if args.quick else CASES
    results = []
    for name, tokens, heads, kv, dim, rot in cases:
        sets = [_inputs(tokens, heads, kv, dim, rot, torch.bfloat16, "cuda", s) for s in range(3)]
        n = tokens * (heads + kv) * dim * 2
        nbytes = {"fwd": 2 * n, "bwd": 2 * n, "full": 4 * n}
        unsupported = {"liger": "Liger's rope rotates the full head_dim (no partial rotary)"} if rot != dim else None
        results.extend(measure_providers(name, PROVIDERS, sets, nbytes, args, unsupported))
        del sets
    config = {"dtype": "bfloat16",
              "cases": [dict(zip(("name", "tokens", "heads", "kv_heads", "head_dim", "rot_dim"), c)) for c in cases],
              "bytes": "fwd and bwd: read + write q and k"}
    return config, results, "torch"


def smoke(op, args):
    inputs = _inputs(13, 4, 2, 16, 16, torch.float32, "cpu", 0)
    return smoke_providers("tiny", PROVIDERS, inputs, args)
