"""RoPE patching through decorated forwards, and one compute dtype into attention (issue 17).

transformers 5.2x wraps every attention ``forward`` in ``deprecate_kwarg``; the
RoPE patch must reach the rotary call inside and keep the decorator working.
"""
import functools

import pytest
import torch

from fastsft.patch import attention as attention_patch
from fastsft.patch import layers


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):  # the stock rotate-half form
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rename_kwarg(old, new):
    """A functools.wraps decorator like transformers' deprecate_kwarg."""
    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return wrapper
    return decorator


class DecoratedAttention(torch.nn.Module):
    @rename_kwarg("older", "legacy")
    @rename_kwarg("legacy", "scale")
    def forward(self, q, k, cos, sin, scale=1.0):
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q * scale, k * scale


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k = torch.randn(2, 1, 5, 8, generator=g)
    angles = torch.randn(2, 5, 4, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return q, k, cos, sin


def test_decorated_forward_calls_the_kernel_and_keeps_its_decorators(monkeypatch):
    calls = []
    real = layers._rope
    monkeypatch.setattr(layers, "_rope", lambda *a: calls.append(1) or real(*a))
    patched = layers._rope_forward_for(DecoratedAttention)
    assert patched is not DecoratedAttention.forward
    assert patched.__wrapped__.__wrapped__ is not DecoratedAttention.forward.__wrapped__.__wrapped__
    module = DecoratedAttention()
    q, k, cos, sin = _inputs()
    want_q, want_k = DecoratedAttention.forward(module, q, k, cos, sin, older=3.0)  # renamed twice
    got_q, got_k = patched(module, q, k, cos, sin, older=3.0)
    assert calls == [1]
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    # the stock class is untouched: it still calls the module-level function
    assert DecoratedAttention.forward.__wrapped__.__wrapped__.__globals__["apply_rotary_pos_emb"] is apply_rotary_pos_emb


def test_a_wrapper_that_does_not_hold_its_function_is_refused():
    def opaque(fn):
        table = {"f": fn}

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            return table["f"](*a, **kw)
        return wrapper

    class Opaque(torch.nn.Module):
        @opaque
        def forward(self, q, k, cos, sin):
            return apply_rotary_pos_emb(q, k, cos, sin)

    with pytest.raises(ValueError, match="cannot re-wrap"):
        layers._rope_forward_for(Opaque)


def test_installed_llama_attention_forward_is_patched_through_its_decorators():
    from transformers.models.llama.modeling_llama import LlamaAttention

    patched = layers._rope_forward_for(LlamaAttention)
    inner = patched
    while hasattr(inner, "__wrapped__"):
        inner = inner.__wrapped__
    assert inner.__globals__["apply_rotary_pos_emb"].__name__ == "apply_rotary_pos_emb"
    assert inner.__globals__["apply_rotary_pos_emb"] is not layers._rope_forward_for.__globals__.get("apply_rotary_pos_emb")
    assert hasattr(inner.__globals__["apply_rotary_pos_emb"], "__wrapped__")  # fastsft's, around the stock one


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, None])
def test_attention_gets_one_dtype(monkeypatch, autocast_dtype):
    """Stock RoPE under autocast hands q and k in fp32 and v in bf16: the kernel gets one dtype."""
    seen = []

    def fake_kernel(backend, q, k, v, cu, max_len, scale, causal, window, softcap, dropout):
        seen.append((q.dtype, k.dtype, v.dtype))
        return torch.zeros_like(q)

    monkeypatch.setattr(attention_patch, "_run_kernel", fake_kernel)
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    if autocast_dtype is None:
        attention_patch.fastsft_varlen(module, q, k, v, None)
        assert seen == [(torch.float32,) * 3]  # no autocast: the common dtype
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            attention_patch.fastsft_varlen(module, q, k, v, None)
        assert seen == [(autocast_dtype,) * 3]
