"""Convergence on a real model, in the spirit of Liger's mini-model tests and TRL's invariants:
SmolLM2-135M-Instruct (30 layers, fp32) with LoRA rank 8 on every linear layer, trained for STEPS
AdamW steps on packed batches of the real demo's data, patched and unpatched from the same seed.

Stated tolerance: per-step losses within 1e-4 relative (the PyTorch reference ops on both sides
differ by summation order only), and the trained adapters give the same greedy answers on held-out
prompts. The kernels' own parity on these weights is test_real_kernels.py (the interpreter is too
slow for 30 layers x STEPS steps).
"""
import copy

import pytest
import torch

import fastsft
from fastsft import real_demo

from .conftest import packed_batch, run_model, with_lora, write_jsonl  # noqa: F401

pytestmark = pytest.mark.real
STEPS = 6
PER_BATCH = 6  # conversations per packed micro-batch (~270 tokens)


@pytest.fixture
def reference_ops(monkeypatch):
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")


def _train(model, batches):
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    losses = []
    for batch in batches:
        loss, _, _ = run_model(model, batch, logits=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_lora_training_patched_matches_unpatched(reference_ops, smollm2_fp32, smollm2_tokenizer, tmp_path,
                                                 record_property):
    from fastsft.data.options import DataOptions
    from fastsft.data.prepare import prepare_data

    records = real_demo.train_records()
    path = write_jsonl(tmp_path / "train.jsonl", [r["messages"] for r in records])
    examples = prepare_data(DataOptions(source=path, mask="assistant", max_seq_length=128),
                            smollm2_tokenizer).train
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [packed_batch([examples[i] for i in order[s * PER_BATCH:(s + 1) * PER_BATCH]]) for s in range(STEPS)]

    ref = with_lora(smollm2_fp32, random_b=False)  # peft's own init: B = 0
    fast = fastsft.patch_model(copy.deepcopy(ref))
    ref_losses = _train(ref, batches)
    fast_losses = _train(fast, batches)
    worst = max(abs(a - b) / abs(b) for a, b in zip(fast_losses, ref_losses))
    record_property("figure", "\n".join([
        f"convergence, {STEPS} AdamW steps of LoRA r8, 30 layers fp32, same seed, PyTorch reference ops:",
        "  step      " + "".join(f"{k + 1:>9}" for k in range(STEPS)),
        "  unpatched " + "".join(f"{x:>9.4f}" for x in ref_losses),
        "  patched   " + "".join(f"{x:>9.4f}" for x in fast_losses),
        f"  worst relative difference {worst:.1e} (bound 1e-4)"]))
    assert ref_losses[-1] < 0.5 * ref_losses[0]  # it learns: the comparison is not between two flat lines
    assert worst <= 1e-4, (fast_losses, ref_losses)

    questions = [q["messages"][0]["content"] for q in real_demo.eval_records()[::4]]
    ref_answers = real_demo.greedy_answers(ref.eval(), smollm2_tokenizer, questions, max_new_tokens=12)
    fast_answers = real_demo.greedy_answers(fast.eval(), smollm2_tokenizer, questions, max_new_tokens=12)
    record_property("figure", f"greedy answers after training, held out: {list(zip(questions, fast_answers))}")
    assert fast_answers == ref_answers
