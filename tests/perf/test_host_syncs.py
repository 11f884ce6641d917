"""Host syncs: none in the forward and backward of a training step on a packed batch.

One step of the trainer (fastsft.train.Trainer: its builder, collator, device copy,
autocast and loss) on a tiny patched model, with the Triton kernels (through the
interpreter, so the launchers' own host code runs as on a GPU). The counter covers
``Trainer.accumulate`` (every forward and backward of the window) except the host
preparation of each batch (``batch_to_device``: the label check and the boundaries,
on the collator's host tensors, before the device copy). Budget: 0. The rest of the
step (loss value for logging and the non-finite check, gradient norm) is reported.
"""
import io

import pytest
import torch

from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl
from fastsft.train import Trainer
from fastsft.train import loop as loop_module

TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def trainer_for(tmp_path, mode, precision):
    train, _ = make_records(12, 1, seed=1)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    config = load_config(None, model="tiny-llama", model_config=TINY, tokenizer_vocab_size=290,
                         dataset=str(tmp_path / "train.jsonl"), max_seq_length=48, batch_tokens=64, max_steps=2,
                         output_dir=str(tmp_path / "out"), progress_bar="off", self_check=False, mode=mode, precision=precision,
                         device="cpu", gradient_checkpointing=True, lora_r=4, lora_alpha=8, packing=True)
    trainer = Trainer(config, stream=io.StringIO())
    trainer.setup()
    trainer.model.train()
    return trainer


def count_step(trainer, sync_counter, monkeypatch):
    fwd_bwd = sync_counter()
    real_to_device = loop_module.batch_to_device
    real_accumulate = trainer.accumulate

    def to_device(*args, **kwargs):
        with fwd_bwd.paused():  # host tensors, before the device copy
            return real_to_device(*args, **kwargs)

    def accumulate(*args, **kwargs):
        with fwd_bwd:
            return real_accumulate(*args, **kwargs)

    monkeypatch.setattr(loop_module, "batch_to_device", to_device)
    monkeypatch.setattr(trainer, "accumulate", accumulate)
    whole = sync_counter()
    with whole:
        record = trainer.train_step()
    return record, fwd_bwd, whole


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_no_host_sync_in_forward_and_backward(tmp_path, sync_counter, monkeypatch, mode):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    trainer = trainer_for(tmp_path, mode, "bf16")
    record, fwd_bwd, whole = count_step(trainer, sync_counter, monkeypatch)
    assert record is not None and torch.isfinite(torch.tensor(record["loss"]))
    batch = trainer.collate(trainer.stream_data.plan(0)[0])
    assert {"cu_seq_lens_q", "position_ids"} <= set(batch), "the trainer's batch is not packed"
    assert fwd_bwd.triton_launches > 0, "the kernels did not take the Triton path"
    assert not fwd_bwd.events, f"{mode}: host syncs in forward + backward:\n{fwd_bwd.summary()}"
    outside = len(whole.events) - len(fwd_bwd.events)
    print(f"{mode}: forward+backward syncs 0; rest of the step {outside}:\n{whole.summary()}")


# ------------------------------------------------------------------ once per batch, not per layer
def _model(layers):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    torch.manual_seed(0)
    import fastsft

    return fastsft.patch_model(transformers.LlamaForCausalLM(config))


def _syncs_outside_kernels(model, inputs, sync_counter, monkeypatch):
    """Syncs of the patches and transformers in one forward + backward (the ops' own paths are
    covered above; here they run the reference math on CPU, paused)."""
    import fastsft_kernels

    counter = sync_counter()
    for name in ("linear_cross_entropy", "varlen_attention", "rms_norm", "rope", "swiglu"):
        op = getattr(fastsft_kernels, name)

        def paused(*args, _op=op, **kwargs):
            with counter.paused():
                return _op(*args, **kwargs)

        monkeypatch.setattr(fastsft_kernels, name, paused)
    with counter:
        model(**inputs).loss.backward()
    return counter


@pytest.mark.parametrize("kind", ["padded", "positions_only"])
def test_batches_without_host_boundaries_sync_once_per_batch(sync_counter, monkeypatch, make_packed_batch, kind):
    """A padded batch (mask) or packed position ids from another collator: one host read per
    batch, the same for 1 and 3 layers."""
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    if kind == "padded":
        ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    else:
        batch = make_packed_batch()
        inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    counts = []
    for layers in (1, 3):
        fresh = {k: v.clone() for k, v in inputs.items()}  # boundaries are cached per batch tensor
        counter = _syncs_outside_kernels(_model(layers), fresh, sync_counter, monkeypatch)
        reads = [e for e in counter.events if e[0] in ("to('cpu')", "cpu")]
        assert len(reads) == 1, f"{kind}, {layers} layers: expected one host copy per batch:\n{counter.summary()}"
        counts.append(len(counter.events))
    assert counts[0] == counts[1], f"{kind}: syncs grow with the number of layers: {counts}"


def test_label_range_is_checked_on_the_host_before_the_device_copy(make_packed_batch):
    from fastsft.errors import DataError
    from fastsft.train.batch import batch_to_device

    batch = make_packed_batch()
    batch["labels"][0, 5] = 500  # beyond a 128-token vocabulary
    with pytest.raises(DataError, match=r"1 label\(s\) outside the model's vocabulary \[0, 128\) \(token ids 500\)"):
        batch_to_device(batch, torch.device("cpu"), vocab_size=128)
    batch["labels"][0, 5] = -100
    inputs = batch_to_device(batch, torch.device("cpu"), vocab_size=128)
    assert isinstance(inputs["max_length_q"], int) and inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"]
    assert "num_trained_tokens" not in inputs
