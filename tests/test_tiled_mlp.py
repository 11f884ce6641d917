"""fastsft.patch.tiled_mlp: the MLP over token tiles gives the untiled loss and gradients.

Full fine-tuning (every MLP weight trained), LoRA on a dense base and QLoRA (a 4-bit base),
on a packed batch of several documents, through fastsft's patched model (swiglu, LoRA,
attention, loss), with and without non-reentrant gradient checkpointing, in fp32 and under
bf16 autocast; plus the bare-module properties: only the input is saved, at most one tile's
intermediates are alive, LoRA dropout draws the same masks in the recompute.
"""
import pytest
import torch

import fastsft
from fastsft.patch import tiled_mlp
from fastsft.train.batch import batch_to_device
from fastsft_kernels.testing import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOCS = (11, 7, 16, 5)  # a packed row of 39 tokens: tiles of 8 cut through documents


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _to_4bit(model):
    bnb = pytest.importorskip("bitsandbytes")
    for _, module in list(model.model.layers.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=64)
                setattr(module, name, q.to("cpu"))
    model.is_loaded_in_4bit = True
    return model


def _model(mode, checkpointing):
    model = _tiny_llama(seed=3)
    if mode == "qlora":
        model = _to_4bit(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode in ("lora", "qlora"):
        torch.manual_seed(1)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=TARGETS, init_lora_weights=False))
    model.train()
    return fastsft.patch_model(model)


def _packed_batch(seed=5, vocab=97):
    g = torch.Generator().manual_seed(seed)
    total = sum(DOCS)
    ids = torch.randint(0, vocab, (1, total), generator=g)
    labels = ids.clone()
    positions, cu, start = [], [0], 0
    for length in DOCS:
        labels[0, start] = -100  # no document is trained on the previous one's last token
        positions += list(range(length))
        start += length
        cu.append(start)
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([positions]),
             "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32), "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
             "max_length_q": max(DOCS), "max_length_k": max(DOCS)}
    return batch_to_device(batch, torch.device("cpu"), vocab_size=vocab)


def _loss_and_grads(model, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**_packed_batch(), use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_tiled_equals_untiled(reference_ops, mode, checkpointing):
    model = _model(mode, checkpointing)
    loss_ref, grads_ref = _loss_and_grads(model, autocast=False)
    done = tiled_mlp.apply(model, 8)
    assert done == ["LlamaMLP x2 (tiles of 8 tokens)"]
    calls = []
    real = tiled_mlp._TiledMLP.backward

    def counted(ctx, grad):
        calls.append(ctx.tile)
        return real(ctx, grad)

    tiled_mlp._TiledMLP.backward = staticmethod(counted)
    try:
        loss, grads = _loss_and_grads(model, autocast=False)
    finally:
        tiled_mlp._TiledMLP.backward = staticmethod(real)
    assert calls == [8, 8], "both MLPs must take the tiled backward"
    assert_close(loss, loss_ref, 1e-6, "loss")
    assert grads.keys() == grads_ref.keys()
    mlp_grads = [n for n in grads if "mlp" in n]
    assert mlp_grads, "no trained MLP parameter: the test would not check the accumulation"
    for name in grads:
        assert_close(grads[name], grads_ref[name], 1e-5, name)
    tiled_mlp.revert(model)
    loss_back, _ = _loss_and_grads(model, autocast=False)
    assert torch.equal(loss_back, loss_ref)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tiled_equals_untiled_under_bf16_autocast(reference_ops, mode):
    model = _model(mode, checkpointing=True)
    loss_ref, grads_ref = _loss_and_grads(model, autocast=True)
    tiled_mlp.apply(model, 8)
    loss, grads = _loss_and_grads(model, autocast=True)
    # bf16 matmuls per tile vs over all rows: same math, only the rounding of sums may differ
    assert_close(loss, loss_ref, 1e-2, "loss")
    for name in grads:
        assert_close(grads[name], grads_ref[name], 2e-2, name)


def test_unpatched_mlp_is_tiled_through_its_own_forward(reference_ops):
    model = _tiny_llama()
    fastsft.patch_model(model, swiglu=False)
    ref = _loss_and_grads(model, autocast=False)
    tiled_mlp.apply(model, 8)
    mlp = model.model.layers[0].mlp
    assert "forward" in mlp.__dict__, "an MLP left to PyTorch needs the tiled instance forward"
    loss, grads = _loss_and_grads(model, autocast=False)
    assert_close(loss, ref[0], 1e-6, "loss")
    for name in grads:
        assert_close(grads[name], ref[1][name], 1e-5, name)
    tiled_mlp.revert(model)
    assert "forward" not in mlp.__dict__


# ---------------------------------------------------------------- the bare module
def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2)
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(config).to(dtype)


