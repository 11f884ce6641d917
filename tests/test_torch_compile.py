"""torch.compile sees through the patch: a patched tiny Llama / Qwen3 / Gemma-2 with LoRA or
QLoRA (bitsandbytes NF4) runs a training step on a packed batch under
``torch.compile(fullgraph=True)`` -- a graph break would raise -- and
``torch._dynamo.explain`` counts 0 breaks. The compiled step's loss and LoRA gradients match
the eager step's within the kernels' own parity tolerance.

Both CPU paths: the PyTorch reference (FASTSFT_TRITON_ON_CPU=0) and the Triton kernels through
the interpreter (FASTSFT_TRITON_ON_CPU=1; conftest sets TRITON_INTERPRET=1). CPU backends only:
"eager" (dynamo's graph run as is) and "aot_eager" (AOT autograd: the joint forward/backward
graph, the operators' fakes and registered backwards); the GPU suite times "inductor".
"""
import copy

import pytest
import torch

import fastsft
from fastsft_kernels.testing import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 96
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_EXTRA = {"qwen3": dict(head_dim=16),
          "gemma2": dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16)}
# one packed row of three documents (positions restart), a prompt token not trained in each
LAYERS = {}  # one decoder layer each (trace time); Gemma-2's first layer is its sliding-window one
POSITIONS = [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]
DOC_STARTS = [0, 4, 9]
TOL = 1e-5  # the fp32 parity bound of the kernels' own tests


def tiny_model(family: str, quant: str, **lora_kw):
    config = transformers.AutoConfig.for_model(
        family, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS.get(family, 1), num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **_EXTRA.get(family, {}))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if quant == "qlora":
        model = _to_nf4(model)
    torch.manual_seed(1)
    lora = peft.LoraConfig(**{**dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                     init_lora_weights=False), **lora_kw})
    return fastsft.patch_model(peft.get_peft_model(model, lora))


def _to_nf4(model):
    """Every decoder Linear -> a bitsandbytes NF4 Linear4bit (double quantization) with the same weight."""
    bnb = pytest.importorskip("bitsandbytes")
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=64, compress_statistics=True)
                setattr(module, name, q.to("cpu"))
    model.is_loaded_in_4bit = True  # peft wraps Linear4bit bases with its bnb LoRA layer
    return model


def packed_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (1, len(POSITIONS)), generator=g)
    labels = ids.clone()
    labels[0, DOC_STARTS] = -100
    return dict(input_ids=ids, position_ids=torch.tensor([POSITIONS]), labels=labels)


def step(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_step(compiled, eager, family, what, per_target=2):
    """per_target: trained tensors per adapted projection (A, B; DoRA adds the magnitude)."""
    assert_close(compiled[0], eager[0], TOL, f"{what} loss")
    assert compiled[1].keys() == eager[1].keys() and len(eager[1]) == per_target * len(TARGETS) * LAYERS.get(family, 1)
    for name, grad in eager[1].items():
        assert_close(compiled[1][name], grad, TOL, f"{what} grad {name}")


def _use_path(monkeypatch, kernel_path):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "1" if kernel_path == "triton" else "0")
    torch._dynamo.reset()


# Every family x LoRA / QLoRA on the reference path; the Triton-interpreter path for two of them (the
# operators are opaque to dynamo: the path changes what runs inside them, not the graph). The
# explain() count is taken once per family (fullgraph=True already raises on any break).
CASES = [("llama", "lora", "reference", "eager", True), ("llama", "qlora", "reference", "aot_eager", False),
         ("qwen3", "lora", "reference", "aot_eager", True), ("qwen3", "qlora", "reference", "aot_eager", False),
         ("gemma2", "lora", "reference", "eager", False), ("gemma2", "qlora", "reference", "aot_eager", True),
         ("llama", "qlora", "triton", "aot_eager", False), ("gemma2", "lora", "triton", "aot_eager", False)]


@pytest.mark.parametrize("family,quant,kernel_path,backend,explain", CASES)
def test_compiled_training_step_has_no_graph_break_and_matches_eager(family, quant, kernel_path, backend, explain,
                                                                     monkeypatch):
    _use_path(monkeypatch, kernel_path)
    model = tiny_model(family, quant)
    batch = packed_batch()
    eager = step(model, model, batch)
    if explain:
        explained = torch._dynamo.explain(model)(**batch)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
    compiled_model = torch.compile(model, backend=backend, fullgraph=True)
    compiled = step(model, compiled_model, batch)
    assert_same_step(compiled, eager, family, f"{family} {quant} {kernel_path} {backend}")
    if explain:  # no state of the patch (caches, counters) is guarded: the next step does not recompile
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert_same_step(step(model, compiled_model, batch), eager, family, "second compiled step")
    torch._dynamo.reset()


