"""How far an exported model drifts from the trained one: logits on a few held-out examples.

The numbers are the max absolute logit difference and the mean KL(trained || exported) per token,
so a user can tell a rounding-level export (KL ~1e-6) from one that changed the model.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

REPORT_FILE = "merge_report.json"
_FALLBACK_CHATS = (
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Add 17 and 25."}, {"role": "assistant", "content": "17 + 25 = 42."}],
)


def find_run_config(model_dir: str) -> Optional[str]:
    """fastsft_config.yaml of the run that wrote `model_dir` (the run folder or one of its checkpoints)."""
    for folder in (model_dir, os.path.dirname(os.path.dirname(os.path.abspath(model_dir)))):
        path = os.path.join(folder, "fastsft_config.yaml")
        if os.path.isfile(path):
            return path
    return None


def held_out_examples(model_dir: str, tokenizer, count: int = 4, max_tokens: int = 256) -> tuple:
    """Token id lists to compare on, and where they came from.

    The run's evaluation split when its config and data are still there (else the last training
    examples, which the merge did not see either); otherwise fixed chats in the tokenizer's template.
    """
    config_path = find_run_config(model_dir)
    if config_path is not None:
        try:
            import yaml

            from fastsft.config import load_config
            from fastsft.data.prepare import prepare_data

            with open(config_path, encoding="utf-8") as handle:
                values = yaml.safe_load(handle) or {}
            if values.get("dataset") and os.path.exists(str(values["dataset"])):
                config = load_config(None, (), **{k: v for k, v in values.items() if v is not None})
                options = config.data_options()
                data = prepare_data(options, tokenizer)
                examples = (data.eval or data.train[-count:])[:count]
                if examples:
                    where = "eval split" if data.eval else "last training examples"
                    return [list(e.input_ids[:max_tokens]) for e in examples], f"{where} of {values['dataset']}"
        except Exception as exc:  # the data moved or changed shape: the fixed chats still measure drift
            import logging

            logging.getLogger("fastsft.export").info("drift: run data not usable (%s); using fixed chats",
                                                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    ids = []
    for chat in _FALLBACK_CHATS:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(chat, tokenize=False)
        else:
            rendered = "\n".join(m["content"] for m in chat)
        ids.append(tokenizer(rendered, add_special_tokens=False)["input_ids"][:max_tokens])
    return ids, "fixed chats"


@torch.no_grad()
def logits_of(model, examples: Sequence[List[int]]) -> List[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in examples]


def compare_logits(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> dict:
    """max |a - b| and mean KL(reference || other) over every token of every example."""
    max_abs, kl_sum, tokens = 0.0, 0.0, 0
    for a, b in zip(reference, other):
        vocab = min(a.shape[-1], b.shape[-1])  # a GGUF vocab may drop padding rows
        a, b = a[..., :vocab].double(), b[..., :vocab].double()
        max_abs = max(max_abs, float((a - b).abs().max()))
        pa, lpa, lpb = a.softmax(-1), a.log_softmax(-1), b.log_softmax(-1)
        kl_sum += float((pa * (lpa - lpb)).sum())
        tokens += a.shape[0]
    return {"max_abs_logit_diff": max_abs, "mean_kl": kl_sum / max(tokens, 1), "tokens": tokens}


def drift_line(report: dict) -> str:
    return (f"drift vs the trained model ({report['reference']}) on {report['examples']} held-out examples "
            f"({report['tokens']} tokens): max |logit diff| {report['max_abs_logit_diff']:.3g}, "
            f"mean KL {report['mean_kl']:.3g}")


def write_report(directory: str, report: dict) -> str:
    path = os.path.join(directory, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return path
