"""Run by the tests under torchrun (2 processes, gloo): several training runs in one process group.

    python -m torch.distributed.run --standalone --nproc_per_node 2 worker.py runs DATA OUT
    python -m torch.distributed.run --standalone --nproc_per_node 2 worker.py raise DATA OUT

`runs`: the runs of RUNS (each a fresh Trainer in the same process group, so the
imports are paid once), plus the checks below; rank 0 writes OUT/results.json.
`raise`: rank 1 raises at step 2 while rank 0 goes on into the next collective.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("FASTSFT_TRITON_ON_CPU", "0")  # the PyTorch reference ops behind the fastsft_kernels API
torch.set_num_threads(1)

from dist_common import RUNS, make_config  # noqa: E402  (tests/distributed/dist_common.py, next to this file)


class KernelSpy:
    """Counts fastsft_kernels calls and records whether any weight reached them sharded."""

    NAMES = ("rms_norm", "linear_cross_entropy", "lora_linear", "swiglu", "varlen_attention")

    def __init__(self):
        import fastsft_kernels as fk

        self.fk, self.calls, self.sharded, self.originals = fk, {}, [], {}
        for name in self.NAMES:
            original = getattr(fk, name)
            self.originals[name] = original
            setattr(fk, name, self._spy(name, original))

    def _spy(self, name, original):
        from torch.distributed.tensor import DTensor

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
            if any(isinstance(t, DTensor) for t in tensors):
                self.sharded.append(f"{name}: DTensor input")
            return original(*args, **kwargs)
        return call

    def shapes_check(self, name, check):
        wrapped = getattr(self.fk, name)

        def call(*args, **kwargs):
            problem = check(*args, **kwargs)
            if problem:
                self.sharded.append(f"{name}: {problem}")
            return wrapped(*args, **kwargs)
        setattr(self.fk, name, call)

    def close(self):
        for name, original in self.originals.items():
            setattr(self.fk, name, original)


def run_all(data, out):
    from fastsft.errors import ConfigError
    from fastsft.train import Trainer

    rank = dist.get_rank()
    results = {}
    for name, values in RUNS.items():
        spy = KernelSpy()
        if name == "full_fsdp":  # the weights the kernels see are the all-gathered, unsharded ones
            vocab_hidden = {}
            spy.shapes_check("rms_norm", lambda x, w, *a, **k: None if w.shape == (x.shape[-1],)
                             else f"weight {tuple(w.shape)} for hidden {x.shape[-1]}")
            spy.shapes_check("linear_cross_entropy", lambda h, w, *a, **k: vocab_hidden.setdefault(
                "shape", tuple(w.shape)) and None)
        config = make_config(data, os.path.join(out, name), **values)
        trainer = Trainer(config)
        result = trainer.train()
        spy.close()
        results[name] = {"losses": result.losses, "kernel_calls": spy.calls, "sharded_inputs": spy.sharded,
                         "strategy": trainer.dist.strategy}
        if name == "full_fsdp":
            results[name]["lce_weight_shape"] = vocab_hidden.get("shape")
            results[name]["vocab_hidden"] = [trainer.dist.unwrap(trainer.model).config.vocab_size,
                                             trainer.dist.unwrap(trainer.model).config.hidden_size]
            # resume from the sharded step-2 checkpoint: step 3 again, same loss
            again = make_config(data, os.path.join(out, name), resume=os.path.join(out, name, "checkpoints", "step-2"),
                                **values)
            results["full_fsdp_resumed"] = {"losses": Trainer(again).train().losses}
    # more processes than micro-batches: a clear error on every rank (no hang)
    try:
        Trainer(make_config(data, os.path.join(out, "too_few"), max_examples_dataset=True)).train()
        results["too_few"] = None
    except ConfigError as exc:
        results["too_few"] = str(exc)
    if rank == 0:
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle)
    dist.barrier()


def run_raise(data, out):
    from fastsft.train import Trainer

    def fail(trainer, record):
        if dist.get_rank() == 1 and record["step"] == 2:
            raise RuntimeError("rank 1 raised on purpose at step 2")

    Trainer(make_config(data, os.path.join(out, "raise"), mode="lora", max_steps=50), callbacks=[fail]).train()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    what, data, out = sys.argv[1:4]
    (run_all if what == "runs" else run_raise)(data, out)
    dist.destroy_process_group()
