"""fastsft.train.offload: checkpoints offloaded on a side stream, prefetched one layer ahead.

On CPU the stream operations are no-ops and the rest of the path runs as on a GPU: every
tensor backward gets back is bit-identical to the one the forward saved (values, dtype,
shape, strides), the gradients equal those of the run without offload, and the backward
restores each layer's tensors from the prefetch started one layer earlier.
"""
import pytest
import torch

import fastsft
from fastsft.patch import tiled_mlp
from fastsft.train.offload import MIN_BYTES, OverlappedOffload, decoder_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LAYERS = 4


def _model(lora):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=89,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                           init_lora_weights=False))
    model.train()
    return fastsft.patch_model(model)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 89, (2, 21), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _grads(model, offload=None):
    model.zero_grad(set_to_none=True)
    with offload if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = model(**_batch(), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _Witness(OverlappedOffload):
    """Records what each pack received and each unpack returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved, self.restored = {}, []

    def _pack(self, t):
        packed = super()._pack(t)
        if packed is not t:
            self.saved[id(packed)] = t.detach().clone(memory_format=torch.preserve_format)
        return packed

    def _unpack(self, packed):
        t = super()._unpack(packed)
        if id(packed) in self.saved:
            self.restored.append((self.saved[id(packed)], t))
        return t


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled-mlp"])
def test_backward_gets_every_tensor_back_bit_exact(reference_ops, lora, tiled):
    model = _model(lora)
    if tiled:
        tiled_mlp.apply(model, 16)
    loss_ref, grads_ref = _grads(model)
    layers = decoder_layers(model)
    assert len(layers) == LAYERS
    offload = _Witness(torch.device("cpu"), layers)
    loss, grads = _grads(model, offload)
    stats = offload.stats
    assert stats["offloaded"] >= LAYERS, f"each layer's checkpoint goes to the host: {stats}"
    assert len(offload.restored) == stats["offloaded"], "every offloaded tensor comes back in backward"
    for before, after in offload.restored:
        assert after.dtype == before.dtype and after.shape == before.shape and after.stride() == before.stride()
        assert torch.equal(after, before)
    # one layer ahead: only the first group the backward meets (the loss end) is restored synchronously
    assert stats["synchronous"] == len([g for g in offload.groups if g][-1]), stats
    assert stats["prefetched"] == stats["offloaded"] - stats["synchronous"]
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name
    # the layer hooks are gone: the recompute in backward opened no group
    assert not any(layer._forward_pre_hooks for layer in layers)


def test_one_group_per_layer_and_double_buffer(reference_ops):
    model = _model(lora=False)
    offload = OverlappedOffload(torch.device("cpu"), decoder_layers(model))
    on_device_while_unpacking = []
    real = offload._unpack

    def watch(packed):
        out = real(packed)
        on_device_while_unpacking.append(sorted({e.group for g in offload.groups for e in g if e.on_device is not None}))
        return out

    offload._hooks = torch.autograd.graph.saved_tensors_hooks(offload._pack, watch)
    with offload:
        loss = model(**_batch(), use_cache=False).loss
    # one group per layer holding its input (the checkpoint), then the tensors after the last layer
    groups = [g for g in offload.groups if g]
    assert [len(g) for g in groups[:LAYERS]] == [1] * LAYERS and len(groups) == LAYERS + 1, \
        [len(g) for g in offload.groups]
    loss.backward()
    assert all(len(groups) <= 1 for groups in on_device_while_unpacking), \
        f"more than the next layer was prefetched: {on_device_while_unpacking}"


def test_parameters_and_small_tensors_stay():
    offload = OverlappedOffload(torch.device("cpu"))
    weight = torch.nn.Parameter(torch.randn(64, 64))
    small = torch.randn(MIN_BYTES // 4 - 1)
    big = torch.randn(64, 64)
    assert offload._pack(weight) is weight
    assert offload._pack(small) is small
    packed = offload._pack(big)
    assert packed is not big and packed.host.data_ptr() != big.data_ptr()
    assert torch.equal(offload._unpack(packed), big)
    assert offload.stats["kept"] == 2 and offload.stats["offloaded"] == 1
