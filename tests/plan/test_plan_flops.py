"""FLOP formulas of the fastsft:: operators (fastsft/plan/flops.py): the fastsft recipe's model FLOPs
agree with the hf recipe's (torch's own formulas) at the same shapes, and the attention formula counts
packed documents one by one."""
import pytest
import torch

from fastsft.plan import load_plan_config, prepare
from fastsft.plan.flops import document_lengths, register

from .test_plan import TINY, write_config


@pytest.mark.parametrize("mode, extra", [("lora", {}), ("qlora", {}), ("full", {}),
                                         ("lora", {"use_dora": True}), ("qlora", {"lora_dropout": 0.1}),
                                         ("lora", {"use_dora": True, "lora_dropout": 0.1})])
def test_fastsft_model_flops_agree_with_hf(tmp_path, mode, extra):
    """Also DoRA and dropout (fastsft::lora_linear_ex against peft's own layers)."""
    config = load_plan_config(write_config(tmp_path, mode=mode, model_config=dict(TINY, num_hidden_layers=4),
                                           **extra))
    ours = prepare(config, "fastsft").trace(512)
    theirs = prepare(config, "hf").trace(512)
    assert ours.flops_uncounted_ops == [] and theirs.flops_uncounted_ops == []
    assert ours.flops_model > 0 and ours.flops_recompute > 0
    # LoRA/QLoRA: fastsft skips layer 0's input gradient through q/k/v (the embeddings are frozen and
    # their output needs no gradient: fastsft.train.model.drop_input_require_grads), 1.2% here
    assert abs(ours.flops_model / theirs.flops_model - 1) < 0.03, (ours.flops_model, theirs.flops_model)
    assert abs(ours.flops_recompute / theirs.flops_recompute - 1) < 0.03
    if mode == "full":
        assert ours.flops_model == theirs.flops_model


def test_attention_counts_each_packed_document():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    import fastsft_kernels.attention  # noqa: F401  (registers the operator)

    register()
    torch.manual_seed(0)
    lengths = [5, 11, 3]
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    q = torch.randn(19, 4, 8, requires_grad=True)
    k = torch.randn(19, 2, 8, requires_grad=True)
    v = torch.randn(19, 2, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out, _ = torch.ops.fastsft.varlen_attention(q, k, v, cu, 11, True, 8 ** -0.5, None, None)
        out.sum().backward()
    shapes = [((1, 4, s, 8), (1, 2, s, 8), (1, 2, s, 8)) for s in lengths]
    forward = sum(sdpa_flop_count(*sh) for sh in shapes)
    backward = sum(sdpa_backward_flop_count(sh[0], *sh) for sh in shapes)
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.fastsft.varlen_attention] == forward > 0
    assert counts[torch.ops.fastsft.varlen_attention_backward] == backward > 0
    assert document_lengths(cu, 19, 11) == lengths


def test_fake_lengths_are_documents_of_max_seqlen():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cu = torch.empty(4, dtype=torch.int32)
    assert document_lengths(cu, 3 * 1024, 1024) == [1024] * 3
    assert document_lengths(cu, 2500, 1024) == [1024, 1024, 452]
