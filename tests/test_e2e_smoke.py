"""The pieces of the end-to-end benchmark that decide what the GPU numbers mean: the max-context search,
the FLOP count, the offloaded activation checkpoint, the saved random-weight checkpoint and the Unsloth
provider's network guard. The --smoke runs themselves (tiny Llama on the CPU, every provider, the table
renderer) run inside the GPU suite's dry run (tests/test_gpu_suite.py), once.

Modules without relative imports are loaded from their files, so the repository root stays off sys.path.
"""
import importlib.util
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_e2e_test_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the max-context search
class FakeMemory:
    """A probe that fits up to `limit` tokens, with a clock that advances `cost(length)` per probe."""

    def __init__(self, limit, error_at=None, cost=lambda n: 1.0):
        self.limit, self.error_at, self.cost, self.now, self.calls = limit, error_at, cost, 0.0, []

    def clock(self):
        return self.now

    def __call__(self, length):
        self.calls.append(length)
        self.now += self.cost(length)
        if self.error_at is not None and length >= self.error_at:
            raise search.ProbeError("illegal memory access")
        return length <= self.limit


search = _load("e2e_search")


@pytest.mark.parametrize("limit", [4096, 37_000, 100_351, 5000])
def test_search_brackets_the_limit(limit):
    fake = FakeMemory(limit)
    out = search.search_max_length(fake, start=4096, cap=262_144, granularity=1024, rel_tol=0.0,
                                   budget_s=1e9, clock=fake.clock)
    assert out["stopped_by"] == "converged"
    assert out["max_ok"] <= limit < out["min_failed"]
    assert out["min_failed"] - out["max_ok"] <= 1024 and out["max_ok"] % 1024 == 0
    assert [p["length"] for p in out["probes"]] == fake.calls
    assert len(fake.calls) <= 12


def test_search_relative_tolerance_and_nothing_fits():
    fake = FakeMemory(70_000)
    out = search.search_max_length(fake, start=4096, cap=262_144, granularity=1024, rel_tol=1 / 16,
                                   budget_s=1e9, clock=fake.clock)
    assert out["max_ok"] <= 70_000 < out["min_failed"] <= out["max_ok"] * (1 + 1 / 16) + 1024
    fake = FakeMemory(100)
    out = search.search_max_length(fake, start=4096, cap=8192, granularity=1024, budget_s=1e9, clock=fake.clock)
    assert out["max_ok"] == 0 and out["min_failed"] == 1024 and out["stopped_by"] == "converged"


def test_search_cap_budget_and_errors():
    fake = FakeMemory(10**9)
    out = search.search_max_length(fake, start=1000, cap=5000, granularity=100, budget_s=1e9, clock=fake.clock)
    assert out["stopped_by"] == "cap" and out["max_ok"] == 5000 and out["min_failed"] is None
    assert fake.calls == [1000, 2000, 4000, 5000]
    # each probe costs its length in seconds: the budget stops the search, the bracket stays honest
    fake = FakeMemory(50_000, cost=lambda n: n / 1000)
    out = search.search_max_length(fake, start=4096, cap=262_144, granularity=1024, budget_s=60, clock=fake.clock)
    assert out["stopped_by"] == "budget" and out["max_ok"] <= 50_000
    assert out["min_failed"] is None or out["min_failed"] > 50_000
    fake = FakeMemory(10**9, error_at=16_384)
    out = search.search_max_length(fake, start=4096, cap=262_144, granularity=1024, budget_s=1e9, clock=fake.clock)
    assert out["stopped_by"] == "error" and "illegal memory access" in out["error"]
    assert out["max_ok"] == 8192 and out["min_failed"] == 16_384
    with pytest.raises(ValueError, match="cap"):
        search.search_max_length(fake, start=4096, cap=1024, granularity=1024)


# ---------------------------------------------------------------- FLOPs and checkpoint offload
models = _load("e2e_models")


