"""fastsft.patch.lora: peft LoRA layers of a tiny Llama routed through lora_linear.

Patched and unpatched runs must give the same loss and LoRA gradients, on a dense
base and on a bitsandbytes 4-bit base; unsupported options keep peft's path and
say so; merge_and_unload / save_pretrained are unaffected.
"""
import copy
import logging

import pytest
import torch

from fastsft.patch import lora as lora_patch
from fastsft_kernels.testing import assert_close, rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                      max_position_embeddings=64)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).to(dtype)


def _to_4bit(model, blocksize=64, nested=True):
    """Replace every decoder nn.Linear with a bitsandbytes NF4 Linear4bit holding the same weight."""
    bnb = pytest.importorskip("bitsandbytes")
    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=blocksize, compress_statistics=nested)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone())
                setattr(module, child_name, q.to("cpu"))
    model.is_loaded_in_4bit = True  # tells peft to wrap Linear4bit bases with its bnb LoRA layer
    return model


def _peft(model, seed=1, **config):
    torch.manual_seed(seed)
    cfg = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    cfg.update(config)
    return peft.get_peft_model(model, peft.LoraConfig(**cfg))


def _batch(seed=2, vocab=101, shape=(2, 13)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    return ids, ids.clone()


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    ids, labels = _batch()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _compare(model, bound):
    loss_ref, grads_ref = _loss_and_grads(model)
    lines = lora_patch.apply(model)
    assert len([line for line in lines if "lora_linear (" in line]) == 2 * len(TARGETS)
    assert len([line for line in lines if "-> lora_linear_fused" in line]) == 2 * 2  # q/k/v and gate/up per layer
    loss, grads = _loss_and_grads(model)
    fell_back = {name: m.__dict__.get("_fastsft_lora_logged") for name, m in model.named_modules()
                 if m.__dict__.get("_fastsft_lora_logged")}
    assert not fell_back, f"layers took peft's path: {fell_back}"
    assert_close(loss, loss_ref, bound, "loss")
    assert grads.keys() == grads_ref.keys() and len(grads) == 4 * len(TARGETS)
    for name in grads:
        assert_close(grads[name], grads_ref[name], bound, name)
    lora_patch.revert(model)
    loss_back, _ = _loss_and_grads(model)
    assert torch.equal(loss_back, loss_ref)


def test_tiny_llama_dense_same_loss_and_grads():
    model = _peft(_tiny_llama())
    model.train()
    _compare(model, 1e-5)


def test_tiny_llama_4bit_same_loss_and_grads():
    model = _peft(_to_4bit(_tiny_llama(seed=3)))
    model.train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit", "peft must wrap the 4-bit base with its bnb LoRA layer"
    _compare(model, 1e-5)


def test_tiny_llama_under_autocast():
    # the trainer runs bf16 forwards under torch.autocast: the fused path must take them
    # Both bf16 runs are approximations: judge each against the fp32 run, and require the
    # fused path to be about as close to it as peft's own autocast path is.
    model = _peft(_tiny_llama(seed=4))
    model.train()
    loss_fp32, grads_fp32 = _loss_and_grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_peft, grads_peft = _loss_and_grads(model)
        lora_patch.apply(model)
        loss, grads = _loss_and_grads(model)
    assert not any(m.__dict__.get("_fastsft_lora_logged") for m in model.modules())
    assert_close(loss, loss_fp32, 1e-2, "loss under autocast vs fp32")
    for name in grads:
        ours, peft_err = rel_err(grads[name], grads_fp32[name]), rel_err(grads_peft[name], grads_fp32[name])
        assert ours <= 1.5 * peft_err + 1e-2, f"{name}: {ours:.3e} vs peft's autocast error {peft_err:.3e}"


def test_apply_is_idempotent_and_instance_only():
    model = _peft(_tiny_llama())
    first = lora_patch.apply(model)
    assert lora_patch.apply(model) == []  # nothing new the second time
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" in layer.__dict__
    other = _peft(_tiny_llama(seed=5))
    assert "forward" not in other.base_model.model.model.layers[0].self_attn.q_proj.__dict__
    lora_patch.revert(model)
    assert "forward" not in layer.__dict__
    assert lora_patch.apply(model) == first


def test_through_patch_model_if_available():
    fastsft = pytest.importorskip("fastsft")
    try:
        patch_model = fastsft.patch_model
    except (AttributeError, ImportError):
        pytest.skip("fastsft.patch_model is not available")
    model = _peft(_tiny_llama(seed=6))
    loss_ref, grads_ref = _loss_and_grads(model)
    patch_model(model, cross_entropy=False, attention=False, rms_norm=False, rope=False, swiglu=False)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert "forward" in layer.__dict__
    loss, grads = _loss_and_grads(model)
    assert_close(loss, loss_ref, 1e-5, "loss")
    for name in grads:
        assert_close(grads[name], grads_ref[name], 1e-5, name)
    fastsft.unpatch_model(model)
    assert "forward" not in layer.__dict__


def test_unsupported_options_keep_peft_path(caplog):
    # a dropout module fastsft does not run (AlphaDropout) in training mode: peft's path, logged
    # once per layer; eval mode: fused path (nn.Dropout runs fused: tests/test_patch_lora_dora.py)
    model = _peft(_tiny_llama(seed=7), lora_dropout=0.1)
    lora_patch.apply(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_dropout["default"] = torch.nn.AlphaDropout(0.1)
    calls = {"n": 0}
    import fastsft_kernels.lora as kernel_module

    original = kernel_module.lora_linear
    original_fused = kernel_module.lora_linear_fused

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    def counting_fused(*args, **kwargs):  # q_proj is in a q/k/v group: its call fuses the three
        calls["n"] += 1
        return original_fused(*args, **kwargs)

    layer_x = torch.randn(2, 5, 64)
    with caplog.at_level(logging.INFO, logger="fastsft"):
        kernel_module.lora_linear = counting
        kernel_module.lora_linear_fused = counting_fused
        import fastsft_kernels

        fastsft_kernels.__dict__.pop("lora_linear", None)  # re-resolve through the module
        fastsft_kernels.__dict__.pop("lora_linear_fused", None)
        try:
            model.train()
            layer(layer_x)
            layer(layer_x)
            assert calls["n"] == 0
            model.eval()
            layer(layer_x)
            assert calls["n"] == 1
        finally:
            kernel_module.lora_linear = original
            kernel_module.lora_linear_fused = original_fused
            fastsft_kernels.__dict__.pop("lora_linear", None)
            fastsft_kernels.__dict__.pop("lora_linear_fused", None)
    messages = [r.getMessage() for r in caplog.records if "dropout" in r.getMessage()]
    assert len(messages) == 1 and "self_attn.q_proj" in messages[0]


def test_dora_runs_fused_and_multiple_adapters_fall_back(caplog):
    model = _peft(_tiny_llama(seed=8), use_dora=True)
    with caplog.at_level(logging.INFO, logger="fastsft"):
        lora_patch.apply(model)
        ids, _ = _batch()
        patched = model(input_ids=ids).logits
    lora_patch.revert(model)
    assert_close(patched, model(input_ids=ids).logits, 1e-5, "DoRA logits")
    assert not any("peft path for this call" in r.getMessage() for r in caplog.records)

    # two adapters, one active: the active one is used; both active -> peft's path
    model = _peft(_tiny_llama(seed=9))
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model.set_adapter("second")
    expected = model(input_ids=ids).logits
    lora_patch.apply(model)
    assert_close(model(input_ids=ids).logits, expected, 1e-5, "active adapter 'second'")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter(["default", "second"])
    x = torch.randn(3, 64)
    with caplog.at_level(logging.INFO, logger="fastsft"):
        both = layer(x)
    lora_patch.revert(model)
    assert torch.equal(both, layer(x))
    assert any("2 active adapters" in r.getMessage() for r in caplog.records)


def test_merge_and_save_unchanged(tmp_path):
    model = _peft(_tiny_llama(seed=10))
    reference = copy.deepcopy(model)
    lora_patch.apply(model)
    ids, _ = _batch()
    # a training step through the patched layers, mirrored on the unpatched copy
    for m in (model, reference):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "patched")
    reference.save_pretrained(tmp_path / "reference")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "patched" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys() and len(saved) == 4 * len(TARGETS)
    for key in saved:
        assert_close(saved[key], expected[key], 1e-5, key)
    # merged layers skip the kernel (peft's own merged forward) and agree
    logits_patched = model(input_ids=ids).logits
    model.merge_adapter()
    assert_close(model(input_ids=ids).logits, logits_patched, 1e-5, "merged vs patched")
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert_close(merged(input_ids=ids).logits, logits_patched, 1e-5, "merge_and_unload vs patched")


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True])
def test_tiny_llama_gpu_bf16(four_bit):
    # on the GPU the patched layers run the compiled kernels; bf16 base (or NF4 with bf16 compute)
    model = _tiny_llama(seed=11)
    if four_bit:
        model = _to_4bit(model)
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.compute_dtype = torch.bfloat16
    model = _peft(model.to(torch.bfloat16) if not four_bit else model).to("cuda")
    model.train()
    ids, labels = (t.to("cuda") for t in _batch())

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = run()
    lora_patch.apply(model)
    loss, grads = run()
    assert not any(m.__dict__.get("_fastsft_lora_logged") for m in model.modules())
    assert_close(loss, loss_ref, 2e-2, "loss")
    for name in grads:
        assert_close(grads[name], grads_ref[name], 1e-1, name)  # bf16 end to end: both runs round differently
