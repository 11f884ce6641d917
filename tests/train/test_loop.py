"""The training loop on CPU: accumulation exactness, checkpoint + exact resume, signals, non-finite losses.

These tests set FASTSFT_TRITON_ON_CPU=0, so the patched model runs the PyTorch
reference ops instead of the Triton interpreter (the kernels have their own
parity tests in tests/kernels; test_interpreter_path_end_to_end runs the
interpreter through the trainer once).
"""
import json
import math
import os
import signal

import pytest
import torch

from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl
from fastsft.errors import ConfigError
from fastsft.train import Trainer, TrainingError
from fastsft.train.checkpoint import CHECKPOINTS_DIR, STATE_FILE, list_checkpoints

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1}


pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


def make_config(tmp_path, n_train=40, n_eval=0, **values):
    data = tmp_path / "data"
    if not (data / "train.jsonl").exists():
        train, held_out = make_records(n_train, max(n_eval, 1), seed=1)
        write_jsonl(str(data / "train.jsonl"), train)
        write_jsonl(str(data / "eval.jsonl"), held_out[:n_eval] if n_eval else held_out)
    base = dict(
        model="tiny-llama", model_config=TINY_MODEL, tokenizer_vocab_size=300, dataset=str(data / "train.jsonl"),
        max_seq_length=64, batch_tokens=128, max_steps=4, learning_rate=1e-2, lr_scheduler="linear",
        warmup_steps=1, output_dir=str(tmp_path / "out"), progress_bar="off", seed=0, mode="full",
        cpu_ops="patched",  # runs compared bit for bit: no per-run timing choice of ops (cpu_ops: fastest)
    )
    if n_eval:
        base["eval_dataset"] = str(data / "eval.jsonl")
    base.update(values)
    return load_config(None, **base)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_accumulation_normalises_by_window_trained_tokens(tmp_path):
    """4 uneven micro-batches accumulated == one batch holding all their documents."""
    trainer = Trainer(make_config(tmp_path, mode="full"))
    trainer.setup()
    data = trainer.data.train
    groups = [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]  # uneven numbers of documents and trained tokens
    micro = [trainer.collate(g) for g in groups]
    counts = [b["num_trained_tokens"] for b in micro]
    assert len(set(counts)) > 1, counts
    whole = trainer.collate([i for g in groups for i in g])

    trainer.model.zero_grad(set_to_none=True)
    loss_acc, n_acc = trainer.accumulate(micro)
    g_acc = grads(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    loss_one, n_one = trainer.accumulate([whole])
    g_one = grads(trainer.model)

    assert n_acc == n_one == sum(counts)
    assert abs(float(loss_acc) - float(loss_one)) <= 1e-5 * abs(float(loss_one))  # fp32 bound
    assert g_acc.keys() == g_one.keys() and g_acc
    for name in g_one:
        assert rel_err(g_acc[name], g_one[name]) < 1e-5, name
    # the naive alternative (mean of per-micro-batch means) is measurably different: the test has teeth
    naive = sum(float(trainer.compute_loss(b, b["num_trained_tokens"])) for b in micro) / len(micro)
    assert abs(naive - float(loss_one)) > 1e-4
    assert all(len(data[i].input_ids) > 0 for i in range(11))


def _sigterm_at(step):
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")

    def callback(trainer, record):
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


def test_sigterm_checkpoint_then_resume_gives_identical_losses(tmp_path):
    # LoRA with dropout: the RNG states must be restored too; 8 steps cross an epoch boundary
    common = dict(mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, max_steps=8, gradient_accumulation_steps=2,
                  save_steps=0)
    full = Trainer(make_config(tmp_path / "a", **common)).train()
    assert full.status == "completed" and len(full.losses) == 8
    assert len(set(full.losses)) == 8  # the losses move, so equality below is meaningful
    assert all(math.isfinite(x) for x in full.losses)

    config = make_config(tmp_path / "b", **common)
    first = Trainer(config, callbacks=[_sigterm_at(3)]).train()
    assert first.status == "interrupted" and first.signal == signal.SIGTERM
    assert first.global_step == 3 and first.checkpoint.endswith("step-3")
    files = os.listdir(first.checkpoint)
    assert {"adapter_model.safetensors", "adapter_config.json", STATE_FILE} <= set(files)
    assert not [d for d in os.listdir(os.path.join(config.output_dir, CHECKPOINTS_DIR)) if d.startswith(".tmp")]
    assert not os.path.exists(os.path.join(config.output_dir, "adapter_model.safetensors"))  # no final output yet

    config.resume = True
    second = Trainer(config).train()
    assert second.status == "completed" and second.global_step == 8
    assert first.losses + second.losses == full.losses  # bit-identical on CPU, fp32

    records = read_metrics(config.output_dir)
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, 9))  # resume appended without duplicates