def test_attended_pairs_matches_a_mask():
    for length in (1, 7, 64, 130):
        for window in (None, 1, 16, 64, 200):
            i = torch.arange(length).unsqueeze(1)
            j = torch.arange(length).unsqueeze(0)
            mask = j <= i
            if window is not None:
                mask &= (i - j) < window
            assert models.attended_pairs(length, window) == int(mask.sum()), (length, window)


def test_flops_of_llama_8b():
    shape = models.arch_shape("llama-3.1-8b")
    # 32 layers x (q 4096^2 + k,v 2 x 4096x1024 + o 4096^2 + 3 x 4096x14336) + lm head 128256 x 4096
    n = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    assert shape.matmul_params() == n
    lora = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert shape.lora_params(16) == lora
    docs = [1000, 3000]
    attn = 12 * 4096 * 32 * sum(d * (d + 1) // 2 for d in docs)  # 12 * heads*head_dim * layers * pairs
    assert models.model_flops(shape, "full", docs, 16) == 4000 * 6 * n + attn
    assert models.model_flops(shape, "qlora", docs, 16) == 4000 * (4 * n + 6 * lora) + attn
    gemma = models.arch_shape("gemma-2-2b")
    assert gemma.windows[0] == 4096 and gemma.windows[1] is None and gemma.head_dim == 256


def test_offloaded_checkpoint_gives_the_same_gradients():
    arch = models.get_arch("tiny-llama")
    ids = torch.randint(3, 509, (2, 23), generator=torch.Generator().manual_seed(0))
    grads = {}
    for variant in ("none", "ckpt", "offload"):
        model = models.build_model(arch, mode="lora", device="cpu", dtype=torch.float32,
                                   attn_implementation="sdpa", seed=0)
        if variant != "none":
            models.enable_gradient_checkpointing(model, offload=variant == "offload")
        model.train()
        read = models.count_recomputes(model)
        model(input_ids=ids, labels=ids).loss.backward()
        assert read() == (1 if variant == "none" else 2), variant
        grads[variant] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        # LoRA B starts at zero (so A's gradient is zero at the first step); B's gradients must flow
        lora_b = [g for n, g in grads[variant].items() if "lora_B" in n]
        assert len(lora_b) == 2 * 7 and all(g.abs().sum() > 0 for g in lora_b), variant
    for variant in ("ckpt", "offload"):
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[variant][name], g, rtol=1e-5, atol=1e-7)


def test_saved_checkpoint_is_reused_and_loads_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = models.get_arch("tiny-llama")
    folder = str(tmp_path / "m")
    assert models.save_random_model(arch, folder, seed=3, device="cpu", dtype=torch.float32) == folder
    assert models.is_saved(folder)
    stamp = os.path.getmtime(os.path.join(folder, models.SAVED_MARK))
    models.save_random_model(arch, folder, seed=3, device="cpu", dtype=torch.float32)  # reused, not rebuilt
    assert os.path.getmtime(os.path.join(folder, models.SAVED_MARK)) == stamp
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    built = models.build_model(arch, mode="full", device="cpu", dtype=torch.float32, attn_implementation="sdpa",
                               seed=3)
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(built.state_dict().items())):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the same seed gives the same weights
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == arch.config["vocab_size"] and tokenizer.convert_tokens_to_ids("<t7>") == 7
    assert tokenizer.eos_token_id == arch.config["eos_token_id"]


def test_unsloth_network_guard_fails_at_once_with_one_line():
    import socket

    sys.path.insert(0, REPO)
    try:
        import benchmarks.e2e_providers as providers
    finally:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO]
    assert providers.PROVIDERS["unsloth"].unavailable("cpu").startswith("Unsloth needs a CUDA GPU")
    original = socket.socket.connect
    try:
        providers.block_network()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            with pytest.raises(providers.NetworkBlocked, match="HF_HUB_OFFLINE=1"):
                s.connect(("203.0.113.7", 443))  # TEST-NET-3: never routable
    finally:
        socket.socket.connect = original
