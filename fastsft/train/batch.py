"""One micro-batch from the collator's host tensors to the device, once per batch.

The label range is checked here, on the host. A packed batch's boundaries go to the
device once, pre-validated (``make_cu_seqlens``), as ``cu_seq_lens_q``/``_k`` (one
tensor) plus the host ints ``max_length_q``/``_k``: no layer of the forward or the
backward reads them back. Its position ids are registered with the attention patch
together with their host copy, so transformers' packed-sequence detection needs no
device read either.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastsft.data.collate import check_label_range


def batch_to_device(batch: dict, device: torch.device, *, vocab_size: Optional[int] = None,
                    ignore_index: int = -100) -> dict:
    """Model inputs on ``device`` (``num_trained_tokens`` dropped); host ints stay ints."""
    if vocab_size is not None and "labels" in batch:
        check_label_range(batch["labels"], vocab_size, ignore_index=ignore_index)
    pin = device.type == "cuda"
    inputs = {}
    for key, value in batch.items():
        if key == "num_trained_tokens" or key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            continue
        if torch.is_tensor(value):
            value = (value.pin_memory() if pin and value.device.type == "cpu" else value).to(device, non_blocking=True)
        inputs[key] = value
    cu_host = batch.get("cu_seq_lens_q")
    if cu_host is not None:
        from fastsft_kernels.attention import make_cu_seqlens

        cu = make_cu_seqlens(cu_host.tolist(), device)  # host tensor: no sync
        inputs["cu_seq_lens_q"] = cu
        if "cu_seq_lens_k" in batch:
            inputs["cu_seq_lens_k"] = cu  # the same documents: one device copy
        if "position_ids" in batch and "attention_mask" not in batch:
            from fastsft.patch.attention import remember_packed_positions

            remember_packed_positions(inputs["position_ids"], batch["position_ids"])
    return inputs


def output_vocab_size(model: torch.nn.Module) -> Optional[int]:
    """Rows of the output embedding (the range labels must lie in), or None when unknown."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size else None
