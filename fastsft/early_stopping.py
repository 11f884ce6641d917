"""Early stopping and the best checkpoint (issue 25), with TrainingArguments' names.

`metric_for_best_model` names any number of the eval record (eval_loss by default; `loss` and `exact_match`
are read as `eval_loss` and `eval_exact_match`, as transformers prefixes `eval_`). `greater_is_better`
defaults to False for a name ending in `loss` or `forgetting`, True otherwise. As in transformers' EarlyStoppingCallback,
an eval resets the patience counter only when it beats the best by more than `early_stopping_threshold`,
while the best model follows every strict improvement. The eval at step 0 (eval_at_start) is the
untrained baseline and is not a candidate.

No torch import here: the config is checked before the heavy imports.
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Dict, List, Optional

from fastsft.errors import ConfigError

# the eval record's numbers: a metric name -> the record key that holds it, and the config it needs
BUILTIN_METRICS = {"eval_loss": None, "eval_exact_match": "eval_exact_match"}


def record_key(name: str) -> str:
    """'loss' -> 'eval_loss', 'exact_match' -> 'eval_exact_match' (transformers adds the eval_ prefix)."""
    return name if name.startswith("eval_") else f"eval_{name}"


def _extra_metric_names(config) -> List[str]:
    """The record keys of the config's eval_metrics (eval_<name>) and of the forgetting probe."""
    from fastsft.eval_metrics import config_metrics

    names = [record_key(m.name) for m in config_metrics(config)]
    if getattr(config, "forgetting_dataset", None):
        names += ["eval_forgetting", "eval_forgetting_loss"]
    return names


def known_metrics(config) -> Dict[str, Optional[str]]:
    """Every record key this config's evals produce -> the key that must be on for it (None: always)."""
    known = dict(BUILTIN_METRICS)
    for key in _extra_metric_names(config):
        known[key] = None  # listed in eval_metrics: measured whatever eval_exact_match says
    return known


def enabled(config) -> bool:
    """Is the best model tracked (early stopping, load_best_model_at_end or a metric named)?"""
    return bool(config.early_stopping_patience or config.load_best_model_at_end or config.metric_for_best_model)


def metric_name(config) -> str:
    return record_key(config.metric_for_best_model or "eval_loss")


def greater_is_better(config) -> bool:
    if config.greater_is_better is not None:
        return bool(config.greater_is_better)
    return not metric_name(config).endswith(("loss", "forgetting"))  # lower is better for both


def _periodic_evals(config) -> bool:
    return config.eval_strategy == "epoch" or (config.eval_strategy == "steps" and config.eval_steps > 0)


def check_config(config) -> None:
    """Bad early-stopping / best-model config: one line (exit 2) before anything loads."""
    patience = config.early_stopping_patience
    if patience is not None and patience <= 0:
        raise ConfigError(f"config key 'early_stopping_patience' must be a positive integer (evals without "
                          f"improvement before the run stops), got {patience}")
    if config.early_stopping_threshold < 0:
        raise ConfigError(f"config key 'early_stopping_threshold' must be >= 0, got {config.early_stopping_threshold}")
    if not enabled(config):
        return
    known = known_metrics(config)
    name = metric_name(config)
    if name not in known:
        listed = ", ".join(sorted(k[len("eval_"):] for k in known))
        raise ConfigError(f"config key 'metric_for_best_model': unknown metric {config.metric_for_best_model!r}; "
                          f"known: {listed}")
    needs = known[name]
    if needs and not getattr(config, needs, False):
        raise ConfigError(f"config key 'metric_for_best_model' {config.metric_for_best_model!r} is measured only "
                          f"with {needs}: true")
    key = "early_stopping_patience" if patience else (
        "load_best_model_at_end" if config.load_best_model_at_end else "metric_for_best_model")
    if not config.eval_dataset and config.eval_fraction == 0:
        raise ConfigError(f"config key {key!r} needs an eval split: set 'eval_dataset' or 'eval_fraction'")
    if (patience or config.load_best_model_at_end) and not _periodic_evals(config):
        raise ConfigError(f"config key {key!r} needs evaluations during training: set 'eval_steps' (with "
                          f"eval_strategy: steps) or eval_strategy: epoch")


class BestModel:
    """The best eval so far, its step, and the patience counter; saved in every checkpoint."""

    def __init__(self, metric: str, greater: bool, threshold: float = 0.0, patience: Optional[int] = None):
        self.metric, self.greater, self.threshold, self.patience = metric, greater, threshold, patience
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_record: Dict[str, float] = {}
        self.evals_without_improvement = 0
        self.evals = 0

    @classmethod
    def from_config(cls, config) -> Optional["BestModel"]:
        if not enabled(config):
            return None
        return cls(metric_name(config), greater_is_better(config), config.early_stopping_threshold,
                   config.early_stopping_patience)

    def _better(self, value: float, reference: float, margin: float) -> bool:
        return value > reference + margin if self.greater else value < reference - margin

    def update(self, step: int, value: float, record: dict) -> bool:
        """Count one eval; True when it is the new best model."""
        if step == 0:  # eval_at_start: the untrained baseline, never the model to keep
            return False
        self.evals += 1
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if finite and (self.best_value is None or self._better(value, self.best_value, self.threshold)):
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if finite and (self.best_value is None or self._better(value, self.best_value, 0.0)):
            self.best_value, self.best_step = float(value), step
            self.best_record = {k: v for k, v in record.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)}
            return True
        return False

    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def stop_line(self, step: int) -> str:
        margin = f" by more than {self.threshold:g}" if self.threshold else ""
        return (f"early stopping: {self.metric} has not improved{margin} for {self.evals_without_improvement} "
                f"evals (early_stopping_patience {self.patience}); stopping after step {step}, best "
                f"{self.best_value:.4g} at step {self.best_step}")

    def state(self) -> dict:
        return {"metric": self.metric, "greater": self.greater, "best_value": self.best_value,
                "best_step": self.best_step, "best_record": dict(self.best_record),
                "evals_without_improvement": self.evals_without_improvement, "evals": self.evals}

    def load_state(self, state: Optional[dict]) -> None:
        """A resumed run keeps the best score and step and the patience counter (same metric only)."""
        if not state or state.get("metric") != self.metric or state.get("greater") != self.greater:
            return
        self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
        self.best_record = dict(state.get("best_record") or {})
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        self.evals = int(state.get("evals", 0))


def rotate_checkpoints(checkpoints: List[tuple], keep: int, protect: Optional[int]) -> List[str]:
    """save_total_limit with the best checkpoint kept: remove all but the newest `keep` (step, path) pairs,
    never the one of step `protect`. Returns the removed paths."""
    if keep <= 0:
        return []
    removed = []
    for step, path in checkpoints[:-keep]:
        if step == protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def checkpoint_of(checkpoints: List[tuple], step: Optional[int]) -> Optional[str]:
    return next((path for s, path in checkpoints if s == step and os.path.isdir(path)), None)
