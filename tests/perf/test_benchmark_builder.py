"""Benchmark = trainer: the end-to-end benchmark's fastsft model is the one fastsft.train.model.load_model
builds (the function `fastsft train` calls), from a TrainConfig; the hf baseline follows the transformers +
peft QLoRA recipe and never goes through the trainer's builder.

The trainer's builder and peft's prepare_model_for_kbit_training are replaced by spies that call the real
functions, so the test proves which function built the model the benchmark then times (the benchmark's
worker setup, _setup, runs in this process on the CPU).
"""
import importlib
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmarks(name):
    """Import benchmarks.<name>; the root is on sys.path only while the package itself is found (its
    __init__ drops it again, so kernels/ never imports as a top-level `kernels`)."""
    if "benchmarks" not in sys.modules:
        sys.path.insert(0, REPO)
        try:
            importlib.import_module("benchmarks")
        finally:
            sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO]
    return importlib.import_module(f"benchmarks.{name}")


class Spy:
    def __init__(self, fn):
        self.fn, self.calls, self.returned = fn, [], []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        out = self.fn(*args, **kwargs)
        self.returned.append(out)
        return out


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    models = _benchmarks("e2e_models")
    folder = str(tmp_path_factory.mktemp("bench-model") / "tiny")
    return models.save_random_model(models.get_arch("tiny-llama"), folder, seed=0, device="cpu", dtype=torch.float32)


def _job(provider, model_dir, mode="qlora"):
    return dict(task="throughput", provider=provider, model="tiny-llama", mode=mode, seq=64, steps=1, warmup=0,
                seed=0, doc_median=16, lora_rank=8, lora_alpha=16, model_dir=model_dir, device="cpu",
                precision="fp32", grad_ckpt=True, offload=False, max_context_cap=128)


def test_fastsft_model_comes_from_the_trainers_builder(saved_model, monkeypatch):
    import fastsft.train.model as trainer_model
    from fastsft.config import TrainConfig

    e2e = _benchmarks("e2e")
    spy = Spy(trainer_model.load_model)
    monkeypatch.setattr(trainer_model, "load_model", spy)
    model, optimizer, info = e2e._setup(_job("fastsft", saved_model))

    assert len(spy.calls) == 1, "the fastsft provider must build its model with fastsft.train.model.load_model"
    assert model is spy.returned[0], "the benchmark must time the very model the trainer's builder returned"
    (path, config, device, precision), kwargs = spy.calls[0]
    assert not kwargs and path == saved_model
    assert isinstance(config, TrainConfig)
    assert (config.model, config.mode, config.lora_r, config.lora_alpha) == (saved_model, "qlora", 8, 16.0)
    assert list(config.lora_target_modules) == list(_benchmarks("e2e_models").LORA_TARGETS)
    assert config.gradient_checkpointing is True and config.patch_kernels is True
    assert device == torch.device("cpu") and precision == trainer_model.resolve_precision(config, device)
    # what load_model did is what the benchmark reports: patched, 4-bit base, trainable adapters only
    assert info["fastsft_patched"], "the trainer's builder patched nothing"
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p for g in optimizer.param_groups for p in g["params"]} == \
        {p for p in model.parameters() if p.requires_grad}
    assert info["versions"]["transformers"] and info["versions"]["peft"]


def test_hf_baseline_is_the_peft_qlora_recipe_not_the_trainer(saved_model, monkeypatch):
    import peft

    import fastsft.train.model as trainer_model

    e2e = _benchmarks("e2e")
    builder = Spy(trainer_model.load_model)
    prepare = Spy(peft.prepare_model_for_kbit_training)
    monkeypatch.setattr(trainer_model, "load_model", builder)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    model, _, info = e2e._setup(_job("hf", saved_model))

    assert builder.calls == [], "the hf baseline must not use fastsft's builder"
    assert len(prepare.calls) == 1 and prepare.calls[0][1]["use_gradient_checkpointing"] is True
    assert info["attn_implementation"] == "sdpa" and info["batch_format"] == "padded"
    assert "fastsft_patched" not in info
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert isinstance(model, peft.PeftModel)
