"""fastsft's varlen attention inside transformers models (CPU: kernels through the interpreter).

A packed row (position ids restarting per document) through the patched model must
give the logits, loss and gradients of the same documents run one by one unpatched;
a padded batch with an attention mask must match the unpatched model on its valid tokens.
"""
import logging

import pytest
import torch
import torch.nn.functional as F

from fastsft_kernels.testing import assert_close

transformers = pytest.importorskip("transformers")
from fastsft.patch import attention as fattn  # noqa: E402

DOC_LENGTHS = [7, 1, 12, 5]  # 25 tokens: a 1-token document, others around the interpreter block sizes


def tiny_llama(seed=0, **overrides):
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=101, max_position_embeddings=128)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    return model.eval()


def tiny_gemma2(seed=0):
    cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=101,
                                    max_position_embeddings=128, sliding_window=4, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=None, query_pre_attn_scalar=16)
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(cfg).eval()


def make_docs(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def per_doc_reference(model, docs):
    """Unpatched model, one document at a time: logits, summed next-token loss, grads."""
    model.zero_grad()
    logits, total = [], 0.0
    for doc in docs:
        out = model(input_ids=doc[None]).logits[0]
        if len(doc) > 1:
            loss = F.cross_entropy(out[:-1].float(), doc[1:], reduction="sum")
            loss.backward()
            total += loss.item()
        logits.append(out.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return torch.cat(logits), total, grads


def packed_forward(model, docs, **extra):
    model.zero_grad()
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    logits = model(input_ids=ids, position_ids=position_ids, **extra).logits[0]
    total = 0
    start = 0
    for doc in docs:
        n = len(doc)
        if n > 1:
            total = total + F.cross_entropy(logits[start:start + n - 1].float(), doc[1:], reduction="sum")
        start += n
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return logits.detach(), total.item(), grads


def assert_same(ref, got, bound):
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = ref, got
    assert_close(logits, ref_logits, bound, "logits")
    assert abs(loss - ref_loss) <= bound * abs(ref_loss), f"loss {loss} vs {ref_loss}"
    assert set(grads) == set(ref_grads)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.v_proj.weight", "model.embed_tokens.weight"):
        assert_close(grads[name], ref_grads[name], bound * 10, f"grad {name}")


def test_packed_row_matches_documents_one_by_one():
    model = tiny_llama()
    docs = make_docs(DOC_LENGTHS, 101)
    ref = per_doc_reference(model, docs)
    lines = fattn.apply(model)
    try:
        assert model.config._attn_implementation == "fastsft_varlen"
        assert lines and "fastsft_varlen" in lines[0]
        got = packed_forward(model, docs)
    finally:
        fattn.revert(model)
    # fp32 model, fp32 kernel (ieee dots): differences are summation order only
    assert_same(ref, got, 1e-5)


def test_cu_seq_lens_kwargs_are_used(monkeypatch):
    model = tiny_llama(seed=3)
    docs = make_docs(DOC_LENGTHS, 101, seed=4)
    ref = per_doc_reference(model, docs)
    bounds = torch.tensor([0] + DOC_LENGTHS).cumsum(0).to(torch.int32)
    fattn.apply(model)

    def no_position_ids_path(*args, **kwargs):
        raise AssertionError("boundaries derived from position_ids although cu_seq_lens_q was passed")

    monkeypatch.setattr(fattn, "boundaries_from_position_ids", no_position_ids_path)
    try:
        ids = torch.cat(docs)[None]
        logits = model(input_ids=ids, position_ids=torch.cat([torch.arange(len(d)) for d in docs])[None],
                       cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                       max_length_q=max(DOC_LENGTHS), max_length_k=max(DOC_LENGTHS)).logits[0]
    finally:
        fattn.revert(model)
    assert_close(logits, ref[0], 1e-5, "logits")


def test_position_ids_boundaries_are_cached_per_batch():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 5, 6]])
    first = fattn.boundaries_from_position_ids(pos, 1, 8, "cpu")
    assert first.cu.tolist() == [0, 3, 5, 6, 8] and first.max_len == 3
    assert fattn.boundaries_from_position_ids(pos, 1, 8, "cpu") is first  # later layers: no recompute
    pos.add_(0)  # in-place change bumps the version: recomputed
    assert fattn.boundaries_from_position_ids(pos, 1, 8, "cpu") is not first
    two_rows = fattn.boundaries_from_position_ids(torch.arange(4)[None], 2, 4, "cpu")
    assert two_rows.cu.tolist() == [0, 4, 8]


