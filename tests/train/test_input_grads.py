"""finish_model drops transformers' / peft's input-require-grads hook (non-reentrant checkpointing does
not need it): the embeddings' output is no longer a leaf autograd keeps for the whole backward, and the
gradients of every trained parameter are the same, bit for bit."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastsft.config import TrainConfig  # noqa: E402
from fastsft.train.model import drop_input_require_grads, finish_model  # noqa: E402


def _base():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _step(model):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 19), generator=g)
    seen = {}
    emb = model.get_input_embeddings()

    def look(module, inputs, output):
        seen["requires_grad"] = output.requires_grad

    handle = emb.register_forward_hook(look)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    handle.remove()
    return seen["requires_grad"], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("patch_kernels", [False, True])
def test_lora_gradients_unchanged_without_the_input_grad_hook(patch_kernels):
    config = TrainConfig(dataset="x", mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         gradient_checkpointing=True, patch_kernels=patch_kernels,
                         lora_target_modules=["q_proj", "v_proj", "down_proj"])
    model = finish_model(_base(), config)
    for _, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for b in module.lora_B.values():  # peft starts B at zero: make every gradient non-trivial
                torch.nn.init.normal_(b.weight, std=0.02)
    model.train()
    needs, grads = _step(model)
    assert needs is False
    model.get_base_model().enable_input_require_grads()  # the hook back: the stock behaviour
    needs_stock, stock = _step(model)
    assert needs_stock is True
    assert grads.keys() == stock.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], stock[name]), name
    assert drop_input_require_grads(model) == 1


def test_full_fine_tuning_keeps_embedding_gradients():
    config = TrainConfig(dataset="x", mode="full", gradient_checkpointing=True, patch_kernels=False)
    model = finish_model(_base(), config)
    model.train()
    needs, grads = _step(model)
    assert needs is True  # through its own trainable weight
    assert grads["model.embed_tokens.weight"].abs().sum() > 0
