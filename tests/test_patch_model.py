"""fastsft.patch_model / unpatch_model mechanics: per instance, idempotent, reversible,
logged; peft, 4-bit bitsandbytes and unknown architectures; the loss patch's
Hugging Face semantics; transformers' Trainer; torch.compile."""
import copy
import logging

import pytest
import torch

import fastsft
from fastsft.patch import patch_state
from fastsft_kernels.testing import assert_close

VOCAB = 128


def tiny(model_type="llama", seed=0, **extra):
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def batch(seed=0, size=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, seq), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def instance_forwards(model):
    """Names of modules that carry an instance-level forward (what patching adds)."""
    return sorted(name for name, m in model.named_modules() if "forward" in m.__dict__)


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, bound, what):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert_close(loss_a, loss_b, bound, f"{what} loss")
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], bound, f"{what} grad {name}")


# ---------------------------------------------------------------- mechanics
def test_idempotent_per_instance_and_reversible():
    ref = tiny()
    model = copy.deepcopy(ref)
    other = copy.deepcopy(ref)  # same class, never patched
    ids, labels = batch()

    assert fastsft.patch_model(model) is model
    first = instance_forwards(model)
    state = patch_state(model)
    assert {"rms_norm", "rope", "swiglu", "cross_entropy"} <= set(state)
    assert "" in first and "model.norm" in first and "model.layers.0.self_attn" in first and "model.layers.1.mlp" in first

    fastsft.patch_model(model)  # again: nothing changes
    assert instance_forwards(model) == first and patch_state(model) == state

    assert instance_forwards(other) == []  # other instances of the class are untouched
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, ref(input_ids=ids).logits)

    assert fastsft.unpatch_model(model) is model
    assert instance_forwards(model) == [] and patch_state(model) == {}
    with torch.no_grad():  # the original computation, bit for bit
        out, expected = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    fastsft.unpatch_model(model)  # unpatching an unpatched model is a no-op


def test_flags_select_components_and_a_second_call_updates_them():
    model = tiny()
    fastsft.patch_model(model, cross_entropy=False, rope=False, attention=False, lora=False)
    assert set(patch_state(model)) == {"rms_norm", "swiglu"}
    assert "model.layers.0.self_attn" not in instance_forwards(model)
    fastsft.patch_model(model, rms_norm=False, attention=False, lora=False)
    assert set(patch_state(model)) == {"rope", "swiglu", "cross_entropy"}
    assert "model.norm" not in instance_forwards(model)
    fastsft.unpatch_model(model)
    assert instance_forwards(model) == []


def test_what_was_and_was_not_patched_is_logged(caplog):
    model = tiny("gemma2", head_dim=16)
    with caplog.at_level(logging.INFO, logger="fastsft.patch"):
        fastsft.patch_model(model, attention=False, lora=False)
    text = caplog.text
    assert "rms_norm: Gemma2RMSNorm" in text and "rope: Gemma2Attention" in text
    assert "fastsft.patch_model" not in text  # the logger's name says where; no doubled prefix
    assert "not SiLU" in text and "Gemma2MLP" in text  # GeGLU MLPs stay on PyTorch, said so
    assert "softcap 30.0" in text
    assert "swiglu" not in patch_state(model)


def test_failing_component_is_logged_and_others_still_apply(caplog, monkeypatch):
    from fastsft.patch import layers

    real_apply = layers.apply

    def broken(model, *, which):
        if which == "rope":
            raise RuntimeError("boom")
        return real_apply(model, which=which)

    monkeypatch.setattr(layers, "apply", broken)
    model = tiny()
    with caplog.at_level(logging.ERROR, logger="fastsft.patch"):
        fastsft.patch_model(model, attention=False, lora=False)
    assert "'rope' failed" in caplog.text and "boom" in caplog.text
    assert "rope" not in patch_state(model) and {"rms_norm", "swiglu", "cross_entropy"} <= set(patch_state(model))


def test_rejects_non_modules_and_compiled_models():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        fastsft.patch_model("not a model")
    compiled = torch.compile(tiny(), backend="eager")
    with pytest.raises(ValueError, match="before torch.compile"):
        fastsft.patch_model(compiled)


# ---------------------------------------------------------------- loss semantics
def test_loss_follows_hf_conventions():
    ref = tiny()
    model = fastsft.patch_model(copy.deepcopy(ref), attention=False, lora=False)
    ids, labels = batch(1)
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=labels).loss
        # return_dict=False: a tuple whose first element is the loss
        out = model(input_ids=ids, labels=labels, return_dict=False)
        assert isinstance(out, tuple)
        assert_close(out[0], expected, 1e-5, "tuple loss")
        # explicit shift_labels (already shifted) == labels
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        assert_close(model(input_ids=ids, labels=labels, shift_labels=shifted).loss, expected, 1e-5, "shift_labels")
        # num_items_in_batch is the divisor of the summed loss
        n = torch.tensor(100)
        assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
                     ref(input_ids=ids, labels=labels, num_items_in_batch=n).loss, 1e-5, "num_items_in_batch")
        # all labels ignored: 0, not NaN
        assert model(input_ids=ids, labels=torch.full_like(labels, -100)).loss.item() == 0.0
        # without labels: logits, and logits_to_keep as usual
        assert_close(model(input_ids=ids, logits_to_keep=1).logits, ref(input_ids=ids, logits_to_keep=1).logits,
                     1e-5, "logits_to_keep")


def test_gradient_checkpointing_recomputes_through_the_patch():
    ref = tiny()
    model = fastsft.patch_model(copy.deepcopy(ref), attention=False, lora=False)
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids, labels = batch(2)
    assert_same(loss_and_grads(model, ids, labels), loss_and_grads(ref, ids, labels), 1e-5, "checkpointed")


