"""Ulysses sequence parallelism on CPU with gloo: sharded packed batches against one process.

Two launches through fastsft's --nproc launcher (torchrun), shared by the tests (tests/distributed/sequence_worker.py):
2 ranks (sequence_parallel 2: LoRA + gradient checkpointing + checkpoint/resume,
full fine-tuning under FSDP2, QLoRA, cpu_ops: fastest, torch_compile) and 4 ranks (sequence_parallel 4, and a 2 x 2
data x sequence mesh). Each also checks the exchange alone against whole-sequence
attention. The 1-process references run in this process. Every packed micro-batch is
checked to have documents that straddle a shard boundary.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastsft.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_common import SEQUENCE_RUNS, FirstStepGradients, make_config, write_data  # noqa: E402
from test_distributed import _env, _metrics, _shared_dir, assert_close  # noqa: E402

LAUNCH_TIMEOUT_S = 500
LAUNCHES = {2: ["lora_sp2", "full_sp2_fsdp", "qlora_sp2", "lora_sp2_fastest", "lora_sp2_compiled"], 4: ["lora_sp4", "lora_2x2"]}

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


@pytest.fixture(scope="session")
def sp_data(tmp_path_factory):
    from filelock import FileLock

    folder = os.path.join(_shared_dir(tmp_path_factory), "sp-data")
    with FileLock(folder + ".lock"):
        if not os.path.isfile(os.path.join(folder, "one.jsonl")):
            write_data(folder)
    return folder


def _launch(world, sp_data, tmp_path_factory):
    from filelock import FileLock

    out = os.path.join(_shared_dir(tmp_path_factory), f"sp-runs-{world}")
    results = os.path.join(out, "results.json")
    with FileLock(out + ".lock"):
        if not os.path.isfile(results):
            os.makedirs(out, exist_ok=True)
            script = os.path.join(HERE, "sequence_worker.py")  # through fastsft's --nproc launcher
            code = (f"import sys; from fastsft.distributed.launch import launch; "
                    f"sys.exit(launch({world}, {[sp_data, out, *LAUNCHES[world]]!r}, entry=[{script!r}]))")
            done = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=HERE, capture_output=True, text=True,
                                  timeout=LAUNCH_TIMEOUT_S)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(results, encoding="utf-8") as handle:
        return json.load(handle), out


@pytest.fixture(scope="session")
def two_ranks(sp_data, tmp_path_factory):
    return _launch(2, sp_data, tmp_path_factory)


@pytest.fixture(scope="session")
def four_ranks(sp_data, tmp_path_factory):
    return _launch(4, sp_data, tmp_path_factory)


def _reference(sp_data, output_dir, name):
    """The same run on one process: no sequence_parallel, the data slots' micro-batches accumulated."""
    from fastsft.train import Trainer

    values = {k: v for k, v in SEQUENCE_RUNS[name].items()
              if k not in ("resume_at", "save_steps", "save_total_limit", "torch_compile", "torch_compile_backend")}
    size = values.pop("sequence_parallel")
    values["gradient_accumulation_steps"] = 4 // size if name == "lora_2x2" else 1  # the data slots
    first = FirstStepGradients()
    try:
        losses = Trainer(make_config(sp_data, output_dir, **values), stream=open(os.devnull, "w")).train().losses
    finally:
        gradients = first.close()
    return losses, gradients


def _weights(output_dir):
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "model.safetensors"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            return load_file(path)
    raise AssertionError(f"no trained weights in {output_dir}")


@pytest.mark.parametrize("world", [2, 4])
def test_exchange_matches_whole_sequence_attention(world, request):
    """Outputs and q/k/v gradients of the sharded attention (KV heads replicated 4x, 2x, or not)."""
    results, _ = request.getfixturevalue("two_ranks" if world == 2 else "four_ranks")
    for heads, errors in results["exchange"].items():
        for what in ("out", "grad_q", "grad_k", "grad_v"):
            assert errors[what] <= 1e-5 * errors["scale"], (world, heads, errors)


