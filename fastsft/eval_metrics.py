"""Held-out metrics on generated replies (issue 25): the `eval_metrics:` list, parsed and scored.

No torch import: config validation parses the list (regexes compiled, JSON schemas checked, python
metrics imported) before any heavy import, so a bad entry is one line and exit 2 before training.

Every metric scores one reply in [0, 1] (a `python:` metric may return any finite number); higher is
better, and the eval's value is the mean over the held-out examples. Its name is the plain key used by
`gates:` and the summary (`contains`); the eval record in metrics.jsonl holds it as `eval_<name>`.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from fastsft.errors import ConfigError

KINDS = ("exact_match", "contains", "regex", "json", "python")
# names a metric may not take: they are the eval's own keys
RESERVED = ("loss", "forgetting", "forgetting_loss", "examples")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*?)\n?```$", re.DOTALL)


@dataclass
class Reply:
    """One held-out example's generation: the text before the reply, the reply, the reference."""
    index: int  # position in the eval split (0-based), for messages
    prompt: str
    reply: str
    reference: str
    ended: bool = True  # the reply stopped where the reference stops (EOS), for exact_match


@dataclass
class Metric:
    name: str
    kind: str
    score: Callable[[Reply], float]
    describe: str  # how the entry was written, for messages


def _exact_match(item: Reply) -> float:
    return float(item.ended and item.reply == item.reference)


def _contains(item: Reply) -> float:
    return float(bool(item.reference) and item.reference in item.reply)


def _strip_fence(text: str) -> str:
    """A reply wrapped in one markdown code fence (```json ... ```) is judged on what the fence holds."""
    match = _FENCE.match(text.strip())
    return match.group(1) if match else text


def _regex_metric(pattern: Any, where: str) -> Callable[[Reply], float]:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: regex needs a pattern string, got {pattern!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where}: regex {pattern!r} does not compile: {exc}") from None
    return lambda item: float(compiled.search(item.reply) is not None)


def _load_schema(schema: Any, where: str, config_dir: Optional[str]) -> dict:
    if isinstance(schema, str):
        path = schema if os.path.isabs(schema) or config_dir is None or os.path.exists(schema) \
            else os.path.join(config_dir, schema)
        try:
            with open(path, encoding="utf-8") as handle:
                schema = json.load(handle)
        except OSError as exc:
            raise ConfigError(f"{where}: JSON schema file {path!r} cannot be read ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: JSON schema file {path!r} is not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: schema must be a file or a mapping, got {schema!r}")
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - installed with the quality extra
        raise ConfigError(f"{where}: a JSON schema needs the jsonschema package: pip install 'fastsft[quality]'") \
            from None
    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise ConfigError(f"{where}: the JSON schema is not valid (at {at}: {exc.message})") from None
    return schema


def _json_metric(options: Any, where: str, config_dir: Optional[str]) -> Callable[[Reply], float]:
    if options in (None, True, "", {}):
        schema = None
    elif isinstance(options, dict) and set(options) <= {"schema"}:
        schema = _load_schema(options["schema"], where, config_dir)
    else:
        raise ConfigError(f"{where}: json takes no options or {{schema: FILE_OR_MAPPING}}, got {options!r}")
    validator = None
    if schema is not None:
        import jsonschema

        validator = jsonschema.validators.validator_for(schema)(schema)

    def score(item: Reply) -> float:
        try:
            value = json.loads(_strip_fence(item.reply))
        except ValueError:
            return 0.0
        return float(validator is None or validator.is_valid(value))

    return score


def _import_function(target: Any, where: str, config_dir: Optional[str]) -> Callable:
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ConfigError(f"{where}: python needs 'module:function', got {target!r}")
    module_name, function_name = target.split(":")
    # a metrics.py next to the config (or in the current directory) imports like an installed module
    extra = [p for p in (config_dir, os.getcwd()) if p and p not in sys.path]
    sys.path[:0] = extra
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own code failing
        raise ConfigError(f"{where}: python metric {target}: cannot import {module_name!r} "
                          f"({type(exc).__name__}: {exc})") from None
    finally:
        for path in extra:
            if path in sys.path:
                sys.path.remove(path)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{where}: python metric {target}: {module_name!r} has no function {function_name!r}")
    return function


def _python_metric(target: str, where: str, config_dir: Optional[str]) -> Callable[[Reply], float]:
    function = _import_function(target, where, config_dir)

    def score(item: Reply) -> float:
        try:
            value = function(item.prompt, item.reply, item.reference)
        except Exception as exc:
            raise ConfigError(f"python metric {target} raised on eval example {item.index}: "
                              f"{type(exc).__name__}: {exc}") from None
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"python metric {target} returned {value!r} for eval example {item.index}; "
                              f"it must return a finite number")
        return float(value)

    return score