# ---------------------------------------------------------------- other model kinds
def test_peft_model():
    import peft

    base = tiny()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                          lora_dropout=0.0, init_lora_weights=False)
    ref = peft.get_peft_model(base, cfg)
    model = copy.deepcopy(ref)
    assert fastsft.patch_model(model, attention=False) is model
    assert {"rms_norm", "rope", "swiglu", "cross_entropy"} <= set(patch_state(model))
    ids, labels = batch(3)
    assert_same(loss_and_grads(model, ids, labels), loss_and_grads(ref, ids, labels), 1e-5, "peft")
    fastsft.unpatch_model(model)
    assert instance_forwards(model.get_base_model()) == []


def test_lora_on_lm_head_falls_back_to_the_model_loss(caplog):
    import peft

    ref = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                      init_lora_weights=False))
    model = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger="fastsft"):
        fastsft.patch_model(model, attention=False, lora=False)
        ids, labels = batch(4)
        result = loss_and_grads(model, ids, labels)
    assert "not a plain Linear" in caplog.text
    assert_same(result, loss_and_grads(ref, ids, labels), 1e-5, "lora lm_head")


def test_4bit_bitsandbytes_model(tmp_path):
    import transformers

    tiny(seed=1).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quant, dtype=torch.float32, device_map="cpu", attn_implementation="eager")

    ref, model = load(), load()
    fastsft.patch_model(model, attention=False, lora=False)
    assert {"rms_norm", "rope", "swiglu", "cross_entropy"} <= set(patch_state(model))
    ids, labels = batch(5)
    # gradients reach the trainable fp32 weights (norms, embeddings, lm_head) through the NF4 layers
    assert_same(loss_and_grads(model, ids, labels), loss_and_grads(ref, ids, labels), 1e-5, "nf4")


def test_unknown_architecture_patches_the_loss_only(caplog):
    ref = tiny("starcoder2")  # LayerNorm + GELU MLP: nothing fastsft has a kernel for, but a standard loss
    model = copy.deepcopy(ref)
    with caplog.at_level(logging.INFO, logger="fastsft.patch"):
        fastsft.patch_model(model, attention=False, lora=False)
    assert set(patch_state(model)) == {"cross_entropy"}
    assert "rms_norm: no supported module in Starcoder2ForCausalLM" in caplog.text
    ids, labels = batch(6)
    assert_same(loss_and_grads(model, ids, labels), loss_and_grads(ref, ids, labels), 1e-5, "starcoder2")


def test_scaled_logits_architecture_keeps_its_own_loss(caplog):
    model = tiny("granite", logits_scaling=4.0)
    with caplog.at_level(logging.WARNING, logger="fastsft.patch"):
        fastsft.patch_model(model, attention=False, lora=False)
    assert "cross_entropy" not in patch_state(model)
    assert "logits_scaling" in caplog.text


# ---------------------------------------------------------------- other trainers, torch.compile
def _trainer_losses(model, tmp_path, name):
    import transformers

    data = []
    for i in range(8):
        ids, labels = batch(10 + i, size=1, seq=10)
        labels[0, : 1 + i] = -100  # uneven trained-token counts across the accumulation window
        data.append({"input_ids": ids[0], "labels": labels[0], "attention_mask": torch.ones_like(ids[0])})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_transformers_trainer(tmp_path):
    ref = tiny()
    model = fastsft.patch_model(copy.deepcopy(ref), lora=False)
    losses = _trainer_losses(model, tmp_path, "fast")
    expected = _trainer_losses(ref, tmp_path, "ref")
    assert len(losses) == 2
    assert_close(losses, expected, 1e-4, "Trainer losses")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, 1e-4, f"Trainer-updated {name}")


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2")


def _trl_losses(model, tmp_path, name):
    import datasets
    import trl

    rows = [{"input_ids": batch(20 + i, size=1, seq=6 + i)[0][0].tolist()} for i in range(4)]
    args = trl.SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=2,
                         learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                         seed=0, data_seed=0, disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=_word_tokenizer())
    trainer.train()
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_trl_sft_trainer(tmp_path):
    pytest.importorskip("trl")
    ref = tiny()
    model = fastsft.patch_model(copy.deepcopy(ref), lora=False)
    losses = _trl_losses(model, tmp_path, "fast")
    assert len(losses) == 2
    assert_close(losses, _trl_losses(ref, tmp_path, "ref"), 1e-4, "SFTTrainer losses")


def test_torch_compile_of_a_patched_model_works():
    ref = tiny()
    model = fastsft.patch_model(copy.deepcopy(ref), attention=False, lora=False)
    compiled = torch.compile(model, backend="eager")  # kernels run eagerly between compiled graphs
    ids, labels = batch(7)
    loss = compiled(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert_same((loss.detach(), grads), loss_and_grads(ref, ids, labels), 1e-5, "compiled")


def test_hf_trainer_example_runs(tmp_path):
    """examples/hf_trainer.py (the README's one-call use) keeps working."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hf_trainer.py")
    spec = importlib.util.spec_from_file_location("fastsft_example_hf_trainer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "1", "--output-dir", str(tmp_path)])


def test_return_dict_false_keeps_the_stock_tuple_layout():
    """(loss, logits, cache, ...) as the stock forward returns it; the fused loss has no logits: None there."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    stock = transformers.LlamaForCausalLM(config)
    patched = fastsft.patch_model(copy.deepcopy(stock))
    ids = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(1))
    want = stock(input_ids=ids, labels=ids, return_dict=False, use_cache=True)
    got = patched(input_ids=ids, labels=ids, return_dict=False, use_cache=True)
    assert len(got) == len(want) and got[1] is None
    assert torch.allclose(got[0], want[0], rtol=1e-5)
    assert type(got[2]) is type(want[2])
