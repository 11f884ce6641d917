"""DoRA, QDoRA and LoRA dropout stay on fastsft's ops: call counts and host syncs.

A DoRA, a QDoRA (NF4 base) and a lora_dropout 0.05 LoRA model, patched by
fastsft.patch_model, route every targeted layer through lora_linear_ex /
lora_linear_ex_fused (q/k/v and gate/up one fused call each, o_proj and down_proj
single calls; no layer on peft's path, no fallback logged), and one trainer step of
each (the use_dora / lora_dropout config keys; the Triton kernels through the
interpreter, so their launchers' host code runs as on a GPU) makes no host sync in
forward and backward.
"""
import io
import logging

import pytest
import torch

import fastsft
from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl
from fastsft.train import Trainer
from fastsft.train import loop as loop_module
from fastsft.train.batch import batch_to_device

VOCAB = 128
LAYERS = 2
VARIANTS = {"dora": dict(use_dora=True), "qdora": dict(use_dora=True), "dropout": dict(lora_dropout=0.05)}


def _tiny_llama(four_bit):
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if four_bit:
        bnb = pytest.importorskip("bitsandbytes")
        for module in list(model.model.layers.modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.float32, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 blocksize=64, compress_statistics=True)
                    setattr(module, name, q.to("cpu"))
        model.is_loaded_in_4bit = True
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_targeted_layer_runs_fastsft_ops(variant, kernel_recorder, make_packed_batch, caplog, monkeypatch):
    import peft

    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")  # counts only: the reference math is enough here
    model = peft.get_peft_model(_tiny_llama(variant == "qdora"), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False,
        **{"lora_dropout": 0.0, **VARIANTS[variant]}))
    with caplog.at_level(logging.INFO, logger="fastsft"):
        fastsft.patch_model(model)
        model.train()
        batch = make_packed_batch()
        loss = model(**batch_to_device(batch, torch.device("cpu"), vocab_size=VOCAB),
                     num_items_in_batch=batch["num_trained_tokens"]).loss
        loss.backward()
    assert torch.isfinite(loss)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_layers) == 7 * LAYERS
    counts = kernel_recorder.counts()
    expected = {"lora_linear_ex": 2 * LAYERS, "lora_linear_ex_fused": 2 * LAYERS, "lora_linear": 0,
                "lora_linear_fused": 0}
    assert {op: counts.get(op, 0) for op in expected} == expected, f"{variant}: kernel calls {counts}"
    fell_back = [r.getMessage() for r in caplog.records if "peft path" in r.getMessage()
                 or "not fused" in r.getMessage() or "kept on peft" in r.getMessage()]
    assert not fell_back, fell_back
    for layer in lora_layers:  # every trainable LoRA tensor got a gradient through the ops
        assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
        if variant != "dropout":
            assert layer.lora_magnitude_vector["default"].weight.grad is not None


def _trainer(tmp_path, mode, **extra):
    train, _ = make_records(12, 1, seed=1)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    config = load_config(None, model="tiny-llama", tokenizer_vocab_size=290, dataset=str(tmp_path / "train.jsonl"),
                         model_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "num_key_value_heads": 1},
                         max_seq_length=48, batch_tokens=64, max_steps=2, output_dir=str(tmp_path / "out"),
                         progress_bar="off", self_check=False, mode=mode, precision="bf16", device="cpu", gradient_checkpointing=True,
                         lora_r=4, lora_alpha=8, packing=True, **extra)
    trainer = Trainer(config, stream=io.StringIO())
    trainer.setup()
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("mode,extra", [("lora", dict(use_dora=True)), ("qlora", dict(use_dora=True)),
                                        ("lora", dict(lora_dropout=0.05)),
                                        ("qlora", dict(use_dora=True, lora_dropout=0.05))],
                         ids=["dora", "qdora", "dropout", "qdora-dropout"])