# DoRA and LoRA dropout run through fastsft::lora_linear_ex (single and fused projections): one operator node
# each as well. The dropout masks are drawn outside the operator from the torch RNG, so seeding it before
# each step gives the eager and the compiled step the same masks.
EX_CASES = [("dropout", dict(lora_dropout=0.1), "reference"), ("dropout", dict(lora_dropout=0.1), "triton"),
            ("dora", dict(use_dora=True), "triton")]


@pytest.mark.parametrize("name,lora_kw,kernel_path", EX_CASES, ids=[f"{c[0]}-{c[2]}" for c in EX_CASES])
def test_compiled_dora_and_dropout_step_has_no_graph_break_and_matches_eager(name, lora_kw, kernel_path,
                                                                             monkeypatch):
    _use_path(monkeypatch, kernel_path)
    model = tiny_model("llama", "lora", **lora_kw)
    assert model.training
    batch = packed_batch()

    def seeded_step(fn, seed=5):
        torch.manual_seed(seed)
        return step(model, fn, batch)

    eager = seeded_step(model)
    if name == "dropout":  # the masks are live: another seed, another loss
        assert abs(seeded_step(model, seed=6)[0] - eager[0]) > 1e-4
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    code = explained.graphs[0].code  # the reference path too: one opaque operator, not its formulas
    assert "fastsft.lora_linear_ex" in code and ("bernoulli" in code) == (name == "dropout"), code[:2000]
    compiled = seeded_step(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert_same_step(compiled, eager, "llama", f"{name} {kernel_path}", per_target=3 if name == "dora" else 2)
    torch._dynamo.reset()


def test_compiled_padded_batch_matches_eager(reference_ops):
    """A 2-D padding mask (right and left padding) compiles without a break too (no unpad of data size)."""
    torch._dynamo.reset()
    model = tiny_model("llama", "lora")
    ids = packed_batch()["input_ids"][:, :10].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    eager = step(model, model, batch)
    compiled = step(model, torch.compile(model, backend="aot_eager", fullgraph=True), batch)
    assert_same_step(compiled, eager, "llama", "padded")
    torch._dynamo.reset()


# ------------------------------------------------------------------ fastsft train --torch_compile
def _cli_config(tmp_path, extra=""):
    from fastsft.demo_data import make_records, write_jsonl

    train, _ = make_records(24, 1, seed=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    tiny = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: tiny-llama\nmodel_config: {tiny}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"eval_steps: 0\nseed: 3\noutput_dir: {tmp_path / 'out'}\n{extra}")
    return str(path)


def _train_losses(config, capsys):
    import json
    from pathlib import Path

    from fastsft.cli import main

    assert main(["train", config]) == 0
    err = capsys.readouterr().err
    out = Path(config).parent / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"], err


def test_cli_trains_with_torch_compile_like_without(tmp_path, capsys, reference_ops):
    """2 steps, packed batches, backend aot_eager, gradient checkpointing: no graph break, the uncompiled
    run's losses, said in the log."""
    plain, _ = _train_losses(_cli_config(tmp_path / "plain"), capsys)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # with non-reentrant gradient checkpointing (same math): each checkpointed layer stays in the graph
    compiled, err = _train_losses(_cli_config(tmp_path / "compiled", "torch_compile: true\n"
                                              "torch_compile_backend: aot_eager\ngradient_checkpointing: true\n"),
                                  capsys)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    assert not breaks, breaks
    assert "torch_compile: model compiled with backend aot_eager" in err
    # cpu_ops: fastest (the default) re-patches from the first forward: dropped, and said
    assert "torch_compile: the step-0 self-check / cpu_ops choice do not run in a compiled model" in err
    assert len(compiled) == 2
    for c, p in zip(compiled, plain):
        assert abs(c - p) <= 1e-4 * abs(p), (compiled, plain)


def test_cli_rejects_unknown_backend(tmp_path, capsys, reference_ops):
    from fastsft.cli import main

    config = _cli_config(tmp_path, "torch_compile: true\ntorch_compile_backend: turbo\n")
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "torch_compile_backend" in err and "turbo" in err and "aot_eager" in err and "Traceback" not in err


def test_cpu_inductor_needs_a_cpp_compiler(monkeypatch):
    from fastsft.errors import ConfigError
    from fastsft.train import compile as tc

    said = []
    cpu = torch.device("cpu")
    monkeypatch.setattr(tc, "cpp_compiler", lambda: None)
    assert tc.choose_backend("auto", cpu, said.append) == "aot_eager"
    assert said == ["torch_compile: no C++ compiler for inductor on CPU; backend aot_eager"]
    with pytest.raises(ConfigError, match="torch_compile_backend.*C\\+\\+ compiler"):
        tc.choose_backend("inductor", cpu, said.append)
    monkeypatch.setattr(tc, "cpp_compiler", lambda: "/usr/bin/c++")
    assert tc.choose_backend("auto", cpu, said.append) == "inductor"
    assert tc.choose_backend("auto", torch.device("meta"), said.append) == "inductor"
    assert tc.choose_backend("aot_eager", cpu, said.append) == "aot_eager"
