"""Learning-rate schedules and optimizer construction."""
import math
import warnings

import pytest
import torch

from fastsft.config import load_config
from fastsft.train.optim import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_shapes(kind):
    factors = [lr_factor(s, kind=kind, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup reaches the peak on its last step
    if kind == "constant":
        assert all(f == 1.0 for f in factors[4:])
        return
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # never rises after warmup
    assert factors[4] == 1.0
    end = lr_factor(20, kind=kind, warmup=4, total=20, min_ratio=0.1)
    assert math.isclose(end, 0.1)  # decays to learning_rate * min_lr_ratio
    if kind == "cosine":
        assert math.isclose(lr_factor(12, kind=kind, warmup=4, total=20, min_ratio=0.0), 0.5)


def _config(**values):
    return load_config(None, model="tiny-llama", dataset="unused.jsonl", **values)


def test_scheduler_drives_optimizer_and_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    config = _config(learning_rate=0.5, weight_decay=0.1, warmup_steps=2, lr_scheduler="linear")
    optimizer = build_optimizer(model, config)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}  # matrices only; biases and norm weights are not decayed
    scheduler = build_scheduler(optimizer, config, total_steps=10)
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.5])


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_bitsandbytes_optimizers_step(name):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 4096)
    optimizer = build_optimizer(model, _config(optimizer=name, learning_rate=1e-2))
    before = model.weight.detach().clone()
    model(torch.randn(3, 64)).square().mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU" is expected here
        optimizer.step()
    assert not torch.equal(before, model.weight) and torch.isfinite(model.weight).all()
