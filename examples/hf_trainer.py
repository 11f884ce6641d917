"""Fine-tune a Hugging Face causal LM with transformers' Trainer and fastsft's kernels.

    python examples/hf_trainer.py                          # tiny random Llama, CPU-friendly
    python examples/hf_trainer.py --model meta-llama/Llama-3.2-1B --lora --bf16 --steps 100

fastsft.patch_model(model) swaps the kernels into the model instance (RMSNorm,
RoPE, SwiGLU, packed attention, LoRA, and a loss that never builds the logits);
the Trainer needs no change. With gradient accumulation the Trainer passes
num_items_in_batch, which the patched loss honours, so accumulated gradients
equal those of one big batch.
"""
from __future__ import annotations

import argparse
import logging

import torch
import transformers

import fastsft


def build_model(args):
    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def toy_dataset(vocab: int, n: int = 64, seq: int = 32):
    """Prompt/response rows: labels are -100 on the prompt, so only responses train."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g)
        labels = ids.clone()
        labels[: 4 + i % 8] = -100
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a Hugging Face model id or path (default: a tiny random Llama)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output-dir", default="/tmp/fastsft-hf-trainer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    model = build_model(args)
    if args.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = fastsft.patch_model(model)  # the one call

    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=args.steps, learning_rate=2e-4 if args.lora else 1e-4, logging_steps=1, report_to=[],
        bf16=args.bf16, save_strategy="no", use_cpu=not torch.cuda.is_available())
    trainer = transformers.Trainer(model=model, args=training_args,
                                   train_dataset=toy_dataset(model.config.vocab_size))
    trainer.train()
    fastsft.unpatch_model(model)  # back to the stock modules, e.g. before saving or exporting


if __name__ == "__main__":
    main()
