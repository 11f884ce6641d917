"""fastsft.patch.lora with DoRA, QDoRA, LoRA dropout and lora_bias: no layer left on peft's path.

A tiny Llama with peft adapters on every linear layer, patched, gives peft's loss and
every gradient (the DoRA magnitudes included) with each layer on fastsft's ops (the
q/k/v and gate/up groups fused); dropout runs with the masks forced equal on both
sides (DROPOUT_MASK_HOOK and a forced nn.Dropout in peft). Saved DoRA adapters load
back into plain peft. A DoRA embedding keeps peft's path with one line naming it.
"""
import logging

import pytest
import torch

from fastsft.patch import lora as lora_patch
from fastsft_kernels import lora_dora
from fastsft_kernels.testing import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                      max_position_embeddings=64)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)


def _to_4bit(model, quant_type="nf4", nested=True):
    """Every decoder nn.Linear as a bitsandbytes 4-bit Linear4bit holding the same weight."""
    bnb = pytest.importorskip("bitsandbytes")
    for module in list(model.model.layers.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type=quant_type)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                             blocksize=64, compress_statistics=nested)
                setattr(module, child_name, q.to("cpu"))
    model.is_loaded_in_4bit = True  # peft then wraps Linear4bit bases with its bnb LoRA layer
    return model


def _peft(model, seed=1, **config):
    torch.manual_seed(seed)
    cfg = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    cfg.update(config)
    return peft.get_peft_model(model, peft.LoraConfig(**cfg))


def _batch(seed=2):
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    ids, labels = _batch()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _ForcedDropout(torch.nn.Dropout):
    """peft's side of a forced mask: the mask for x's shape, from a shared table."""

    def __init__(self, p, masks):
        super().__init__(p)
        self.masks = masks

    def forward(self, x):
        if not self.training:
            return x
        return x * self.masks[tuple(x.shape)].to(x.dtype) / (1 - self.p)


def _force_masks(model, monkeypatch, p, seed=5):
    """One mask per input shape, used by peft's dropout modules and by fastsft's op alike."""
    g = torch.Generator().manual_seed(seed)
    masks = {shape: torch.rand(shape, generator=g) >= p for shape in ((2, 13, 64), (2, 13, 128))}
    for module in model.modules():
        if hasattr(module, "lora_dropout") and "default" in getattr(module, "lora_dropout", {}):
            module.lora_dropout["default"] = _ForcedDropout(p, masks)
    monkeypatch.setattr(lora_dora, "DROPOUT_MASK_HOOK", lambda p_, shape, device: masks[shape])


def _count_ops(monkeypatch):
    import importlib

    import fastsft_kernels

    calls = {}
    for module_name, names in (("fastsft_kernels.lora", ("lora_linear", "lora_linear_fused")),
                               ("fastsft_kernels.lora_dora", ("lora_linear_ex", "lora_linear_ex_fused"))):
        module = importlib.import_module(module_name)
        for name in names:
            calls[name] = 0
            original = getattr(module, name)

            def counting(*args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counting)
            monkeypatch.delitem(fastsft_kernels.__dict__, name, raising=False)
    return calls


def _compare(model, monkeypatch, bound=1e-5, n_params=None):
    model.train()
    loss_ref, grads_ref = _loss_and_grads(model)
    lines = lora_patch.apply(model)
    assert len([line for line in lines if "lora_linear (" in line]) == 2 * len(TARGETS)
    assert len([line for line in lines if "-> lora_linear_fused" in line]) == 2 * 2
    calls = _count_ops(monkeypatch)
    loss, grads = _loss_and_grads(model)
    fell_back = {name: m.__dict__.get("_fastsft_lora_logged") for name, m in model.named_modules()
                 if m.__dict__.get("_fastsft_lora_logged")}
    assert not fell_back, f"layers took peft's path: {fell_back}"
    # per decoder layer: one q/k/v and one gate/up group call, o_proj and down_proj single calls
    assert calls == {"lora_linear": 0, "lora_linear_fused": 0, "lora_linear_ex": 4, "lora_linear_ex_fused": 4}
    assert_close(loss, loss_ref, bound, "loss")
    assert grads.keys() == grads_ref.keys() and len(grads) == (n_params or 4 * len(TARGETS))
    for name in grads:
        assert_close(grads[name], grads_ref[name], bound, name)
    lora_patch.revert(model)
    return grads


def _perturb_magnitudes(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.6, 1.4, p.numel()))


