"""The trainer: ``fastsft.train.train(config)`` runs a whole job (see fastsft.config.TrainConfig).

Modules: loop (the loop), optim (optimizer + schedule), checkpoint (atomic save,
exact resume), evaluate (loss, exact match), metrics (metrics.jsonl, loss curve,
progress, summary), model (tokenizer / model / LoRA / QLoRA / patch), merge.
"""
from fastsft.train.loop import Trainer, TrainingError, TrainResult, train

__all__ = ["Trainer", "TrainResult", "TrainingError", "train"]