def test_no_host_sync_in_forward_and_backward(tmp_path, sync_counter, monkeypatch, kernel_recorder, mode, extra):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    trainer = _trainer(tmp_path, mode, **extra)
    magnitudes = [n for n, _ in trainer.model.named_parameters() if "lora_magnitude_vector" in n]
    assert bool(magnitudes) == bool(extra.get("use_dora")), "use_dora must reach peft's LoraConfig"
    fwd_bwd = sync_counter()
    real_to_device, real_accumulate = loop_module.batch_to_device, trainer.accumulate

    def to_device(*args, **kwargs):
        with fwd_bwd.paused():  # host tensors, before the device copy
            return real_to_device(*args, **kwargs)

    def accumulate(*args, **kwargs):
        with fwd_bwd:
            return real_accumulate(*args, **kwargs)

    monkeypatch.setattr(loop_module, "batch_to_device", to_device)
    monkeypatch.setattr(trainer, "accumulate", accumulate)
    record = trainer.train_step()
    assert record is not None and torch.isfinite(torch.tensor(record["loss"]))
    assert fwd_bwd.triton_launches > 0, "the kernels did not take the Triton path"
    counts = kernel_recorder.counts()
    assert counts.get("lora_linear_ex_fused", 0) > 0 and counts.get("lora_linear_ex", 0) > 0, counts
    assert counts.get("lora_linear", 0) == counts.get("lora_linear_fused", 0) == 0, counts
    assert not fwd_bwd.events, f"{mode} {extra}: host syncs in forward + backward:\n{fwd_bwd.summary()}"


def test_saved_for_backward_x_once_bool_masks_and_one_z_per_dora_projection():
    """What the fused path keeps for backward (peft keeps a dropped copy of x per layer and several
    full-width DoRA intermediates): x once for the whole group, one bool mask per dropout layer,
    one (rows, out) tensor per DoRA projection, nothing else of full width."""
    import fastsft_kernels as fk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 64, generator=g).requires_grad_()
    outs = (48, 16, 16)
    ws = [torch.randn(o, 64, generator=g) / 8 for o in outs]
    a_s = [(torch.randn(4, 64, generator=g) / 8).requires_grad_() for _ in outs]
    b_s = [torch.randn(o, 4, generator=g).requires_grad_() for o in outs]
    mags = [(w.norm(dim=1) * 1.1).requires_grad_() for w in ws]
    for magnitudes in ([None] * 3, mags):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ys = fk.lora_linear_ex_fused(x, ws, a_s, b_s, [2.0] * 3, magnitudes=magnitudes, dropout_ps=[0.05] * 3)
        rows = [t for t in saved if t.dim() == 2 and t.shape[0] == x.shape[0] and t.shape[1] >= 16]
        x_like = [t for t in rows if t.shape == x.shape and t.is_floating_point()]
        assert len(x_like) == 1 and x_like[0].data_ptr() == x.data_ptr(), [t.shape for t in x_like]
        assert sum(t.dtype == torch.bool and t.shape == x.shape for t in rows) == 3
        wide = [tuple(t.shape) for t in rows if t.shape != x.shape]
        assert sorted(wide) == (sorted((x.shape[0], o) for o in outs) if magnitudes[0] is not None else []), wide
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])


