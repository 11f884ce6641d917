"""The Triton kernels (through the interpreter on CPU; natively on a GPU) on SmolLM2's real weights
and activations: its first two decoder layers, final norm and tied 49152-word output embedding, with
LoRA rank 8 on every linear layer, on two real multi-turn conversations packed into one row.

Same rule as test_real_parity.py, against the unpatched model in fp32 (the oracle): under bf16
autocast the kernels' error is at most 2x PyTorch's own bf16 error for the logits and all LoRA
gradients together (3x for each gradient alone and the scalar loss); in fp32 the kernels match
(1e-4 relative, gradients 1e-3: fp32 tl.dot accumulation order over 576..1536-long rows).
"""
import copy

import pytest
import torch

import fastsft
from fastsft_kernels.testing import rel_err

from .conftest import error_table, gradient_ratios, packed_batch, run_model, truncated, with_lora, worst_gradient_ratios  # noqa: F401

pytestmark = pytest.mark.real
LAYERS = 2


@pytest.fixture(scope="module")
def results(smollm2_fp32, real_examples):
    ref = with_lora(truncated(smollm2_fp32, LAYERS))
    fast = fastsft.patch_model(copy.deepcopy(ref))
    batch = packed_batch([real_examples[1], real_examples[3]])  # the multi-turn ones: 4 replies
    return {
        "oracle": run_model(ref, batch),
        "torch_bf16": run_model(ref, batch, torch.bfloat16),
        "fast_fp32": run_model(fast, batch),
        "fast_bf16": run_model(fast, batch, torch.bfloat16),
        "tokens": (batch["input_ids"].shape[1], batch["num_trained_tokens"]),
        "device": next(fast.parameters()).device.type,
    }


def _errors(result, oracle):
    loss, logits, grads = result
    loss_ref, logits_ref, grads_ref = oracle
    assert grads.keys() == grads_ref.keys() and len(grads) == LAYERS * 7 * 2
    return {
        "loss": abs(float(loss) - float(loss_ref)) / abs(float(loss_ref)),
        "logits": rel_err(logits, logits_ref),
        "grads": {name: rel_err(grads[name], grads_ref[name]) for name in grads_ref},
        "grad_norm": rel_err(torch.cat([grads[n].flatten() for n in grads_ref]),
                             torch.cat([grads_ref[n].flatten() for n in grads_ref])),
    }


def test_kernels_bf16_within_twice_pytorch_bf16_error(results, record_property):
    torch16 = _errors(results["torch_bf16"], results["oracle"])
    fast16 = _errors(results["fast_bf16"], results["oracle"])
    tokens, trained = results["tokens"]
    record_property("figure", error_table(
        f"kernels (Triton{' interpreter' if results['device'] == 'cpu' else ''}), {LAYERS} real layers + LoRA r8, "
        f"{tokens} tokens ({trained} trained), error vs unpatched fp32:",
        {"unpatched bf16": torch16, "kernels bf16": fast16}) + "\n" + worst_gradient_ratios(fast16, torch16))
    assert fast16["logits"] <= 2 * torch16["logits"], (fast16["logits"], torch16["logits"])
    assert fast16["grad_norm"] <= 2 * torch16["grad_norm"], (fast16["grad_norm"], torch16["grad_norm"])
    assert fast16["loss"] <= 3 * torch16["loss"], (fast16["loss"], torch16["loss"])
    # Per gradient 3x (against PyTorch's error on it, floored at its median: conftest.gradient_ratios).
    # Measured: worst 1.57x (layer 0's v_proj lora_A). It was 3.8x (k_proj lora_A) while the RMSNorm
    # patch rounded the fp32 residual stream to bf16 and its gradient with it at every norm; each op
    # alone stayed under 1.7x, the roundings compounded down to layer 0 (fastsft/patch/layers.py).
    ratios = gradient_ratios(fast16, torch16)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 3, (worst, fast16["grads"][worst], torch16["grads"][worst])


def test_kernels_fp32_match(results, record_property):
    fast32 = _errors(results["fast_fp32"], results["oracle"])
    record_property("figure", error_table(f"kernels, {LAYERS} real layers, fp32 vs unpatched fp32:",
                                          {"kernels fp32": fast32}))
    assert fast32["loss"] <= 1e-4 and fast32["logits"] <= 1e-4
    assert max(fast32["grads"].values()) <= 1e-3
