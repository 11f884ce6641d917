"""The GGUF export streams: it declares every tensor first, then converts and writes one at a time, so its memory
is one tensor's, not the model's (an 8B model in f16 would otherwise need 16 GB beyond the weights). Measured with
tracemalloc, which sees numpy's allocations (the converted arrays)."""
import tracemalloc

import numpy as np
import torch

from fastsft.export.gguf_writer import export_gguf
from fastsft.tiny_families import build_model, build_tokenizer


def test_export_holds_one_tensor_at_a_time(tmp_path):
    tokenizer = build_tokenizer("bpe")
    model = build_model("llama", tokenizer, hidden_size=256, intermediate_size=512, num_hidden_layers=16)
    source = tmp_path / "model"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    sizes = [p.numel() for p in model.parameters()]
    largest, total = max(sizes) * 4, sum(sizes) * 4  # fp32 bytes: the converted copy of one tensor
    assert total > 50 * largest  # many tensors, none dominant: holding them all would show (about 4x the bound in f16)
    for qtype in ("f16", "q8_0"):
        tracemalloc.start()
        export_gguf(str(source), str(tmp_path / f"m-{qtype}.gguf"), qtype)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 4 * largest + 2 * 2**20, f"{qtype}: peak {peak / 2**20:.1f} MiB, model {total / 2**20:.1f} MiB"
