"""Patched means patched: for every supported family, patch_model reports each op family it
advertises as patched on the installed transformers, and a forward + backward of the
patched (peft LoRA) model on a packed batch calls each kernel the expected number of times.
"Nothing to patch" for a supported family fails here.
"""
import logging

import pytest
import torch

import fastsft
from fastsft.patch import patch_state
from fastsft.train.batch import batch_to_device

VOCAB = 128
# model_type -> (extra config, whether its MLP is SwiGLU, q/k norms per attention)
FAMILIES = {
    "llama": ({}, True, False),
    "mistral": ({"sliding_window": 8}, True, False),
    "qwen2": ({}, True, False),
    "qwen3": ({"head_dim": 16}, True, True),
    "gemma2": ({"head_dim": 16, "sliding_window": 8}, False, False),  # GeGLU MLP: no kernel, said so
    "gemma3_text": ({"head_dim": 16, "sliding_window": 8}, False, True),
    "phi3": ({}, True, False),
}
LAYERS = 2


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")


def tiny(model_type, extra):
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_advertised_op_is_patched_and_called(model_type, kernel_recorder, make_packed_batch, caplog):
    import peft

    extra, swiglu, qk_norm = FAMILIES[model_type]
    base = tiny(model_type, extra)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                      lora_dropout=0.0, init_lora_weights=False))
    with caplog.at_level(logging.INFO, logger="fastsft"):
        fastsft.patch_model(model)
    advertised = {"lora", "attention", "rms_norm", "rope", "cross_entropy"} | ({"swiglu"} if swiglu else set())
    state = patch_state(model)
    missing = advertised - set(state)
    assert not missing, f"{model_type}: not patched: {sorted(missing)}\n{caplog.text}"
    for name in advertised:
        assert f"{name}: nothing to patch" not in caplog.text, caplog.text
        assert f"{name}: no supported module" not in caplog.text, caplog.text

    model.train()
    batch = make_packed_batch()
    loss = model(**batch_to_device(batch, torch.device("cpu"), vocab_size=VOCAB),
                 num_items_in_batch=batch["num_trained_tokens"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    lora_layers = sum(1 for n, m in model.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n.split(".")[-1:])
    expected = {
        "varlen_attention": LAYERS,
        "rope": LAYERS,
        "linear_cross_entropy": 1,
        # input + post-attention norms per layer (Gemma-2/3: four), the final norm, q/k norms
        "rms_norm": LAYERS * (4 if model_type.startswith("gemma") else 2) + 1 + (2 * LAYERS if qk_norm else 0),
    }
    if model_type == "phi3":  # packed qkv_proj and gate_up_proj: one LoRA layer each
        expected.update(lora_linear=lora_layers, lora_linear_fused=0)
    else:  # q/k/v and gate/up share x: one fused call each; o_proj and down_proj alone
        expected.update(lora_linear=lora_layers - 5 * LAYERS, lora_linear_fused=2 * LAYERS)
    if swiglu:
        expected["swiglu"] = LAYERS
    counts = kernel_recorder.counts()
    assert {op: counts.get(op, 0) for op in expected} == expected, f"{model_type}: kernel calls {counts}"