@pytest.mark.parametrize("name", LAUNCHES[2] + LAUNCHES[4])
def test_sequence_parallel_matches_one_process(name, request, sp_data, tmp_path):
    results, out = request.getfixturevalue("two_ranks" if name in LAUNCHES[2] else "four_ranks")
    run = results[name]
    assert run["straddling"] > 0 and run["shards"] == len(run["losses"])  # documents cross the shard boundaries
    assert run["strategy"] == ("fsdp" if "fsdp" in name else "ddp")
    assert run["data_parallel"] == (2 if name == "lora_2x2" else 1)
    reference, reference_gradients = _reference(sp_data, str(tmp_path / name), name)
    assert_close(run["losses"], reference, rel=1e-5)
    if "lora" in name:  # the first step's gradients, to 1e-5 of each tensor's norm (measured: 1.8e-7 at most)
        gradients = torch.load(os.path.join(out, name, "first_step_gradients.pt"))
        assert len(gradients) == len(reference_gradients) > 0
        for got_grad, want_grad in zip(gradients, reference_gradients):
            assert float((got_grad - want_grad).norm()) <= 1e-5 * float(want_grad.norm()), name
    assert len(set(run["losses"])) == len(run["losses"])  # the steps trained
    got, want = _weights(os.path.join(out, name)), _weights(str(tmp_path / name))
    trained = [k for k in want if "lora_" in k] if "lora" in name else list(want)
    assert trained and set(got) == set(want)
    for key in trained:  # the same trained weights, to 1e-3 of each tensor's norm. Looser than the gradients:
        # AdamW's first updates are about lr * sign(gradient) element by element, so the summation-order noise
        # of near-zero gradients (1e-7 of the norm) moves single elements by up to lr. Measured after 3-4 steps:
        # up to 5.4e-5 (lora_2x2), 1.9e-4 with the same gradients rounded in another order; a wrong gradient
        # or a lost shard is off by O(1)
        error = float((got[key] - want[key]).norm())
        assert error <= 1e-3 * float(want[key].norm()), (key, error)
    if "eval_fraction" in SEQUENCE_RUNS[name]:  # evaluation and generation: whole sequences, no exchange
        evals = [r for r in _metrics(os.path.join(out, name)) if r.get("type") == "eval"]
        want_evals = [r for r in _metrics(str(tmp_path / name)) if r.get("type") == "eval"]
        assert len(evals) == 2 and all(r["eval_examples"] == 2 for r in evals)
        assert_close([r["eval_loss"] for r in evals], [r["eval_loss"] for r in want_evals])


def test_sequence_parallel_checkpoint_resumes(two_ranks):
    results, out = two_ranks
    run = results["lora_sp2"]
    assert run["resumed"] == run["losses"][2:]  # step 3 from the sharded step-2 checkpoint, bit for bit
    step2 = os.path.join(out, "lora_sp2", "checkpoints", "step-2")
    assert sorted(os.listdir(os.path.join(step2, "rng"))) == ["rank-0.pt", "rank-1.pt"]


# ------------------------------------------------------------------ the shards, on one process
def _packed(doc_lengths):
    from fastsft.data import collate
    from fastsft.data.example import Example

    examples, token = [], 1
    for n in doc_lengths:
        ids = list(range(token, token + n))
        token += n
        examples.append(Example(input_ids=ids, labels=ids, source_index=len(examples)))
    return collate(examples, packing=True, pad_token_id=0)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_shards_cover_the_stream_with_global_positions_and_shifted_labels(size):
    from fastsft.distributed.sequence import shard_batch, straddling_documents

    batch = _packed([7, 12, 4])  # 23 tokens: padded to a multiple of size by one more document
    shards = [shard_batch(batch, r, size, pad_token_id=0) for r in range(size)]
    assert sum(tokens for _, tokens in shards) == 23
    ids = torch.cat([s["input_ids"] for s, _ in shards], 1)
    assert torch.equal(ids[:, :23], batch["input_ids"]) and (ids[:, 23:] == 0).all()
    positions = torch.cat([s["position_ids"] for s, _ in shards], 1)
    assert torch.equal(positions[:, :23], batch["position_ids"])
    labels = torch.cat([s["shift_labels"] for s, _ in shards], 1)
    assert torch.equal(labels[0, :22], batch["labels"][0, 1:]) and (labels[0, 22:] == -100).all()
    assert sum(s["num_trained_tokens"] for s, _ in shards) == batch["num_trained_tokens"]
    cu = shards[0][0]["cu_seq_lens_q"]
    assert int(cu[-1]) == ids.shape[1] and all(torch.equal(s["cu_seq_lens_q"], cu) for s, _ in shards)
    assert all(s["max_length_q"] == 12 for s, _ in shards)
    assert len({s["input_ids"].shape for s, _ in shards}) == 1
    assert straddling_documents(cu, ids.shape[1], size) > 0


