"""Self-check at step 0 (fastsft.patch.self_check): every patched op of a LoRA tiny Llama runs once on
the first packed batch's real inputs through the kernels (the interpreter here) against the fp32
reference; a broken op (forced by replacing the public op with a wrong one) is switched back to
PyTorch for the run, with one line naming it, and the step then computes what PyTorch computes."""
import logging

import pytest
import torch

import fastsft
import fastsft_kernels
from fastsft.patch import patch_state, self_check

EXPECTED_OPS = {"rms_norm", "rope", "swiglu", "varlen_attention", "lora_linear_fused", "lora_linear",
                "linear_cross_entropy"}


def _tiny_lora(seed=0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear",
                                                                init_lora_weights=False, **lora))
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (1, 19), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[0, 11] = -100  # the first token of the second document
    positions = torch.cat([torch.arange(11), torch.arange(8)]).unsqueeze(0)
    return dict(input_ids=ids, labels=labels, position_ids=positions)


def _loss_and_grads(model, dtype=None):
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model(**_batch()).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_every_patched_op_passes_on_the_first_batch(dtype, caplog):
    model = fastsft.patch_model(_tiny_lora(), self_check=True)
    before = set(patch_state(model))
    seen = []
    original = self_check.check_op
    with caplog.at_level(logging.INFO, logger="fastsft.patch"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(self_check, "check_op", lambda name, rec, seed=0: seen.append(original(name, rec, seed))
                       or seen[-1])
            _loss_and_grads(model, dtype)
            _loss_and_grads(model, dtype)  # the check runs once
    assert {c.op for c in seen} == EXPECTED_OPS and len(seen) == len(EXPECTED_OPS)
    for check in seen:
        assert check.passed, check.line()
        # the op ran on the dtype the model gave it; RMSNorm reads the fp32 residual of this fp32-weight
        # model in fp32 under autocast too, as transformers' own norm does
        assert check.dtype == (torch.float32 if check.op == "rms_norm" else dtype or torch.float32)
        assert check.details and all(err == err for _, err, _ in check.details)  # measured, not NaN
    assert set(patch_state(model)) == before
    assert any("self-check: 7 ops within 2x" in r.getMessage() for r in caplog.records)


def test_a_failing_op_is_switched_back_to_pytorch(monkeypatch, caplog):
    """The test hook: fastsft_kernels.swiglu replaced by a 3%-wrong op before the first forward."""
    real_swiglu = fastsft_kernels.swiglu
    monkeypatch.setattr(fastsft_kernels, "swiglu", lambda gate, up: real_swiglu(gate, up) * 1.03)
    reference = fastsft.patch_model(_tiny_lora(), swiglu=False)  # what the fallback must compute
    model = fastsft.patch_model(_tiny_lora(), self_check=True)
    assert "swiglu" in patch_state(model)
    with caplog.at_level(logging.WARNING, logger="fastsft.patch"):
        loss, grads = _loss_and_grads(model)
    lines = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("self-check: swiglu (float32, "), lines
    assert "error 3.00e-02 against the fp32 reference" in lines[0] and "runs PyTorch's code" in lines[0]
    assert "swiglu" not in patch_state(model) and {"rms_norm", "attention", "lora"} <= set(patch_state(model))
    ref_loss, ref_grads = _loss_and_grads(reference)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_no_check_where_the_ops_run_the_reference(monkeypatch, caplog):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    model = fastsft.patch_model(_tiny_lora(), self_check=True)
    with caplog.at_level(logging.INFO, logger="fastsft.patch"):
        _loss_and_grads(model)
    assert any("self-check: skipped, the ops run PyTorch's reference on cpu" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("lora", [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_dropout=0.1, use_dora=True)])
def test_dora_and_dropout_ops_are_checked(lora, caplog):
    """LoRA with dropout in training and DoRA run through lora_linear_ex(_fused): checked like the rest,
    each recorded call's dropout masks drawn once for the op, the oracle and PyTorch alike."""
    model = fastsft.patch_model(_tiny_lora(**lora), self_check=True)
    model.train()
    seen = []
    original = self_check.check_op
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(self_check, "check_op", lambda name, rec, seed=0: seen.append(original(name, rec, seed))
                   or seen[-1])
        _loss_and_grads(model)
    ops = {c.op for c in seen}
    assert {"lora_linear_ex", "lora_linear_ex_fused"} <= ops and not ops & {"lora_linear", "lora_linear_fused"}
    for check in seen:
        assert check.passed, check.line()
    assert "lora" in patch_state(model)


def test_ranks_switch_back_what_failed_on_any_rank(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "cuda:nccl,cpu:gloo")

    def other_rank_failed_rope(flags, op):  # the other rank's flags: rope failed there
        assert op == dist.ReduceOp.MAX and flags.device.type == "cpu"
        flags[self_check._COMPONENTS.index("rope")] = 1.0

    monkeypatch.setattr(dist, "all_reduce", other_rank_failed_rope)
    assert self_check._agree_across_ranks({"swiglu"}) == ["rope", "swiglu"]
