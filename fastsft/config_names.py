"""The names of the config keys: one-line help for each, and the aliases users bring from TRL,
transformers' TrainingArguments and Axolotl (no imports: `fastsft train --help` answers at once).

An alias is either a plain rename (``num_train_epochs`` -> ``num_epochs``) or a flag whose value
maps onto a fastsft key (``bf16: true`` -> ``precision: bf16``). The README's alias table is
checked against ALIASES by the tests.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

HELP: Dict[str, str] = {
    "model": "required: tiny-llama (a tiny Llama built from the data), a local model directory or a hub name",
    "tokenizer": "tokenizer directory or hub name (default: the model's own)",
    "model_config": "tiny-llama only: LlamaConfig fields to override (hidden_size, num_hidden_layers, ...)",
    "gates": "issue 25: {metric: {min: x, max: y}} on the final eval (eval_loss, exact_match, forgetting, "
             "any eval_metrics name); a failure exits 3",
    "eval_metrics": "issue 25: metrics on the eval replies: exact_match, contains, {regex: P}, json "
                    "(or {json: {schema: FILE}}), {python: module:function}; optional name: per entry",
    "eval_do_sample": "issue 25: sample the eval replies (seeded by seed) instead of greedy decoding",
    "eval_temperature": "issue 25: eval_do_sample's temperature",
    "eval_top_p": "issue 25: eval_do_sample's nucleus (top-p)",
    "eval_worst_examples": "issue 25: rows of eval_worst.md / eval_worst.jsonl, worst by the first metric (0: none)",
    "forgetting_dataset": "issue 25: general data (text or chat) whose loss is measured before training and at "
                          "each eval; forgetting = loss / loss before - 1",
    "tokenizer_vocab_size": "tiny-llama only: vocabulary of the BPE tokenizer trained on the data",
    "trust_remote_code": "let transformers run the model repository's own code",
    "mode": "lora | qlora (4-bit base + LoRA) | full fine-tuning",
    "patch_kernels": "swap in fastsft's fused Triton kernels (fastsft.patch_model)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora)",
    "lora_dropout": "dropout on the LoRA input, in [0, 1) (runs inside fastsft's fused LoRA path; 0.05 is common)",
    "lora_target_modules": "modules that get adapters: all-linear, or a list of names",
    "lora_bias": "none | all | lora_only: which biases train",
    "use_rslora": "rank-stabilised LoRA scaling (alpha / sqrt(r))",
    "lora_modules_to_save": "modules trained in full next to the adapters (e.g. [lm_head])",
    "bnb_4bit_quant_type": "qlora: nf4 | fp4",
    "bnb_4bit_use_double_quant": "qlora: quantise the quantisation scales too",
    "dataset": "training data: a .jsonl/.json/.parquet/.csv file, a directory or a datasets name",
    "datasets": "several training sources: a list of {path, format, mask, weight, split, text_field}",
    "dataset_split": "split to read from a directory, a datasets name or a JSON object of splits",
    "dataset_format": "auto | messages | prompt_completion | instruction | text",
    "mask": "trained tokens: assistant | last_assistant | completion | all",
    "dataset_text_field": "text format: the field that holds the text",
    "max_seq_length": "longest example in tokens (see truncation)",
    "truncation": "over-long examples: truncate | drop",
    "chat_template": "Jinja template (text or a .jinja file) overriding the tokenizer's; default: the tokenizer's own "
                     "(tiny-llama's is fastsft's ChatML)",
    "eval_dataset": "held-out data (same kinds as dataset)",
    "eval_fraction": "share of the training data held out for evaluation, in [0, 1)",
    "cache_dir": "cache the tokenised data here (reused while data, tokenizer and options are unchanged)",
    "packing": "pack examples into batch_tokens per micro-batch (no attention across examples)",
    "batch_tokens": "packing: tokens per micro-batch",
    "batch_size": "examples per micro-batch; with packing and no batch_tokens: batch_tokens = batch_size x max_seq_length",
    "pad_to_multiple_of": "pad micro-batches to a multiple of this many tokens",
    "max_steps": "optimizer steps; > 0 overrides num_epochs",
    "num_epochs": "passes over the training data (when max_steps <= 0); a fraction such as 1.5 is allowed",
    "gradient_accumulation_steps": "micro-batches per optimizer step (loss normalised by trained tokens)",
    "learning_rate": "peak learning rate",
    "weight_decay": "AdamW weight decay",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_epsilon": "AdamW epsilon",
    "optimizer": "adamw | adamw_8bit | paged_adamw_8bit | paged_adamw",
    "lr_scheduler": "linear | cosine | constant (after warmup)",
    "warmup_steps": "linear warmup steps",
    "warmup_ratio": "warmup as a share of the steps, in [0, 1] (when warmup_steps is 0)",
    "min_lr_ratio": "the schedule decays to learning_rate * min_lr_ratio, in [0, 1]",
    "max_grad_norm": "gradient clipping norm (<= 0: no clipping)",
    "precision": "auto | bf16 | fp16 | fp32 (auto: bf16 or fp16 on a GPU, fp32 on CPU)",
    "gradient_checkpointing": "recompute activations in the backward to save memory",
    "offload_activations": "with gradient_checkpointing: keep the saved activations in CPU memory",
    "nonfinite_loss": "a NaN/inf loss: stop (with a message) | skip the step",
    "seed": "seed of the weights of tiny-llama, the data order and dropout",
    "device": "auto | cpu | cuda",
    "distributed": "auto | ddp | fsdp: the engine under torchrun / --nproc N (auto: DDP for lora/qlora, FSDP2 for full)",
    "cpu_threads": "torch threads on CPU; 0 (default): the cores other work leaves free, at most the physical cores",
    # --- issue 23: sequence parallelism (Ulysses)
    "sequence_parallel": "N > 1: every packed micro-batch is split into N contiguous shards over N ranks "
                         "(Ulysses all-to-all around attention); needs --nproc / torchrun with N dividing it",
    "eval_steps": "evaluate every N steps (0: at the end only)",
    "eval_strategy": "steps (every eval_steps) | epoch (end of every epoch) | no (at the end of the run only)",
    "eval_at_start": "evaluate the untrained model first (a baseline)",
    "eval_exact_match": "also score greedy generations against the reference answers",
    "eval_max_new_tokens": "exact match: generation length limit",
    "eval_max_examples": "exact match: the first N held-out examples (0: all)",
    "eval_batch_size": "exact match: generation batch size",
    "output_dir": "where the run writes (relative: the current directory, or next to the config if it exists there)",
    "save_steps": "checkpoint every N steps (0: only the final model)",
    "save_strategy": "steps (every save_steps) | epoch (end of every epoch) | no (only the final model)",
    "save_total_limit": "checkpoints kept (0: all)",
    "logging_steps": "console line every N steps (metrics.jsonl gets every step)",
    "progress_bar": "auto | on | off",
    "report_to": "also log metrics to: none | tensorboard | wandb (or a list)",
    "overwrite_output_dir": "start over in an output_dir that holds a run (deletes it); --overwrite",
    "resume": "continue a run: true (newest checkpoint in output_dir), a run folder or a checkpoint",
    "resume_changed_config": "resume although keys that shape the run changed (new values from the resumed step)",
    # --- issue 24: DoRA
    "use_dora": "DoRA (weight-decomposed LoRA, peft's use_dora): a magnitude per output row; lora/qlora (QDoRA)",
    # --- issue 21
    "allow_zero_lr": "accept learning_rate: 0 or lora_alpha: 0 (a run that changes no weight); refused otherwise",
    # issue 22: long context
    "long_context": "auto | on | off: tiled MLP and loss chunk sized from memory (auto: only where needed)",
    "mlp_tile_tokens": "the MLP runs over tiles of N tokens when a batch has more (default: from free memory)",
    "loss_chunk_tokens": "token rows per logits chunk of the fused loss (default: from free memory)",
    # --- issue 27
    "self_check": "true | false | auto: each patched op checked on the first batch; one over the error rule runs PyTorch's",
    "cpu_ops": "fastest | patched: on CPU tensors keep each patched op only where it is faster than transformers' own (default), or all",
    # --- issue 25: early stopping, the best checkpoint, duplicates and contamination
    "early_stopping_patience": "stop after N evals without improvement of metric_for_best_model (default: never)",
    "early_stopping_threshold": "an eval resets the patience only when it beats the best by more than this",
    "metric_for_best_model": "eval metric that picks the best model: eval_loss (default), exact_match, ...",
    "greater_is_better": "is a larger metric better? (default: false for a name ending in loss or forgetting, true otherwise)",
    "load_best_model_at_end": "restore the best eval's checkpoint at the end (kept past save_total_limit) and save it",
    "dedup": "report | drop | off: exact/near duplicates in the training data and train/eval overlap",
    "dedup_threshold": "near-duplicates: Jaccard similarity of word shingles at or above this, in (0, 1]",
    # --- issue 29: torch.compile
    "torch_compile": "true: torch.compile the model before training (graph of the whole patched step, kernels as operators)",
    "torch_compile_backend": "auto (inductor; on CPU without a C++ compiler: aot_eager, said in one line) | inductor | aot_eager | eager | any torch.compile backend",
}


class Alias(NamedTuple):
    key: str  # the fastsft key
    origin: str  # where users know the name from
    values: Optional[Dict[Any, Any]] = None  # value map; None: the value is taken as it is


_TA, _TRL, _AX = "TrainingArguments", "TRL SFTConfig", "Axolotl"
_NO_CHANGE = object()  # the alias's value leaves the key alone (e.g. load_in_4bit: false)

ALIASES: Dict[str, Alias] = {
    "base_model": Alias("model", _AX),
    "model_name_or_path": Alias("model", _TRL),
    "num_train_epochs": Alias("num_epochs", _TA),
    "per_device_train_batch_size": Alias("batch_size", _TA),
    "per_device_eval_batch_size": Alias("eval_batch_size", _TA),
    "micro_batch_size": Alias("batch_size", _AX),
    "lr_scheduler_type": Alias("lr_scheduler", _TA),
    "max_length": Alias("max_seq_length", _TRL),
    "sequence_len": Alias("max_seq_length", _AX),
    "optim": Alias("optimizer", _TA, {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw": "adamw",
                                      "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit",
                                      "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw"}),
    "bf16": Alias("precision", _TA, {True: "bf16", False: _NO_CHANGE, "auto": "auto"}),
    "fp16": Alias("precision", _TA, {True: "fp16", False: _NO_CHANGE}),
    "load_in_4bit": Alias("mode", _AX, {True: "qlora", False: _NO_CHANGE}),
    "adapter": Alias("mode", _AX, {"lora": "lora", "qlora": "qlora"}),
    "assistant_only_loss": Alias("mask", _TRL, {True: "assistant", False: "all"}),
    "completion_only_loss": Alias("mask", _TRL, {True: "completion", False: "all"}),
    "train_on_inputs": Alias("mask", _AX, {True: "all", False: "assistant"}),
    "padding_free": Alias("packing", _TRL),
    "sample_packing": Alias("packing", _AX),
    "val_set_size": Alias("eval_fraction", _AX),
    "resume_from_checkpoint": Alias("resume", _TA),
    "evaluation_strategy": Alias("eval_strategy", _TA),
    "overwrite": Alias("overwrite_output_dir", "fastsft (--overwrite)"),
    # --- issue 21: more names users bring
    "cosine_min_lr_ratio": Alias("min_lr_ratio", _AX),
    "dataset_prepared_path": Alias("cache_dir", _AX),
    "load_in_8bit": Alias("mode", _AX, {False: _NO_CHANGE}),  # 8-bit LoRA is not supported: only false passes
}

# other names for a key's values (TrainingArguments / Axolotl spell fastsft's choices so)
VALUE_SYNONYMS: Dict[str, Dict[str, str]] = {
    "optimizer": {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
                  "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_32bit": "paged_adamw"},
    "lr_scheduler": {"cosine_with_min_lr": "cosine", "constant_with_warmup": "constant"},
}

# Axolotl / TrainingArguments keys that change nothing in what fastsft trains (attention backends fastsft
# replaces, logging targets, strictness): accepted, and listed in one line when the run starts
NO_EFFECT = frozenset({
    "flash_attention", "sdp_attention", "xformers_attention", "flash_attn_cross_entropy", "flash_attn_rms_norm",
    "strict", "tf32", "debug", "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model",
    "pad_to_sequence_len", "wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model",
    "wandb_run_id", "hub_model_id", "push_to_hub", "special_tokens", "local_rank", "lora_fan_in_fan_out",
    "dataloader_num_workers", "dataloader_pin_memory", "remove_unused_columns", "ddp_find_unused_parameters",
    "logging_first_step", "report_to_wandb", "bf16_full_eval", "fp16_full_eval",
})

# renames and value-mapped flags: giving both spellings of a rename is always an error; flags that
# agree with the key (load_in_4bit: true next to mode: qlora, as Axolotl configs write) are accepted
NO_CHANGE = _NO_CHANGE
