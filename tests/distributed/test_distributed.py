"""Data-parallel and FSDP2 training on CPU with gloo: 2 processes against 1, resume, failures.

Each torchrun launch pays the imports once per process, so the launches are
shared: one worker run (tests/distributed/worker.py) trains every mode in one
process group and the tests below read its results; the 1-process references
run in this process. The ops run through the fastsft_kernels API on their
PyTorch reference path (FASTSFT_TRITON_ON_CPU=0, as in tests/train); the Triton
kernels have their own parity tests.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fastsft.errors import ConfigError
from fastsft.train import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # dist_common, shared with worker.py (--import-mode=importlib keeps tests/ off sys.path)
from dist_common import RUNS, WORLD, make_config, write_data  # noqa: E402
LAUNCH_TIMEOUT_S = 400


pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


def _env():
    env = dict(os.environ, FASTSFT_TRITON_ON_CPU="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _torchrun(*args, timeout=LAUNCH_TIMEOUT_S):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.join(HERE, "worker.py"), *args]
    return subprocess.run(cmd, env=_env(), cwd=HERE, capture_output=True, text=True, timeout=timeout)


def _shared_dir(tmp_path_factory) -> str:
    """A folder every pytest-xdist worker of this session sees (the CI runs `pytest -n 2`)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return str(root)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    from filelock import FileLock

    folder = os.path.join(_shared_dir(tmp_path_factory), "dist-data")
    with FileLock(folder + ".lock"):
        if not os.path.isfile(os.path.join(folder, "one.jsonl")):
            write_data(folder)
    return folder


@pytest.fixture(scope="session")
def worker(data, tmp_path_factory):
    """The 2-process worker run, launched once per session even when xdist spreads these tests."""
    from filelock import FileLock

    out = os.path.join(_shared_dir(tmp_path_factory), "dist-runs")
    results = os.path.join(out, "results.json")
    with FileLock(out + ".lock"):
        if not os.path.isfile(results):
            os.makedirs(out, exist_ok=True)
            done = _torchrun("runs", data, out)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(results, encoding="utf-8") as handle:
        return json.load(handle), out


def one_process(data, output_dir, **values):
    """The same global batch on one process: gradient_accumulation_steps x WORLD micro-batches per step."""
    values = dict(values)
    values["gradient_accumulation_steps"] = values.get("gradient_accumulation_steps", 1) * WORLD
    return Trainer(make_config(data, output_dir, **values), stream=open(os.devnull, "w")).train().losses


def assert_close(got, want, rel=1e-5):
    assert len(got) == len(want) > 0, (got, want)
    for step, (a, b) in enumerate(zip(got, want), 1):
        assert math.isfinite(a) and abs(a - b) <= rel * abs(b), f"step {step}: {a} vs {b} ({got} vs {want})"


