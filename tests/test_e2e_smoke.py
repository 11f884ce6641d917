"""The end-to-end benchmark's --smoke run (tiny Llama on the CPU), its table renderer, and the pieces
of it that decide what the GPU numbers mean: the max-context search, the FLOP count and the offloaded
activation checkpoint.

The CLI runs as a subprocess from the repository root, the way users call it (benchmarks/__init__.py
drops the root from sys.path so kernels/ never imports as a top-level `kernels`). Modules without
relative imports are loaded from their files for the unit tests, so the root stays off sys.path here.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDERS = ("hf", "hf+liger", "hf-packed", "fastsft", "unsloth")
SMOKE_CAP = 128  # benchmarks.e2e.SMOKE["max_context_cap"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_e2e_test_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(module, *args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


def test_smoke_run_and_render(tmp_path):
    # one test for the whole run: a fixture shared by several tests would rerun it on every xdist worker
    out = tmp_path / "results"
    proc = _run("benchmarks.e2e", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "== e2e throughput" in proc.stdout and "== e2e max context" in proc.stdout
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".json", ".png", ".png"]
    check_throughput_json(out)
    check_max_context_json(out)
    check_render_table(out, tmp_path)


def _payload(directory, suffix):
    [path] = [p for p in os.listdir(directory) if p.endswith(suffix)]
    with open(os.path.join(directory, path)) as f:
        return json.load(f)


def check_throughput_json(smoke_dir):
    payload = _payload(smoke_dir, "_seq256.json")
    assert payload["kind"] == "throughput" and payload["smoke"] is True
    assert "flops_formula" in payload["config"] and payload["environment"]["torch"]
    rows = {r["provider"]: r for r in payload["results"]}
    assert set(rows) == set(PROVIDERS)
    for name, r in rows.items():
        if r.get("skipped"):
            assert isinstance(r["skipped"], str) and len(r["skipped"]) > 10, r
            continue
        assert not r.get("error"), r
        assert r["tokens_per_s"] > 0 and 0 < r["trained_tokens_per_s"] < r["tokens_per_s"], r
        assert r["ms"] > 0 and r["tflops"] > 0 and len(r["step_ms"]) == 2
        assert r["checkpointing_effective"] is True, r
    # the two providers that run on a CPU must run
    for name in ("hf", "fastsft"):
        assert not rows[name].get("skipped") and not rows[name].get("error"), rows[name]
    hf, fast = rows["hf"], rows["fastsft"]
    # the same documents and weights: the same work and (fp32, reference ops) the same losses
    assert hf["data_fingerprint"] == fast["data_fingerprint"]
    assert hf["trained_tokens_per_step"] == fast["trained_tokens_per_step"]
    assert hf["batch_format"] == "padded" and fast["batch_format"] == "packed"
    assert hf["docs_per_step"] > 1  # several documents per step: padding and packing both exercised
    torch.testing.assert_close(torch.tensor(fast["losses"]), torch.tensor(hf["losses"]), rtol=1e-4, atol=1e-5)
    assert fast["fastsft_patched"], "fastsft.patch_model patched nothing"
    assert abs(fast["speedup_vs_hf"] - hf["ms"] / fast["ms"]) < 1e-9


def check_max_context_json(smoke_dir):
    payload = _payload(smoke_dir, "_max_context.json")
    assert payload["kind"] == "max_context"
    rows = {(r["provider"], r["mode"]): r for r in payload["results"]}
    assert set(rows) == {(p, m) for p in PROVIDERS for m in ("ckpt", "ckpt+offload")}
    for (name, mode), r in rows.items():
        if r.get("skipped"):
            continue
        assert not r.get("error"), r
        # nothing runs out of memory on a CPU: the search doubles up to the cap
        assert r["max_seq"] == SMOKE_CAP and r["stopped_by"] == "cap" and r["first_oom"] is None, r
        assert [p["length"] for p in r["search"]["probes"]] == [64, 128]
        assert r["checkpointing_effective"] is True
    for name in ("hf", "fastsft"):
        assert not rows[(name, "ckpt")].get("skipped")


def check_render_table(smoke_dir, tmp_path):
    proc = _run("benchmarks.render_table", str(smoke_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "| provider | trained tok/s |" in table and "longest trainable sequence" in table
    for name in PROVIDERS:
        assert f"| {name} |" in table
    assert "skipped: flash-attn" in table and "SMOKE RUN" in table
    readme = tmp_path / "README.md"
    render = _load("render_table")
    readme.write_text(f"# x\n\nbefore\n{render.BEGIN}\nstale table\n{render.END}\nafter\n")
    proc = _run("benchmarks.render_table", str(smoke_dir), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{render.END}\nafter\n")
    assert table.strip() in text
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no results block"):
        render.update_readme(str(readme), table)


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