def test_kv_heads_are_replicated_or_refused():
    from fastsft.distributed.ulysses import heads_problem, kv_repeats

    assert kv_repeats(32, 8, 8) == 1 and kv_repeats(32, 8, 16) == 2 and kv_repeats(32, 2, 8) == 4
    assert kv_repeats(4, 1, 2) == 2 and kv_repeats(28, 4, 7) == 7
    assert heads_problem(28, 4, 8) and "divide the model's 28 attention heads" in heads_problem(28, 4, 8)
    assert heads_problem(32, 8, 4) is None


# ------------------------------------------------------------------ bad input: one line, exit 2, no weights loaded
@pytest.fixture
def project(tmp_path, sp_data):
    tiny = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, " \
           "num_key_value_heads: 1}"
    (tmp_path / "run.yaml").write_text(
        f"model: tiny-llama\nmodel_config: {tiny}\ntokenizer_vocab_size: 300\n"
        f"dataset: {os.path.join(sp_data, 'train.jsonl')}\nmax_seq_length: 64\nbatch_tokens: 128\nmax_steps: 1\n"
        f"progress_bar: 'off'\nmode: lora\noutput_dir: out\n")
    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"model_type": "bloom", "n_head": 2, "hidden_size": 32}))
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--sequence_parallel", "2"], "config key 'sequence_parallel': 2 needs 2 processes or a multiple: start the "
                                   "run with --nproc 2"),
    (["--sequence_parallel", "3", "--nproc", "2"], "config key 'sequence_parallel': 3 does not divide the 2 "
                                                   "processes"),
    (["--sequence_parallel", "4", "--nproc", "4"], "config key 'sequence_parallel': 4 must divide the model's 2 "
                                                   "attention heads"),
    (["--sequence_parallel", "2", "--nproc", "2", "--packing", "false"], "needs packing: true"),
    (["--sequence_parallel", "2", "--nproc", "2", "--model", "bloom", "--model_config", "{}"],
     "the bloom model family's attention is not patched by fastsft"),
    (["--sequence_parallel", "0"], "config key 'sequence_parallel' must be >= 1, got 0"),
])
def test_bad_sequence_parallel_is_one_line_before_any_weight(project, args, message):
    environ = dict(_env(), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "fastsft", "train", "run.yaml", *args], cwd=project, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr[-3000:]
    assert not (project / "out").exists()  # nothing written, no base model built


def test_trainer_api_refuses_sequence_parallel_on_one_process(sp_data, tmp_path):
    from fastsft.train import Trainer

    config = make_config(sp_data, str(tmp_path / "out"), sequence_parallel=2)
    with pytest.raises(ConfigError, match="2 needs 2 processes"):
        Trainer(config).setup()
    assert not (tmp_path / "out").exists()


def test_exchange_is_one_all_to_all_each_way(monkeypatch):
    """q, k and v travel together: one all-to-all before the kernel and one after, per attention call."""
    from fastsft.distributed import ulysses
    from fastsft.patch.attention import fastsft_varlen

    sent = []

    def loopback(tensor, group):  # a 1-process stand-in that keeps every chunk where it is
        sent.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(ulysses, "_all_to_all", loopback)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 4, 8, 8), torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    with ulysses.exchanging(ulysses.SequenceGroup(None, 2, 0)):
        out, _ = fastsft_varlen(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=11)
    assert out.shape == (1, 8, 4, 8)
    # in: (ranks, local tokens, 4/2 query + 2 * 2/2 replicated KV heads, head dim); out: 4/2 heads
    assert sent == [(2, 8, 4, 8), (2, 8, 2, 8)]
    assert ulysses.active() is None


@pytest.mark.parametrize("model_config, message", [
    ({}, "8 must divide the model's 4 attention heads"),  # tiny-llama's own 4 / 2 heads, not LlamaConfig's 32
    ({"num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 64}, None),
])
def test_pre_load_head_check_uses_tiny_llamas_own_config(model_config, message):
    from fastsft.config import TrainConfig
    from fastsft.distributed.sequence import check_model

    config = TrainConfig(model="tiny-llama", model_config=model_config, dataset="unused.jsonl", sequence_parallel=8)
    if message is None:
        check_model(config)
    else:
        with pytest.raises(ConfigError, match=message):
            check_model(config)
