"""DataOptions: every knob of data preparation, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from fastsft.data.templates import check_template_option
from fastsft.errors import ConfigError

FORMATS = ("auto", "messages", "prompt_completion", "instruction", "text")
MASKS = ("assistant", "last_assistant", "completion", "all")
TRUNCATIONS = ("truncate", "drop")


@dataclass
class DataOptions:
    """How to load, render, mask and cut a dataset.

    source: a .jsonl/.json/.parquet/.csv file, a directory (a `save_to_disk`
        dataset or data files), or a `datasets.load_dataset` name.
    format: "auto" detects it from the fields of the first example.
    mask: which tokens are trained (see fastsft.data.render for the rules per format).
    truncation: "truncate" keeps the first max_seq_length tokens, "drop" drops
        over-long examples; both are counted in DataStats.
    chat_template: None or "tokenizer" for the tokenizer's own template; a name
        of a template shipped with fastsft (fastsft.data.templates: chatml, llama3,
        llama3.1, qwen2.5, qwen3, mistral, gemma, phi3, phi4, deepseek, zephyr;
        "default" = chatml); a path to a .jinja file; or Jinja text.
    eval_fraction: share of the training examples held out for evaluation
        (only when eval_source is None), chosen by `seed`.
    cache_dir: where tokenised data is cached (None = no cache).
    text_field: the field holding the text of the text format (TRL's dataset_text_field).
    num_workers: processes that render and tokenise (1 = in this process); the
        result does not depend on it. Workers are spawned, so a script calling
        prepare_data with num_workers > 1 needs an `if __name__ == "__main__":` guard.
    """

    source: str
    split: str = "train"
    format: str = "auto"
    mask: str = "assistant"
    max_seq_length: int = 2048
    truncation: str = "truncate"
    chat_template: Optional[str] = None
    eval_source: Optional[str] = None
    eval_fraction: float = 0.0
    seed: int = 0
    cache_dir: Optional[str] = None
    num_workers: int = 1
    text_field: str = "text"

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"data source must be a non-empty path or dataset name, got {self.source!r}")
        _check_choice("format", self.format, FORMATS)
        _check_choice("mask", self.mask, MASKS)
        _check_choice("truncation", self.truncation, TRUNCATIONS)
        length = self.max_seq_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ConfigError(f"max_seq_length must be an integer >= 2, got {self.max_seq_length!r}")
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.eval_source is not None and self.eval_fraction > 0:
            raise ConfigError("give either eval_source or eval_fraction, not both")
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template.strip()):
            raise ConfigError(
                f"chat_template must be a template name, a .jinja path or Jinja text, got {self.chat_template!r}")
        check_template_option(self.chat_template)
        workers = self.num_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"num_workers must be a positive integer, got {workers!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"text_field must name a field, got {self.text_field!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