def _entry(entry: Any, position: int, config_dir: Optional[str]) -> Metric:
    where = f"eval_metrics[{position}]"
    if isinstance(entry, str):
        kind, options, name = entry, None, None
    elif isinstance(entry, dict):
        options = dict(entry)
        name = options.pop("name", None)
        kinds = [k for k in options if k in KINDS]
        others = [k for k in options if k not in KINDS]
        if len(kinds) != 1 or others:
            raise ConfigError(f"{where}: expected one metric (known: {', '.join(KINDS)}) and optionally "
                              f"'name', got {entry!r}")
        kind = kinds[0]
        options = options[kind]
    else:
        raise ConfigError(f"{where}: expected a metric name or a mapping, got {entry!r}")
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown metric {kind!r}; known: {', '.join(KINDS)}")
    if kind == "exact_match" or kind == "contains":
        if options not in (None, True):
            raise ConfigError(f"{where}: {kind} takes no options, got {options!r}")
        score = _exact_match if kind == "exact_match" else _contains
    elif kind == "regex":
        score = _regex_metric(options, where)
    elif kind == "json":
        score = _json_metric(options, where, config_dir)
    else:
        score = _python_metric(options, where, config_dir)
        if name is None:
            name = str(options).split(":")[-1]  # the function's name
    name = kind if name is None else name
    if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED or name.startswith("eval_"):
        raise ConfigError(f"{where}: name {name!r} must be a plain identifier, not one of {', '.join(RESERVED)} "
                          f"and without the eval_ prefix")
    return Metric(name=name, kind=kind, score=score, describe=f"{where} ({kind})")


def parse_metrics(entries: Optional[Sequence[Any]], *, exact_match: bool = False,
                  config_dir: Optional[str] = None) -> List[Metric]:
    """The `eval_metrics:` list (plus exact_match when eval_exact_match is on), validated."""
    if entries is None:
        entries = []
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"config key 'eval_metrics' must be a list (e.g. [exact_match, contains]), got {entries!r}")
    metrics: List[Metric] = []
    for position, entry in enumerate(entries, start=1):
        metric = _entry(entry, position, config_dir)
        if any(m.name == metric.name for m in metrics):
            raise ConfigError(f"eval_metrics[{position}]: a second metric named {metric.name!r}; give one of them "
                              f"another with name: ...")
        metrics.append(metric)
    if exact_match and not any(m.kind == "exact_match" for m in metrics):
        metrics.insert(0, _entry("exact_match", 0, config_dir))
    return metrics


def config_metrics(config) -> List[Metric]:
    """The metrics a TrainConfig asks for (cached on it: python metrics are imported once)."""
    cached = getattr(config, "_eval_metrics", None)
    if cached is None:
        cached = parse_metrics(config.eval_metrics, exact_match=config.eval_exact_match,
                               config_dir=getattr(config, "_config_dir", None))
        config._eval_metrics = cached
    return cached


def score_replies(metrics: Sequence[Metric], replies: Sequence[Reply]) -> Dict[str, Any]:
    """{name: mean score} and, per reply, its scores (replies[i].scores)."""
    means: Dict[str, Any] = {}
    per_reply: List[Dict[str, float]] = [{} for _ in replies]
    for metric in metrics:
        values = [metric.score(item) for item in replies]
        for row, value in zip(per_reply, values):
            row[metric.name] = value
        means[metric.name] = sum(values) / len(values) if values else float("nan")
    return {"means": means, "per_reply": per_reply}


def check_python_metrics(metrics: Sequence[Metric], replies: Sequence[Reply]) -> None:
    """Before training: every python metric called on each held-out example with the reference as the
    reply, so one that raises or returns a non-number stops the run before anything is written."""
    for metric in metrics:
        if metric.kind == "python":
            for item in replies:
                metric.score(item)


def worst_rows(metrics: Sequence[Metric], replies: Sequence[Reply], per_reply: Sequence[Dict[str, float]],
               count: int) -> List[dict]:
    """The `count` lowest-scoring replies by the first metric (ties keep the eval split's order)."""
    if not metrics or count <= 0:
        return []
    first = metrics[0].name
    order = sorted(range(len(replies)), key=lambda i: per_reply[i][first])[:count]
    return [{"index": replies[i].index, "prompt": replies[i].prompt, "reply": replies[i].reply,
             "reference": replies[i].reference, "scores": per_reply[i]} for i in order]


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def worst_markdown(rows: Sequence[dict], metrics: Sequence[Metric], step: Optional[int]) -> str:
    names = [m.name for m in metrics]
    lines = [f"# Worst held-out examples{'' if step is None else f' at step {step}'} (by {names[0]})", "",
             "| # | " + " | ".join(names) + " | prompt | reply | reference |",
             "|---|" + "---|" * (len(names) + 3)]
    for row in rows:
        scores = " | ".join(f"{row['scores'][n]:.3g}" for n in names)
        lines.append(f"| {row['index']} | {scores} | {_cell(row['prompt'])} | {_cell(row['reply'])} | "
                     f"{_cell(row['reference'])} |")
    return "\n".join(lines) + "\n"


WORST_MD = "eval_worst.md"
WORST_JSONL = "eval_worst.jsonl"


def write_worst(folder: str, rows: Sequence[dict], metrics: Sequence[Metric], step: Optional[int]) -> List[str]:
    """eval_worst.md and eval_worst.jsonl in `folder` (the caller records the names in the manifest first)."""
    md, jsonl = os.path.join(folder, WORST_MD), os.path.join(folder, WORST_JSONL)
    with open(md, "w", encoding="utf-8") as handle:
        handle.write(worst_markdown(rows, metrics, step))
    with open(jsonl, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
    return [md, jsonl]
