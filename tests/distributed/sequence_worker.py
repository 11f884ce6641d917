"""Run by tests/distributed/test_sequence_parallel.py under torchrun (gloo): sequence-parallel checks.

    python -m torch.distributed.run --standalone --nproc_per_node W sequence_worker.py DATA OUT RUN [RUN ...]

First the Ulysses attention alone against whole-sequence attention (outputs and the
gradients of q, k, v, on a packed batch whose documents straddle the shards), then
each named training run of SEQUENCE_RUNS as a fresh Trainer in the same process
group; rank 0 writes OUT/results.json.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("FASTSFT_TRITON_ON_CPU", "0")  # the PyTorch reference ops behind the fastsft_kernels API
torch.set_num_threads(1)

from dist_common import SEQUENCE_RUNS, FirstStepGradients, make_config  # noqa: E402


def exchange_errors(group, n_heads: int, n_kv_heads: int) -> dict:
    """Largest |difference| of the sharded attention's output and input gradients from the whole one."""
    from fastsft.distributed import ulysses
    from fastsft.patch.attention import fastsft_varlen

    size = group.size
    docs = [13, 30, 5, 17]  # 65 tokens, padded to a multiple of the group by one more document
    total = -(-sum(docs) // size) * size
    docs.append(total - sum(docs)) if total > sum(docs) else None
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, n_heads, total, 8, generator=gen, dtype=torch.float32)
    k = torch.randn(1, n_kv_heads, total, 8, generator=gen, dtype=torch.float32)
    v = torch.randn(1, n_kv_heads, total, 8, generator=gen, dtype=torch.float32)
    grad_out = torch.randn(1, total, n_heads, 8, generator=gen, dtype=torch.float32)
    module = torch.nn.Module()
    module.is_causal = True
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(docs), max_length_k=max(docs))

    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = fastsft_varlen(module, *whole, None, **kwargs)
    out.backward(grad_out)

    width = total // size
    span = slice(group.rank * width, (group.rank + 1) * width)
    local = [t[:, :, span].clone().requires_grad_() for t in (q, k, v)]
    with ulysses.exchanging(group):
        mine, _ = fastsft_varlen(module, *local, None, **kwargs)
    mine.backward(grad_out[:, span])
    errors = {"out": float((mine - out[:, span]).detach().abs().max())}
    for name, a, b in zip("qkv", local, whole):
        errors[f"grad_{name}"] = float((a.grad - b.grad[:, :, span]).abs().max())
    errors["scale"] = float(out.abs().max())
    return errors


class ShardSpy:
    """Counts the documents that cross a shard boundary in the micro-batches the trainer splits."""

    def __init__(self):
        from fastsft.distributed import sequence

        self.module, self.original, self.straddling, self.shards = sequence, sequence.shard_batch, 0, 0
        sequence.shard_batch = self.shard

    def shard(self, batch, rank, size, pad_token_id):
        if rank == 0:
            padded = self.module.pad_to_multiple(batch, size, pad_token_id)
            self.straddling += self.module.straddling_documents(padded["cu_seq_lens_q"],
                                                                padded["input_ids"].shape[1], size)
        self.shards += 1
        return self.original(batch, rank, size, pad_token_id)

    def close(self):
        self.module.shard_batch = self.original


def main(data, out, names):
    from fastsft.train import Trainer

    from fastsft.distributed.sequence import build_mesh

    _, group = build_mesh(dist.get_world_size(), torch.device("cpu"))
    results = {"exchange": {f"{h}:{kv}": exchange_errors(group, h, kv) for h, kv in ((4, 1), (4, 2), (4, 4))}}
    for name in names:
        values = dict(SEQUENCE_RUNS[name])
        resume_at = values.pop("resume_at", None)
        spy, first = ShardSpy(), FirstStepGradients()
        trainer = Trainer(make_config(data, os.path.join(out, name), **values))
        result = trainer.train()
        spy.close()
        if dist.get_rank() == 0 and values["mode"] != "full":  # FSDP2 shards full fine-tuning's gradients
            torch.save(first.close(), os.path.join(out, name, "first_step_gradients.pt"))
        else:
            first.close()
        results[name] = {"losses": result.losses, "strategy": trainer.dist.strategy,
                         "data_parallel": trainer.dist.data_parallel_size, "straddling": spy.straddling,
                         "shards": spy.shards}
        if resume_at:  # the sharded checkpoint of step resume_at: the later steps again, bit for bit
            again = make_config(data, os.path.join(out, name),
                                resume=os.path.join(out, name, "checkpoints", f"step-{resume_at}"), **values)
            results[name]["resumed"] = Trainer(again).train().losses
    if dist.get_rank() == 0:
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle)
    dist.barrier()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    dist.destroy_process_group()
