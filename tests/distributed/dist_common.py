"""Configs shared by the distributed tests and their torchrun worker."""
import os

from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1}
WORLD = 2

# name -> config values of a 2-process run (the 1-process reference doubles gradient_accumulation_steps)
EVAL = dict(eval_fraction=0.1, eval_exact_match=True, eval_max_examples=2, eval_max_new_tokens=3)
RUNS = {
    "lora_ddp": dict(mode="lora", **EVAL),
    "full_fsdp": dict(mode="full", save_steps=2, save_total_limit=0),
    "full_fsdp_unpatched": dict(mode="full", patch_kernels=False),
    "qlora_ddp": dict(mode="qlora"),
    "qlora_fsdp": dict(mode="qlora", distributed="fsdp"),
    "full_fsdp_eval": dict(mode="full", max_steps=1, **EVAL),  # evaluation and generation under FSDP2
}

# sequence_parallel runs (tests/distributed/sequence_worker.py): a 4-head model whose 1 or 2 KV heads are
# replicated for the exchange; the 1-process reference is the same config without sequence_parallel
# (times the data-parallel size in gradient_accumulation_steps)
SP_MODEL = dict(TINY_MODEL, num_attention_heads=4, num_key_value_heads=1)
SEQUENCE_RUNS = {
    "lora_sp2": dict(mode="lora", model_config=SP_MODEL, sequence_parallel=2, gradient_checkpointing=True,
                     save_steps=2, save_total_limit=0, resume_at=2),
    # patch_kernels off: the stock loss (with shift_labels) and only the attention backend switched on
    "full_sp2_fsdp": dict(mode="full", model_config=SP_MODEL, sequence_parallel=2, patch_kernels=False),
    "qlora_sp2": dict(mode="qlora", model_config=SP_MODEL, sequence_parallel=2),
    # cpu_ops: fastest times the ops and may switch attention back to transformers' own: not under SP
    "lora_sp2_fastest": dict(mode="lora", model_config=SP_MODEL, sequence_parallel=2, max_steps=2, cpu_ops="fastest"),
    # torch_compile under SP (DDP's wrapper stays eager; the model inside is compiled): against the eager reference
    "lora_sp2_compiled": dict(mode="lora", model_config=SP_MODEL, sequence_parallel=2, max_steps=2, torch_compile=True,
                              torch_compile_backend="aot_eager"),
    "lora_sp4": dict(mode="lora", model_config=dict(SP_MODEL, num_key_value_heads=2), sequence_parallel=4),
    # one epoch of 7 micro-batches over 2 data slots: the last window leaves slot 1 a lockstep filler
    "lora_2x2": dict(mode="lora", model_config=SP_MODEL, sequence_parallel=2, max_steps=0, num_epochs=1, **EVAL),
}


def write_data(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    train, _ = make_records(40, 1, seed=1)
    write_jsonl(os.path.join(folder, "train.jsonl"), train)
    write_jsonl(os.path.join(folder, "one.jsonl"), train[:2])  # one packed micro-batch


def make_config(data: str, output_dir: str, max_examples_dataset: bool = False, **values):
    base = dict(
        model="tiny-llama", model_config=TINY_MODEL, tokenizer_vocab_size=300,
        dataset=os.path.join(data, "one.jsonl" if max_examples_dataset else "train.jsonl"),
        max_seq_length=64, batch_tokens=128, max_steps=3, learning_rate=1e-2, lr_scheduler="linear",
        warmup_steps=1, output_dir=output_dir, progress_bar="off", seed=0, cpu_threads=1,
        cpu_ops="patched",  # runs compared bit for bit: no per-run timing choice of ops (cpu_ops: fastest)
    )
    base.update(values)
    return load_config(None, **base)


class FirstStepGradients:
    """The trainable gradients the optimizer sees at its first step (in its parameter order), kept on CPU.

    The first step's gradients compare a sharded run with its 1-process reference directly: the weights
    after a few AdamW steps amplify summation-order noise in near-zero gradients (each element's first
    update is about lr * sign(gradient)), the gradients themselves do not."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.grads = None
        self._handle = register_optimizer_step_pre_hook(self._keep)

    def _keep(self, optimizer, args, kwargs):
        if self.grads is None:
            self.grads = [p.grad.detach().cpu().clone() for group in optimizer.param_groups for p in group["params"]
                          if p.grad is not None]

    def close(self):
        self._handle.remove()
        return self.grads
