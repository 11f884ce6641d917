"""fastsft.patch.loss_chunk: the fused loss streams logits in chunks of the rows set per model.

Through the Triton path (the interpreter on CPU): the loss patch hands the model's setting to
linear_cross_entropy, no logits chunk is wider than it, and the loss and gradients equal the
kernel's own chunking.
"""
import importlib

import pytest
import torch

import fastsft
import fastsft_kernels as fk
from fastsft.patch import loss_chunk
from fastsft_kernels.testing import assert_close

ce_module = importlib.import_module("fastsft_kernels.cross_entropy")  # the module, not the op

transformers = pytest.importorskip("transformers")


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=67)
    model = transformers.LlamaForCausalLM(config)
    return fastsft.patch_model(model, lora=False, attention=False, rms_norm=False, rope=False, swiglu=False)


def _run(model, monkeypatch):
    rows, sizes = [], []
    real_chunk, real_lce = ce_module._chunk_logits, fk.linear_cross_entropy

    def chunk(h, weight, bias, out):
        rows.append(h.shape[0])
        return real_chunk(h, weight, bias, out)

    def lce(*args, **kwargs):
        sizes.append(kwargs.get("chunk_size"))
        return real_lce(*args, **kwargs)

    monkeypatch.setattr(ce_module, "_chunk_logits", chunk)
    monkeypatch.setattr(fk, "linear_cross_entropy", lce)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 67, (2, 45), generator=g)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, rows, sizes


def test_rows_per_chunk_reach_the_kernel(monkeypatch):
    model = _model()
    loss_ref, grads_ref, rows_ref, sizes_ref = _run(model, monkeypatch)
    assert sizes_ref == [None] and rows_ref == [90], "untuned: the kernel's own chunk (all 90 rows here)"
    loss_chunk.set_chunk_tokens(model, 16)
    loss, grads, rows, sizes = _run(model, monkeypatch)
    assert sizes == [16]
    assert max(rows) == 16 and sum(rows) == 90
    assert_close(loss, loss_ref, 1e-6, "loss")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], 1e-5, name)
    loss_chunk.set_chunk_tokens(model, None)
    assert _run(model, monkeypatch)[3] == [None]


def test_default_rows_from_free_memory():
    # 128,256-row vocabulary in bf16: with 20 GiB free the kernel's own chunk (<= 512 MiB) stands;
    # 1/8 of 2 GiB free holds 1,046 rows -> 1,024 (a multiple of 128)
    assert loss_chunk.default_chunk_tokens(128256, 2, 20 * 2**30) is None
    assert loss_chunk.default_chunk_tokens(128256, 2, 2 * 2**30) == 1024
    assert loss_chunk.default_chunk_tokens(128256, 2, 2**20) == 128


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_rows_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="positive int"):
        loss_chunk.set_chunk_tokens(_model(), bad)