def test_checkpoints_rotate_and_resume_from_path(tmp_path):
    config = make_config(tmp_path, max_steps=6, save_steps=2, save_total_limit=2)
    done = Trainer(config).train()
    kept = [step for step, _ in list_checkpoints(config.output_dir)]
    assert kept == [4, 6]
    # an output_dir with checkpoints is not silently reused
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(make_config(tmp_path, max_steps=6)).setup()
    # resuming the step-4 checkpoint (by path) redoes steps 5 and 6 identically
    again = make_config(tmp_path, max_steps=6, resume=os.path.join(config.output_dir, CHECKPOINTS_DIR, "step-4"),
                        output_dir=str(tmp_path / "out"))
    redo = Trainer(again).train()
    assert redo.losses == done.losses[4:]
    # resuming with a changed optimisation key is refused, with the list of what differs
    changed = make_config(tmp_path, max_steps=6, learning_rate=0.5, resume=again.resume)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's \(learning_rate: 0.01 -> 0.5\).*"
                                          r"--resume_changed_config"):
        Trainer(changed).setup()


class _NaNAtStep2(Trainer):
    def compute_loss(self, batch, num_items):
        loss = super().compute_loss(batch, num_items)
        return loss * float("nan") if self.global_step == 1 else loss


def test_nonfinite_loss_stops_with_message(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 2.*nonfinite_loss: skip"):
        _NaNAtStep2(make_config(tmp_path, max_steps=4)).train()


def test_nonfinite_loss_skip(tmp_path):
    trainer = _NaNAtStep2(make_config(tmp_path, max_steps=4, nonfinite_loss="skip"))
    trainer.setup()
    before = {}

    def snapshot(t, record):
        if record["step"] == 1:
            before.update({n: p.detach().clone() for n, p in t.model.named_parameters()})
        if record["step"] == 2:  # the skipped step left the weights alone
            for n, p in t.model.named_parameters():
                assert torch.equal(p, before[n]), n

    trainer.callbacks.append(snapshot)
    result = trainer.train()
    assert result.status == "completed" and result.global_step == 4
    assert math.isnan(result.losses[1]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 1)
    assert result.summary["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_outputs_metrics_and_eval(tmp_path):
    config = make_config(tmp_path, n_eval=6, mode="lora", lora_r=4, max_steps=3, eval_steps=2,
                         eval_exact_match=True, eval_max_new_tokens=16)
    result = Trainer(config).train()
    out = config.output_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "fastsft_config.yaml",
                 "metrics.jsonl", "loss_curve.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    records = read_metrics(out)
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "peak_memory_mb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]  # start (baseline), every eval_steps, end
    assert all(0.0 <= r["eval_exact_match"] <= 1.0 and r["eval_examples"] == 6 for r in evals)
    assert result.summary["exact_match_start"] is not None and result.summary["eval_loss"] == evals[-1]["eval_loss"]


def test_eval_requested_without_heldout_split(tmp_path):
    with pytest.raises(ConfigError, match="held-out split"):
        Trainer(make_config(tmp_path, eval_exact_match=True)).setup()


def test_padded_batches_and_gradient_checkpointing(tmp_path):
    config = make_config(tmp_path, packing=False, batch_size=4, gradient_checkpointing=True,
                         offload_activations=True, mode="lora", lora_r=4, max_steps=2, optimizer="adamw",
                         lr_scheduler="cosine")
    result = Trainer(config).train()
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)


def test_qlora_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    config = make_config(tmp_path, mode="qlora", lora_r=4, max_steps=2, learning_rate=1e-3)
    trainer = Trainer(config)
    result = trainer.train()
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)
    assert any("4bit" in type(m).__name__ for m in trainer.model.modules())


def test_interpreter_path_end_to_end(tmp_path, monkeypatch):
    """Two steps with the Triton kernels running through the interpreter (patch_kernels on)."""
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "1")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the interpreter is not enabled")
    tiny = dict(TINY_MODEL, num_hidden_layers=1)
    config = make_config(tmp_path, n_train=8, model_config=tiny, max_steps=2, batch_tokens=64, mode="lora", lora_r=4,
                         patch_kernels=True)
    result = Trainer(config).train()
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, precision", [("lora", "bf16"), ("qlora", "bf16"), ("full", "bf16"), ("lora", "fp16")])
def test_gpu_modes_and_precisions(tmp_path, monkeypatch, mode, precision):
    """On CUDA: the Triton kernels, autocast, the fp16 grad scaler, 4-bit bases; the loss must fall."""
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    config = make_config(tmp_path, n_train=64, mode=mode, precision=precision, device="cuda", lora_r=8,
                         model_config=dict(TINY_MODEL, hidden_size=64, intermediate_size=128), max_steps=12,
                         learning_rate=5e-3, batch_tokens=256)
    result = Trainer(config).train()
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
