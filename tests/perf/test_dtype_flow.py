"""Dtype flow: in every mode x precision, each fastsft kernel receives the compute dtype.

The model comes from the trainer's own builder (fastsft.train.model.load_model: tiny
Llama; QLoRA through bitsandbytes 4-bit on the CPU), runs a forward and a backward on
a packed batch from the trainer's collator, under the trainer's autocast, with
gradient checkpointing (the recompute goes through the same patches). Every tensor
argument of every kernel call is recorded; an fp32 activation, or an fp32 frozen
weight, reaching a kernel in a bf16/fp16 run fails. Trainable fp32 parameters (the
LoRA adapters, full fine-tuning's norm weights) are master weights: the kernels read
them tile by tile and cast inside. The reference ops run the math here
(FASTSFT_TRITON_ON_CPU=0); the recorder wraps the public ops, so it sees what the
Triton kernels get on a GPU.
"""
import pytest
import torch

from fastsft.config import TrainConfig
from fastsft.train.batch import batch_to_device, output_vocab_size
from fastsft.train.evaluate import autocast_factory
from fastsft.train.model import load_model, resolve_precision

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
EXPECTED_OPS = {
    "full": {"linear_cross_entropy", "rms_norm", "rope", "swiglu", "varlen_attention"},
    "lora": {"linear_cross_entropy", "rms_norm", "rope", "swiglu", "varlen_attention", "lora_linear"},
    "qlora": {"linear_cross_entropy", "rms_norm", "rope", "swiglu", "varlen_attention", "lora_linear"},
}


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")


def build(path, mode, precision, **extra):
    # cpu_ops: patched -- the kernels' path is the contract (fastest would time ops, and may drop them, on CPU)
    config = TrainConfig(mode=mode, precision=precision, device="cpu", gradient_checkpointing=True,
                         lora_r=4, lora_alpha=8, cpu_ops="patched", **extra)
    device = torch.device("cpu")
    prec = resolve_precision(config, device)
    model = load_model(path, config, device, prec)
    model.train()
    return model, prec, device


def step(model, prec, device, batch):
    inputs = batch_to_device(batch, device, vocab_size=output_vocab_size(model))
    with autocast_factory(device, prec.compute_dtype, prec.autocast)():
        loss = model(**inputs, num_items_in_batch=batch["num_trained_tokens"], use_cache=False).loss
    loss.backward()
    return loss


def offending(recorder, compute, fp32_norm: bool = False):
    """Kernel arguments in another floating dtype than ``compute``, except trainable parameters and, with
    ``fp32_norm`` (an fp32 residual stream: full fine-tuning), the RMSNorm, which normalizes it in fp32 as
    transformers does and hands the next linear the compute dtype (fastsft/patch/layers.py)."""
    bad = []
    for call in recorder.calls:
        for where, t in call.args:
            if not t.is_floating_point() or t.dtype == compute:
                continue
            if fp32_norm and call.op == "rms_norm" and t.dtype == torch.float32:
                continue
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                continue  # an fp32 master weight, cast tile by tile inside the kernel
            bad.append(f"{call.op} argument {where}: {t.dtype}"
                       + (" (frozen parameter)" if isinstance(t, torch.nn.Parameter) else ""))
    return sorted(set(bad))


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_every_kernel_gets_the_compute_dtype(tiny_llama_dir, kernel_recorder, make_packed_batch, mode, precision):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    compute = PRECISIONS[precision]
    model, prec, device = build(tiny_llama_dir, mode, precision)
    loss = step(model, prec, device, make_packed_batch())
    assert torch.isfinite(loss)
    table = kernel_recorder.dtype_table()
    missing = EXPECTED_OPS[mode] - set(table)
    assert not missing, f"{mode}/{precision}: kernels never called: {sorted(missing)}; calls: {kernel_recorder.counts()}"
    bad = offending(kernel_recorder, compute, fp32_norm=mode == "full")
    assert not bad, f"{mode}/{precision}: not {compute} into a kernel:\n" + "\n".join(bad) + f"\ntable: {table}"
    # nothing in the model is a frozen fp32 weight (QLoRA: no blanket upcast of norms/embeddings/lm_head)
    frozen_fp32 = [n for n, p in model.named_parameters()
                   if not p.requires_grad and p.dtype == torch.float32]
    assert not frozen_fp32, f"{mode}/{precision}: frozen fp32 parameters {frozen_fp32[:5]}"
    if mode == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "the base is not 4-bit"
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n), \
            "QLoRA's base must stay frozen"
    if mode in ("lora", "qlora"):  # the adapters train and get gradients in fp32
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        assert adapters and all(p.dtype == torch.float32 and p.grad is not None for p in adapters)


def test_full_fine_tuning_casts_lm_head_once_per_optimizer_step(tiny_llama_dir, kernel_recorder, make_packed_batch):
    """fp32 master lm_head under bf16 autocast: the kernel gets one bf16 copy per weight version."""
    model, prec, device = build(tiny_llama_dir, "full", "bf16")
    head = model.get_output_embeddings().weight
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)

    def weights_seen():
        return [t for call in kernel_recorder.calls if call.op == "linear_cross_entropy"
                for where, t in call.args if where == 1]

    step(model, prec, device, make_packed_batch(seed=1))
    step(model, prec, device, make_packed_batch(seed=2))  # a second micro-batch, same step
    first, second = weights_seen()
    assert first.dtype == second.dtype == torch.bfloat16
    assert first.data_ptr() == second.data_ptr(), "lm_head was cast again within one optimizer step"
    assert head.grad is not None and head.grad.dtype == torch.float32  # the gradient reaches the master weight
    optimizer.step()
    step(model, prec, device, make_packed_batch(seed=3))
    third = weights_seen()[2]
    expected = head.detach().to(torch.bfloat16)
    assert torch.equal(third, expected), "after the update the kernel must see the new weight"