def test_dora_dense_same_loss_and_grads(monkeypatch):
    model = _peft(_tiny_llama(seed=20), use_dora=True)
    _perturb_magnitudes(model)
    grads = _compare(model, monkeypatch, n_params=6 * len(TARGETS))
    assert sum("lora_magnitude_vector" in n for n in grads) == 2 * len(TARGETS)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_qdora_same_loss_and_grads(monkeypatch, quant_type, nested):
    model = _peft(_to_4bit(_tiny_llama(seed=21), quant_type, nested), use_dora=True)
    _perturb_magnitudes(model)
    _compare(model, monkeypatch, n_params=6 * len(TARGETS))


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_forced_masks_same_loss_and_grads(monkeypatch, dora):
    model = _peft(_tiny_llama(seed=22), lora_dropout=0.05, use_dora=dora)
    if dora:
        _perturb_magnitudes(model)
    _force_masks(model, monkeypatch, 0.05)
    _compare(model, monkeypatch, n_params=(6 if dora else 4) * len(TARGETS))


def test_qdora_dropout_forced_masks(monkeypatch):
    model = _peft(_to_4bit(_tiny_llama(seed=23)), lora_dropout=0.1, use_dora=True)
    _perturb_magnitudes(model)
    _force_masks(model, monkeypatch, 0.1)
    _compare(model, monkeypatch, n_params=6 * len(TARGETS))


def test_lora_bias_same_loss_and_grads(monkeypatch):
    model = _peft(_tiny_llama(seed=24), lora_bias=True, lora_dropout=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()
    _force_masks(model, monkeypatch, 0.1)
    _compare(model, monkeypatch, n_params=6 * len(TARGETS))


def test_dropout_draws_from_the_seeded_rng_and_survives_checkpointing():
    """No hook: a seeded step is reproducible, and checkpointed recomputation redraws the same
    masks (torch.utils.checkpoint restores the RNG), so both give the same gradients."""
    model = _peft(_tiny_llama(seed=25), lora_dropout=0.05, use_dora=True)
    model.train()
    lora_patch.apply(model)

    def run():
        torch.manual_seed(7)
        return _loss_and_grads(model)

    loss_a, grads_a = run()
    loss_b, grads_b = run()
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    model.eval()
    loss_eval, _ = _loss_and_grads(model)
    assert not torch.equal(loss_eval, loss_a), "dropout must change the training loss"
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    loss_c, grads_c = run()
    assert_close(loss_c, loss_a, 1e-6, "checkpointed loss")
    for name in grads_a:
        assert_close(grads_c[name], grads_a[name], 1e-5, name)


def test_dora_adapters_save_and_load_with_plain_peft(tmp_path, monkeypatch):
    model = _peft(_tiny_llama(seed=26), use_dora=True, lora_dropout=0.05)
    model.train()
    lora_patch.apply(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, _ = _batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = peft.PeftModel.from_pretrained(_tiny_llama(seed=26), tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert_close(fresh(input_ids=ids).logits, patched, 1e-5, "plain peft reload vs patched")
    magnitude = [n for n, _ in fresh.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitude) == 2 * len(TARGETS)


def test_dora_embedding_keeps_peft_path_with_one_line(caplog):
    model = _peft(_tiny_llama(seed=27), use_dora=True, target_modules=["embed_tokens"] + TARGETS)
    with caplog.at_level(logging.INFO, logger="fastsft"):
        lines = lora_patch.apply(model)
    kept = [line for line in lines if "kept on peft's path" in line]
    assert len(kept) == 1 and "Embedding LoRA layers with DoRA are not supported" in kept[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "1 kept on peft's path" in infos[0] and "Embedding" in infos[0]
    ids, _ = _batch()
    patched = model(input_ids=ids).logits
    lora_patch.revert(model)
    assert_close(patched, model(input_ids=ids).logits, 1e-5, "logits")


@pytest.mark.parametrize("four_bit", [False, True])
def test_dora_under_autocast(four_bit):
    """The trainer runs bf16 forwards under torch.autocast: each bf16 run is judged against the fp32
    run, and the fused DoRA path must be about as close to it as peft's own autocast path."""
    from fastsft_kernels.testing import rel_err

    model = _tiny_llama(seed=28)
    model = _peft(_to_4bit(model) if four_bit else model, use_dora=True)
    _perturb_magnitudes(model)
    model.train()
    loss_fp32, grads_fp32 = _loss_and_grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_peft, grads_peft = _loss_and_grads(model)
        lora_patch.apply(model)
        loss, grads = _loss_and_grads(model)
    assert not any(m.__dict__.get("_fastsft_lora_logged") for m in model.modules())
    assert_close(loss, loss_fp32, 1e-2, "loss under autocast vs fp32")
    assert sum("lora_magnitude_vector" in n for n in grads) == 2 * len(TARGETS)
    for name in grads:
        ours, peft_err = rel_err(grads[name], grads_fp32[name]), rel_err(grads_peft[name], grads_fp32[name])
        assert ours <= 1.5 * peft_err + 1e-2, f"{name}: {ours:.3e} vs peft's autocast error {peft_err:.3e}"
