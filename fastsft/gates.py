"""Quality gates (issue 25): thresholds on the final evaluation that fail a run for CI.

No torch import here: config validation checks the gates before the heavy imports.

A failed gate prints one line per failure and the command exits with EXIT_GATE_FAILED (3); the
model is still saved, and a GATE_FAILED file in its folder stops a pipeline from promoting it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from fastsft.errors import ConfigError

EXIT_GATE_FAILED = 3
GATE_FAILED_FILE = "GATE_FAILED"
# gate names always known; each eval_metrics entry adds its own name (fastsft.eval_metrics). A gate's
# value is the run summary's key of the same name (eval_contains is accepted for contains).
KNOWN_GATES = ("eval_loss", "exact_match", "forgetting")
BOUNDS = ("min", "max")


def summary_key(name: str) -> str:
    """The summary key a gate reads: eval_loss as it is, otherwise the plain metric name."""
    return name if name == "eval_loss" else name[len("eval_"):] if name.startswith("eval_") else name


def known_gates(metric_names=()) -> list:
    return sorted(set(KNOWN_GATES) | set(metric_names))


def check_gates(gates, metric_names=()) -> None:
    """Bad gate config: one line (exit 2) before training. `metric_names`: the eval_metrics' names."""
    if not gates:
        return
    if not isinstance(gates, dict):
        raise ConfigError(f"config key 'gates' must map a metric to {{min: x}} / {{max: x}}, got {gates!r}")
    known = known_gates(metric_names)
    for name, bound in gates.items():
        if summary_key(str(name)) not in known:
            raise ConfigError(f"gates: unknown metric {name!r}; known: {', '.join(known)} "
                              f"(eval_metrics: adds contains, regex, json, python metrics)")
        if not isinstance(bound, dict) or not bound or set(bound) - set(BOUNDS):
            raise ConfigError(f"gates.{name} must be {{min: x}}, {{max: x}} or both, got {bound!r}")
        for side, value in bound.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"gates.{name}.{side} must be a number, got {value!r}")


def gate_failures(gates: Dict[str, dict], values: Dict[str, Optional[float]]) -> List[str]:
    """One line per failed gate; a metric with no final value fails (a gate must not pass unmeasured)."""
    failures = []
    for name, bound in (gates or {}).items():
        value = values.get(summary_key(name))
        if value is None or value != value:  # None or NaN: not measured
            needs = {"exact_match": "an eval split and eval_exact_match: true (or exact_match in eval_metrics)",
                     "forgetting": "forgetting_dataset, measured before the first step"}
            failures.append(f"gate {name}: no value at the final eval (it needs "
                            f"{needs.get(summary_key(name), 'an eval split')})")
            continue
        if "min" in bound and value < bound["min"]:
            failures.append(f"gate {name}: {value:.4g} < min {bound['min']:g}")
        if "max" in bound and value > bound["max"]:
            failures.append(f"gate {name}: {value:.4g} > max {bound['max']:g}")
    return failures


def apply_gates(gates, summary: dict, output_dir: str, stream) -> bool:
    """Check the gates on a finished run's summary; on failure print the lines and mark the model folder."""
    failures = gate_failures(gates, summary)
    marker = os.path.join(output_dir, GATE_FAILED_FILE)
    if not failures:
        if os.path.exists(marker):  # a resumed run that now passes is no longer marked
            os.remove(marker)
        return True
    if int(os.environ.get("RANK", "0")) != 0:  # every rank fails the same way; one reports and marks
        return False
    for line in failures:
        print(line, file=stream, flush=True)
    from fastsft import run_dir

    if os.path.isfile(os.path.join(output_dir, run_dir.MANIFEST_FILE)):  # a run folder: --overwrite clears it
        run_dir.record(output_dir, [GATE_FAILED_FILE])
    with open(marker, "w") as handle:
        handle.write("\n".join(failures) + "\n")
    return False