@pytest.mark.parametrize("name", ["lora_ddp", "full_fsdp", "qlora_ddp", "qlora_fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(worker, data, tmp_path, name):
    results, _ = worker
    run = results[name]
    assert run["strategy"] == name.split("_")[-1]
    values = {k: v for k, v in RUNS[name].items() if k not in ("save_steps", "save_total_limit")}
    reference = one_process(data, str(tmp_path / name), **values)
    assert_close(run["losses"], reference)
    assert len(set(run["losses"])) == len(run["losses"])  # the steps trained (different losses)
    if "eval_fraction" in values:  # every rank evaluates the whole held-out split: the same eval losses
        evals = [r["eval_loss"] for r in _metrics(os.path.join(worker[1], name)) if r.get("type") == "eval"]
        assert_close(evals, [r["eval_loss"] for r in _metrics(str(tmp_path / name)) if r.get("type") == "eval"])


def test_evaluation_and_generation_under_fsdp(worker):
    _, out = worker
    fsdp = [r for r in _metrics(os.path.join(out, "full_fsdp_eval")) if r.get("type") == "eval"]
    ddp = [r for r in _metrics(os.path.join(out, "lora_ddp")) if r.get("type") == "eval"]
    assert [r["step"] for r in fsdp] == [0, 1] and all(r["eval_examples"] == 2 for r in fsdp + ddp)
    # the same untrained base (LoRA starts as the identity) evaluated sharded and replicated
    assert_close([fsdp[0]["eval_loss"]], [ddp[0]["eval_loss"]])
    assert fsdp[1]["eval_loss"] < fsdp[0]["eval_loss"]


def test_kernels_run_on_unsharded_parameters_under_fsdp(worker):
    results, _ = worker
    full = results["full_fsdp"]
    for op in ("rms_norm", "linear_cross_entropy", "swiglu", "varlen_attention"):
        assert full["kernel_calls"].get(op, 0) > 0, full["kernel_calls"]
    assert full["sharded_inputs"] == []  # no DTensor (shard) reached a kernel; norm weights had full size
    vocab, hidden = full["vocab_hidden"]
    assert full["lce_weight_shape"] == [vocab, hidden]  # lm_head all-gathered: vocab x hidden, not vocab/2
    unpatched = results["full_fsdp_unpatched"]
    assert unpatched["kernel_calls"] == {}
    assert_close(full["losses"], unpatched["losses"])
    qlora = results["qlora_fsdp"]  # the NF4 LoRA kernel on the all-gathered 4-bit weights
    assert qlora["kernel_calls"].get("lora_linear", 0) > 0 and qlora["sharded_inputs"] == []
    assert_close(qlora["losses"], results["qlora_ddp"]["losses"])


def test_fsdp_sharded_checkpoint_resumes_and_final_model_is_consolidated(worker):
    from safetensors.torch import load_file

    results, out = worker
    assert results["full_fsdp_resumed"]["losses"] == results["full_fsdp"]["losses"][2:]  # step 3, bit for bit
    step2 = os.path.join(out, "full_fsdp", "checkpoints", "step-2")
    assert os.path.isfile(os.path.join(step2, "dcp", ".metadata"))
    assert sorted(os.listdir(os.path.join(step2, "rng"))) == ["rank-0.pt", "rank-1.pt"]
    assert not [n for n in os.listdir(os.path.dirname(step2)) if n.startswith(".tmp")]
    vocab, hidden = results["full_fsdp"]["vocab_hidden"]
    model = load_file(os.path.join(out, "full_fsdp", "model.safetensors"))
    assert tuple(model["model.embed_tokens.weight"].shape) == (vocab, hidden)
    base = load_file(os.path.join(out, "full_fsdp", "base_model", "model.safetensors"))
    assert not torch.equal(model["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    adapter = load_file(os.path.join(out, "qlora_fsdp", "adapter_model.safetensors"))
    lora_a = [v for k, v in adapter.items() if "q_proj.lora_A" in k]
    assert lora_a and all(v.shape[-1] == hidden for v in lora_a)


def test_more_processes_than_micro_batches_is_a_clear_error(worker):
    results, _ = worker
    message = results["too_few"]
    assert message and "2 processes need at least 2 micro-batches" in message and "packs into 1" in message


def _metrics(output_dir):
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip() and line.endswith("\n")]


def test_sigterm_then_resume_with_nproc(data, tmp_path):
    """fastsft train --nproc 2; SIGTERM after a few steps; --resume continues with the same losses."""
    values = dict(mode="lora", max_steps=500, lr_scheduler="constant", warmup_steps=0)
    config = make_config(data, str(tmp_path / "run"), **values)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "resume"}))
    cmd = [sys.executable, "-m", "fastsft", "train", str(cfg), "--nproc", str(WORLD)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while len([r for r in _metrics(config.output_dir) if r.get("type") == "train"]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    log_text = (tmp_path / "first.log").read_text()
    assert code == 128 + signal.SIGTERM, log_text[-4000:]
    stopped = [r["step"] for r in _metrics(config.output_dir) if r.get("type") == "train"][-1]
    assert 2 <= stopped < 500
    assert f"SIGTERM received: stopped after step {stopped}" in log_text
    checkpoint = os.path.join(config.output_dir, "checkpoints", f"step-{stopped}")
    with open(os.path.join(checkpoint, "distributed.json"), encoding="utf-8") as handle:
        assert json.load(handle) == {"world_size": WORLD, "strategy": "ddp"}

    # another world size is refused, naming the one to use
    with pytest.raises(ConfigError, match=f"written by {WORLD} processes.*--nproc {WORLD}"):
        Trainer(make_config(data, config.output_dir, **{**values, "resume": True})).setup()

    total = stopped + 2
    resumed = subprocess.run(cmd + ["--resume", "--max_steps", str(total)], env=_env(), capture_output=True,
                             text=True, timeout=LAUNCH_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    losses = [r["loss"] for r in _metrics(config.output_dir) if r.get("type") == "train"]
    assert len(losses) == total
    reference = one_process(data, str(tmp_path / "reference"), **{**values, "max_steps": total})
    assert_close(losses, reference)


def test_one_rank_raising_stops_every_rank_with_its_error(data, tmp_path):
    """Through the --nproc launcher: the failing rank, its error and its exit code come back."""
    started = time.monotonic()
    script = os.path.join(HERE, "worker.py")
    code = (f"import sys; from fastsft.distributed.launch import launch; "
            f"sys.exit(launch({WORLD}, ['raise', {data!r}, {str(tmp_path)!r}], entry=[{script!r}]))")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=HERE, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    output = done.stderr + done.stdout
    assert done.returncode == 1, output[-4000:]
    assert "rank 1 raised on purpose at step 2" in output
    assert f"fastsft: rank 1 of {WORLD} failed (exit code 1" in output
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S  # no rank left waiting in a collective
    steps = [r["step"] for r in _metrics(str(tmp_path / "raise")) if r.get("type") == "train"]
    assert steps and max(steps) < 50
