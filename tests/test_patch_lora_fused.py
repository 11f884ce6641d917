"""Fused q/k/v and gate/up LoRA projections in the patched Llama-family models.

Per family (Llama, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3, Phi-3): a tiny one-layer
model with LoRA on every linear layer, patched by fastsft.patch.lora, gives peft's
loss and gradients, reports the fused groups, and a forward + backward makes exactly
the expected kernel calls (counted): one lora_linear_fused per attention and per MLP,
single lora_linear calls for o_proj and down_proj (and Phi-3's packed qkv_proj and
gate_up_proj, which are one layer each already).
"""
import logging

import pytest
import torch

from fastsft.patch import lora as lora_patch
from fastsft_kernels.testing import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 96
SPLIT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


def _tiny(model_type, seed=0):
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def _peft(model, targets, seed=1, **extra):
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    cfg.update(extra)
    return peft.get_peft_model(model, peft.LoraConfig(**cfg))


def _step(model):
    model.zero_grad(set_to_none=True)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _Counter:
    """Counts fastsft_kernels.lora_linear / lora_linear_fused calls (resolved through the module)."""

    def __init__(self, monkeypatch):
        import importlib

        import fastsft_kernels

        kernels = importlib.import_module("fastsft_kernels.lora")
        self.calls = {"lora_linear": 0, "lora_linear_fused": 0}
        for name in self.calls:
            original = getattr(kernels, name)

            def counting(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(kernels, name, counting)
            monkeypatch.delitem(fastsft_kernels.__dict__, name, raising=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_uses_fused_projections(family, monkeypatch):
    packed = family == "phi3"
    model = _peft(_tiny(family), PACKED if packed else SPLIT)
    model.train()
    expected = _step(model)
    lines = lora_patch.apply(model)
    counter = _Counter(monkeypatch)
    got = _step(model)
    if packed:
        assert sum("(packed)" in line for line in lines) == 2, lines
        assert counter.calls == {"lora_linear": 4, "lora_linear_fused": 0}
    else:
        assert [line.split(": ")[1] for line in lines if "lora_linear_fused" in line] == [
            "q_proj+k_proj+v_proj -> lora_linear_fused", "gate_proj+up_proj -> lora_linear_fused"]
        assert counter.calls == {"lora_linear": 2, "lora_linear_fused": 2}
        assert lora_patch.fused_calls(model) == 2
    assert_close(got[0], expected[0], 1e-5, "loss")
    assert got[1].keys() == expected[1].keys()
    for name in got[1]:
        assert_close(got[1][name], expected[1][name], 1e-5, name)
    lora_patch.revert(model)
    assert lora_patch.fused_calls(model) == 0
    assert not any("_fastsft_lora_group" in m.__dict__ for m in model.modules())


def test_group_with_an_ineligible_member_is_not_fused(caplog, monkeypatch):
    """A dropout module fastsft does not run (AlphaDropout) on k_proj only: in training the
    q/k/v group falls back (one log line for the group, one for k_proj), the MLP group still
    fuses; in eval every group fuses."""
    model = _peft(_tiny("llama", seed=4), SPLIT)
    model.train()
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    k_proj.lora_dropout["default"] = torch.nn.AlphaDropout(0.5)
    with caplog.at_level(logging.INFO, logger="fastsft"):
        summary_lines = lora_patch.apply(model)
        counter = _Counter(monkeypatch)
        for _ in range(2):
            _step(model)
    assert counter.calls["lora_linear_fused"] == 2  # the MLP group, both steps
    group_logs = [r.getMessage() for r in caplog.records if "not fused for this call" in r.getMessage()]
    assert len(group_logs) == 1 and "k_proj: dropout module AlphaDropout" in group_logs[0]
    summaries = [r.getMessage() for r in caplog.records if "LoRA layers on lora_linear" in r.getMessage()]
    assert len(summaries) == 1 and "7 LoRA layers on lora_linear, 2 q/k/v or gate/up groups fused" in summaries[0]
    assert len(summary_lines) == 7 + 2
    model.eval()
    with torch.no_grad():
        expected_calls = counter.calls["lora_linear_fused"] + 2
        ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
        patched = model(input_ids=ids).logits
    assert counter.calls["lora_linear_fused"] == expected_calls
    lora_patch.revert(model)
    with torch.no_grad():
        assert_close(patched, model(input_ids=ids).logits, 1e-5, "eval logits")


def test_pending_outputs_are_for_that_x_only():
    """A member called with another x (or twice) recomputes instead of taking a stale output."""
    model = _peft(_tiny("llama", seed=5), SPLIT)
    attn = model.base_model.model.model.layers[0].self_attn
    lora_patch.apply(model)
    x1, x2 = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    q1 = attn.q_proj(x1)
    k2 = attn.k_proj(x2)  # not x1's pending k
    lora_patch.revert(model)
    assert_close(q1, attn.q_proj(x1), 1e-5, "q(x1)")
    assert_close(k2, attn.k_proj(x2), 1e-5, "k(x2)")
    lora_patch.apply(model)
    x1.add_(1.0)  # in place: a new version of the same tensor
    q = attn.q_proj(x1)
    attn.q_proj(x1)
    v = attn.v_proj(x1)
    lora_patch.revert(model)
    assert_close(q, attn.q_proj(x1), 1e-5, "q after in-place edit")
    assert_close(v, attn.v_proj(x1), 1e-5, "v")


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_groups_under_gradient_checkpointing(reentrant, monkeypatch):
    """Recomputation in backward runs the groups again (no stale or leaked pending outputs)."""
    model = _peft(_tiny("llama", seed=6), SPLIT)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    expected = _step(model)
    lora_patch.apply(model)
    counter = _Counter(monkeypatch)
    got = _step(model)
    assert counter.calls["lora_linear_fused"] == 4  # 2 groups, forward and recomputation
    assert_close(got[0], expected[0], 1e-5, "loss")
    for name in got[1]:
        assert_close(got[1][name], expected[1][name], 1e-5, name)
    from fastsft.patch import lora_fused

    assert all(not g._pending for g in lora_fused.groups_of(model, lora_patch._GROUP))
