"""Fine-tune with TRL's SFTTrainer on a fastsft-patched model (pip install trl).

    python examples/trl_sft.py --model Qwen/Qwen2.5-0.5B-Instruct --bf16 --steps 100

SFTTrainer tokenizes and (with packing=True and padding_free) packs the chat
rows itself; fastsft.patch_model(model) only swaps the kernels in, so TRL's
data handling is unchanged. With packing, TRL passes position_ids that restart
per document, which the patched RoPE and packed attention honour.
"""
from __future__ import annotations

import argparse
import logging

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face causal LM id or path")
    p.add_argument("--dataset", default="trl-lib/Capybara", help="a chat dataset with a 'messages' column")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--output-dir", default="/tmp/fastsft-trl-sft")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    try:
        import trl
    except ImportError as exc:
        raise SystemExit("this example needs TRL: pip install trl") from exc
    import datasets
    import transformers

    import fastsft

    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.lora:  # wrap before patching, so fastsft also routes the LoRA layers through its kernels
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = fastsft.patch_model(model)  # the one call

    config = trl.SFTConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2,
                           gradient_accumulation_steps=4, learning_rate=2e-4 if args.lora else 2e-5,
                           packing=True, padding_free=True, bf16=args.bf16, logging_steps=1, report_to=[])
    trainer = trl.SFTTrainer(model=model, args=config,
                             train_dataset=datasets.load_dataset(args.dataset, split="train"))
    trainer.train()


if __name__ == "__main__":
    main()
