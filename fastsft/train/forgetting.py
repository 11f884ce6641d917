"""The forgetting probe (issue 25): loss per trained token on general data, before training and at each eval.

`forgetting` = loss now / loss before training - 1: how much worse the model got at the general data
while learning the task (0.10 = 10 % higher loss). The data goes through the same loader, template and
mask as the training data (text records train every token; chat records their assistant replies).
"""
from __future__ import annotations

from typing import Optional

from fastsft.errors import DataError


def prepare_probe(config, tokenizer) -> list:
    """The probe's examples (format detected, no held-out split), or DataError when none has a trained token."""
    from fastsft.data import DataOptions, prepare_data

    options = DataOptions(source=config.forgetting_dataset, split="train", format="auto", mask=config.mask,
                          max_seq_length=config.max_seq_length, truncation="truncate",
                          chat_template=config.chat_template, seed=config.seed, text_field=config.dataset_text_field)
    examples = prepare_data(options, tokenizer).train
    if not examples:
        raise DataError(f"{config.forgetting_dataset}: forgetting_dataset has no example with a trained token "
                        f"(mask {config.mask!r}); give plain text records ({{\"text\": ...}}) or chat data with replies")
    return examples


def relative_increase(loss_now: float, loss_before: Optional[float]) -> Optional[float]:
    """loss_now / loss_before - 1, or None without a baseline (a run resumed from before the probe existed)."""
    if loss_before is None or not loss_before > 0 or loss_now != loss_now:
        return None
    return loss_now / loss_before - 1.0


def describe(loss_now: float, increase: Optional[float]) -> str:
    if increase is None:
        return f"forgetting-probe loss {loss_now:.4f} (no baseline)"
    return f"forgetting {100 * increase:+.1f}% (probe loss {loss_now:.4f})"