def _full_width_ops(fn, numel_out, w_numel, monkeypatch):
    """aten ops touching a (rows, out) tensor, and ops whose output has W's size, in fn's forward +
    backward (outside Triton launches; allocations and the suite's NaN poisoning aside)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton is a test dependency
        interpreter = None
    state = {"in_launch": 0}
    if interpreter is not None:
        original = interpreter.GridExecutor.__call__

        def call(self, *args, **kwargs):
            state["in_launch"] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                state["in_launch"] -= 1

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    wide, w_sized = [], []
    skip = {"empty", "empty_strided", "zeros", "fill_", "detach", "view", "_unsafe_view", "t", "transpose", "slice",
            "as_strided", "reshape", "alias", "expand"}

    from fastsft_kernels import lora, lora_dora

    # the LoRA operators' implementations run under the mode, so that the products inside them are seen
    # (a dispatch mode otherwise sees a torch.library operator as one op)
    impls = {"lora_linear": lora._lora_impl, "lora_linear_backward": lora._lora_backward_impl,
             "lora_linear_ex": lora_dora._ex_impl, "lora_linear_ex_backward": lora_dora._ex_backward_impl}

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if func.namespace == "fastsft" and name in impls:
                with self:
                    return impls[name](*args, **(kwargs or {}))
            out = func(*args, **(kwargs or {}))
            if state["in_launch"] or name in skip:
                return out
            tensors = [t for t in list(args) + list((kwargs or {}).values()) + [out] if torch.is_tensor(t)]
            if any(t.numel() == numel_out for t in tensors):
                wide.append(name)
            if torch.is_tensor(out) and out.numel() == w_numel:
                w_sized.append(name)
            return out

    with Mode():
        fn()
    return sorted(wide), w_sized


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_dora_adds_one_full_width_pass_and_never_forms_w_plus_ba(quant, monkeypatch):
    """Against the same adapters as plain LoRA, a DoRA forward + backward (no bias, no dropout: the
    common case) adds exactly one (rows, out) product and its column sum (the magnitude gradient,
    read from y); c = m / ||.|| rides on W (one row scaling of W per direction: of the workspace in
    place for a 4-bit W) and on B. No fp32 copy of a (rows, out) tensor, and W + s B A never exists."""
    import fastsft_kernels as fk

    rows, k, n = 40, 96, 80
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    qs = None
    if quant:
        import bitsandbytes.functional as bnbf

        w, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant, compress_statistics=True)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).requires_grad_()
    a = (torch.randn(8, k, generator=g) / 10).requires_grad_()
    b = torch.randn(n, 8, generator=g).requires_grad_()
    m = (torch.rand(n, generator=g) + 1).requires_grad_()
    gy = torch.randn(rows, n, generator=g).to(torch.bfloat16)

    def step(magnitude):
        def run():
            if magnitude is None:
                y = fk.lora_linear(x, w, a, b, 2.0, quant_state=qs, dequant_rows=0)
            else:
                y = fk.lora_linear_ex(x, w, a, b, 2.0, quant_state=qs, magnitude=magnitude, dequant_rows=0)
            y.backward(gy)
        return run

    w_numel = n * k
    lora_ops, lora_w = _full_width_ops(step(None), rows * n, w_numel, monkeypatch)
    dora_ops, dora_w = _full_width_ops(step(m), rows * n, w_numel, monkeypatch)
    # on the dequantize + cuBLAS path: the base + LoRA addmm_ (forward) and dX's two mm (backward)
    assert lora_ops == ["addmm_", "mm", "mm"], lora_ops
    extra = list(dora_ops)
    for op in lora_ops:
        assert op in extra, (lora_ops, dora_ops)
        extra.remove(op)
    assert sorted(extra) == ["mul", "sum"], (lora_ops, dora_ops)
    extra_w = list(dora_w)
    for op in lora_w:
        extra_w.remove(op)
    assert extra_w == (["mul_", "mul_"] if quant else ["mul", "mul"]), (lora_w, dora_w)


def test_dora_without_dropout_or_bias_keeps_only_its_outputs():
    """DoRA's common case (no dropout, no bias) keeps no tensor of its own of full width: the
    (rows, out) tensors saved for backward are the outputs, which the next op keeps anyway."""
    import fastsft_kernels as fk

    g = torch.Generator().manual_seed(1)
    x = torch.randn(29, 64, generator=g).requires_grad_()
    outs = (48, 16, 16)
    ws = [torch.randn(o, 64, generator=g) / 8 for o in outs]
    a_s = [(torch.randn(4, 64, generator=g) / 8).requires_grad_() for _ in outs]
    b_s = [torch.randn(o, 4, generator=g).requires_grad_() for o in outs]
    mags = [(w.norm(dim=1) * 1.1).requires_grad_() for w in ws]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = fk.lora_linear_ex_fused(x, ws, a_s, b_s, [2.0] * 3, magnitudes=mags)
    wide = [t for t in saved if t.dim() == 2 and t.shape[0] == x.shape[0] and t.shape[1] >= 16 and t.shape != x.shape]
    assert sorted(t.data_ptr() for t in wide) == sorted(y.data_ptr() for y in ys)
    torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in mags)