def test_boundaries_derived_once_per_batch_not_per_layer(monkeypatch):
    model = tiny_llama(seed=12, num_hidden_layers=3)
    docs = make_docs(DOC_LENGTHS, 101, seed=13)
    calls = []
    real = fattn._make_cu
    monkeypatch.setattr(fattn, "_make_cu", lambda bounds, device: calls.append(list(bounds)) or real(bounds, device))
    fattn.apply(model)
    try:
        packed_forward(model, docs)  # forward through 3 layers and the backward
    finally:
        fattn.revert(model)
    assert calls == [[0, 7, 8, 20, 25]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_unpatched(side):
    model = tiny_llama(seed=5)
    lengths = [9, 4, 13]
    width = max(lengths)
    docs = make_docs(lengths, 101, seed=6)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, d in enumerate(docs):
        sl = slice(0, len(d)) if side == "right" else slice(width - len(d), width)
        ids[i, sl], mask[i, sl] = d, 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        fattn.apply(model)
        try:
            got = model(input_ids=ids, attention_mask=mask).logits
        finally:
            fattn.revert(model)
    valid = mask.bool()
    assert_close(got[valid], ref[valid], 1e-5, "logits at valid positions")


def test_gemma2_sliding_window_and_softcap_packed():
    model = tiny_gemma2()
    model.set_attn_implementation("eager")  # the exact reference for softcap in transformers
    docs = make_docs([9, 3, 6], 101, seed=8)
    ref = per_doc_reference(model, docs)
    fattn.apply(model)
    try:
        got = packed_forward(model, docs)
    finally:
        fattn.revert(model)
    assert model.config._attn_implementation == "eager"
    assert_close(got[0], ref[0], 1e-5, "logits")
    assert abs(got[1] - ref[1]) <= 1e-5 * abs(ref[1])


def test_kv_cache_decoding_falls_back_and_matches(caplog):
    model = tiny_llama(seed=9)
    ids = make_docs([10], 101, seed=10)[0][None]
    with torch.no_grad():
        ref = model(input_ids=ids[:, :7], use_cache=True)
        ref_next = model(input_ids=ids[:, 7:], past_key_values=ref.past_key_values).logits
        fattn.apply(model)
        try:
            with caplog.at_level(logging.WARNING, logger="fastsft"):
                out = model(input_ids=ids[:, :7], use_cache=True)
                got_next = model(input_ids=ids[:, 7:], past_key_values=out.past_key_values).logits
        finally:
            fattn.revert(model)
    assert "KV cache" in caplog.text or "query and key lengths differ" in str(fattn._logged)
    assert_close(out.logits, ref.logits, 1e-5, "prefill logits")
    assert_close(got_next, ref_next, 1e-5, "decode logits")


def test_apply_revert_idempotent():
    model = tiny_llama()
    before = model.config._attn_implementation
    first = fattn.apply(model)
    assert first and model.config._attn_implementation == "fastsft_varlen"
    again = fattn.apply(model)
    assert again == ["already fastsft_varlen"]  # patch_model prefixes the component name
    fattn.revert(model)
    assert model.config._attn_implementation == before
    fattn.revert(model)  # second revert: nothing to undo
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="backend"):
        fattn.apply(model, backend="xformers")


def test_flash_attn_backend_needs_flash_attn():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="flash-attn"):
            fattn.apply(tiny_llama(), backend="flash_attn")
    else:  # installed: the implementation is selected (it runs flash-attn on CUDA fp16/bf16)
        model = tiny_llama()
        assert fattn.apply(model, backend="flash_attn")
        assert model.config._attn_implementation == "fastsft_varlen_fa2"


def test_patch_model_selects_varlen_attention():
    patch = pytest.importorskip("fastsft.patch")
    if not hasattr(patch, "patch_model"):
        pytest.skip("fastsft.patch_model not available")
    model = tiny_llama()
    before = model.config._attn_implementation
    patch.patch_model(model, cross_entropy=False, lora=False, rms_norm=False, rope=False, swiglu=False)
    assert model.config._attn_implementation == "fastsft_varlen"
    docs = make_docs(DOC_LENGTHS, 101, seed=11)
    with torch.no_grad():
        ids = torch.cat(docs)[None]
        position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
        got = model(input_ids=ids, position_ids=position_ids).logits[0]
    patch.unpatch_model(model)
    assert model.config._attn_implementation == before
    with torch.no_grad():
        ref = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    assert_close(got, ref, 1e-5, "logits")


@pytest.mark.gpu
def test_gpu_bf16_packed_llama_matches_documents_one_by_one():
    model = tiny_llama(seed=14, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=1).to("cuda", torch.bfloat16)  # head_dim 64
    docs = [d.cuda() for d in make_docs([300, 1, 129, 64, 700], 101, seed=15)]
    with torch.no_grad():
        ref = torch.cat([model(input_ids=d[None]).logits[0] for d in docs]).float()
        fattn.apply(model)
        try:
            ids = torch.cat(docs)[None]
            position_ids = torch.cat([torch.arange(len(d), device="cuda") for d in docs])[None]
            got = model(input_ids=ids, position_ids=position_ids).logits[0].float()
        finally:
            fattn.revert(model)
    # bf16 end to end (two layers of bf16 matmuls on each side): logits agree to bf16 precision
    assert_close(got, ref, 2e-2, "logits")


def test_dropout_fallback_keeps_packed_documents_apart():
    """Attention dropout takes the eager fallback; a packed row must still not attend across documents."""
    model = tiny_llama(seed=5, attention_dropout=1e-12)  # dropout on (fallback), with no visible effect
    docs = make_docs(DOC_LENGTHS, 101, seed=6)
    ref = per_doc_reference(model, docs)
    fattn.apply(model)
    model.train()
    try:
        ids = torch.cat(docs)[None]
        position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
        logits = model(input_ids=ids, position_ids=position_ids).logits[0]
    finally:
        fattn.revert(model)
        model.eval()
    assert_close(logits, ref[0], 1e-5, "logits")