def test_only_the_input_is_saved_and_one_tile_is_alive():
    mlp = _mlp()
    x = torch.randn(3, 20, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tiled_mlp.run_mlp(mlp, x, 7)
    assert saved == [(60, 16)], f"the tiled forward saved more than its input: {saved}"
    widest = []
    real_down = mlp.down_proj.forward

    def down(t):
        widest.append(t.shape[0])
        return real_down(t)

    mlp.down_proj.forward = down
    out.backward(torch.randn_like(out))
    assert widest and max(widest) == 7, f"backward recomputed more than one tile at a time: {widest}"
    assert len(widest) == 9  # ceil(60 / 7) tiles


def test_full_finetune_bf16_params_accumulate_in_fp32():
    mlp = _mlp(seed=2, dtype=torch.bfloat16)
    x = torch.randn(1, 96, 16, dtype=torch.bfloat16)
    grad = torch.randn(1, 96, 16, dtype=torch.bfloat16)
    mlp(x).backward(grad)
    ref = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    mlp.zero_grad(set_to_none=True)
    tiled_mlp.run_mlp(mlp, x, 8).backward(grad)
    exact = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    for name, p in mlp.named_parameters():
        assert exact[name].dtype == torch.bfloat16
        # fp32 reference of the same bf16 inputs: the tiled sum is rounded once, like the untiled GEMM
        assert_close(exact[name].float(), ref[name].float(), 2e-2, name)


def test_lora_dropout_same_masks_in_recompute():
    mlp = _mlp(seed=4)
    model = torch.nn.Module()
    model.mlp = mlp
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                      target_modules=["gate_proj", "up_proj", "down_proj"],
                                                      init_lora_weights=False))
    lora.train()
    layer = lora.base_model.model.mlp
    x = torch.randn(2, 30, 16, requires_grad=True)
    g = torch.randn(2, 30, 16)
    # the tiled backward must recompute with the forward's masks: its gradients equal those of
    # the same tiles run by hand (with autograd) from the same RNG state
    torch.manual_seed(7)
    out = tiled_mlp.run_mlp(layer, x, 6)
    out.backward(g)
    tiled = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    grad_x = x.grad.clone()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    rows = x.reshape(-1, 16)
    pieces = [layer(rows[i:i + 6]) for i in range(0, 60, 6)]
    manual = torch.cat(pieces).reshape(2, 30, 16)
    assert torch.equal(manual.detach(), out.detach()), "the forward's tiles must draw the stream in order"
    manual.backward(g)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert_close(tiled[name], p.grad, 1e-5, name)
    assert_close(grad_x, x.grad, 1e-5, "input gradient")


def test_default_tile_from_free_memory():
    # 8B MLP (14,336 wide, bf16): 1/4 of 20 GiB free over 8 buffers of 14,336 x 2 bytes per token
    assert tiled_mlp.default_tile_tokens(14336, 2, 20 * 2**30) == 22 * 1024
    assert tiled_mlp.default_tile_tokens(14336, 2, 18 * 2**30) > 16384  # 16k tokens untiled on a 24 GB card
    assert tiled_mlp.default_tile_tokens(14336, 2, 2**20) == 1024  # never below one 1024-token tile
    assert tiled_mlp.free_memory_bytes(torch.device("cpu")) > 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_tile_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="positive int"):
        tiled_mlp.apply(_tiny_llama(), bad)
