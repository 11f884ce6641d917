"""One typed training config, read from YAML and overridden by CLI flags.

Keys are flat (like TRL / Axolotl): ``model``, ``dataset``, ``output_dir``,
``mode``, ``max_steps``, ``learning_rate`` ... Every key is a field of
:class:`TrainConfig`; an unknown key or a value of the wrong type raises
:class:`fastsft.errors.ConfigError` naming the key (and the closest known key).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from fastsft.errors import ConfigError

# keys whose value must be one of a fixed set
CHOICES: Dict[str, tuple] = {
    "mode": ("lora", "qlora", "full"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "optimizer": ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"),
    "lr_scheduler": ("linear", "cosine", "constant"),
    "nonfinite_loss": ("stop", "skip"),
    "dataset_format": ("auto", "messages", "prompt_completion", "instruction", "text"),
    "mask": ("assistant", "last_assistant", "completion", "all"),
    "truncation": ("truncate", "drop"),
    "lora_bias": ("none", "all", "lora_only"),
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "device": ("auto", "cpu", "cuda"),
    "progress_bar": ("auto", "on", "off"),
    "distributed": ("auto", "ddp", "fsdp"),
}


@dataclass
class TrainConfig:
    # --- model
    model: str = "tiny-llama"  # "tiny-llama", a local directory or a hub name for AutoModelForCausalLM
    tokenizer: Optional[str] = None  # default: the model's own (tiny-llama: trained on the dataset)
    model_config: Dict[str, Any] = field(default_factory=dict)  # tiny-llama only: LlamaConfig overrides
    tokenizer_vocab_size: int = 512  # tiny-llama only: size of the BPE vocabulary trained on the data
    trust_remote_code: bool = False
    mode: str = "lora"
    patch_kernels: bool = True  # fastsft.patch_model: swap in the fused kernels
    # --- LoRA / QLoRA (peft LoraConfig)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: Union[str, List[str]] = "all-linear"
    lora_bias: str = "none"
    use_rslora: bool = False
    lora_modules_to_save: Optional[List[str]] = None
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    # --- data (fastsft.data.DataOptions)
    dataset: Optional[str] = None
    dataset_split: str = "train"
    dataset_format: str = "auto"
    mask: str = "assistant"
    max_seq_length: int = 2048
    truncation: str = "truncate"
    chat_template: Optional[str] = None
    eval_dataset: Optional[str] = None
    eval_fraction: float = 0.0
    cache_dir: Optional[str] = None
    packing: bool = True
    batch_tokens: int = 4096  # packing: tokens per micro-batch
    batch_size: int = 1  # no packing: examples per (padded) micro-batch
    pad_to_multiple_of: int = 1
    # --- optimisation
    max_steps: int = -1  # > 0 overrides num_epochs
    num_epochs: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optimizer: str = "adamw"
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    min_lr_ratio: float = 0.0  # the schedule decays to learning_rate * min_lr_ratio
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    precision: str = "auto"  # auto: bf16 on GPUs with bf16, else fp16 (+ grad scaler); fp32 on CPU
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # keep checkpointed activations in CPU memory
    nonfinite_loss: str = "stop"  # "stop": stop the run with a message; "skip": drop the step
    seed: int = 0
    device: str = "auto"
    cpu_threads: int = 0  # > 0: torch intra-op threads on CPU (tiny models run best on 1-2)
    distributed: str = "auto"  # torchrun / --nproc: ddp | fsdp | auto (DDP for lora/qlora, FSDP2 for full)
    # --- evaluation
    eval_steps: int = 0  # 0: evaluate only at the end (when there is an eval split)
    eval_at_start: bool = True  # measure the untrained model first (baseline)
    eval_exact_match: bool = False  # greedy generation compared with the reference answer
    eval_max_new_tokens: int = 64
    eval_max_examples: int = 0  # 0: all; else the first N held-out examples for exact match
    eval_batch_size: int = 32  # generation batch size for exact match
    # --- output
    output_dir: str = "outputs/run"
    save_steps: int = 0  # 0: no intermediate checkpoints (the final model is always written)
    save_total_limit: int = 2
    logging_steps: int = 1  # console lines every N steps (metrics.jsonl gets every step)
    progress_bar: str = "auto"  # auto: a tqdm bar on a terminal, plain log lines otherwise
    overwrite_output_dir: bool = False  # start over in an output_dir that holds checkpoints (deletes them)
    resume: Union[bool, str] = False  # true / "latest": the newest checkpoint in output_dir; or a path

    def data_options(self):
        from fastsft.data import DataOptions

        return DataOptions(
            source=self.dataset,
            split=self.dataset_split,
            format=self.dataset_format,
            mask=self.mask,
            max_seq_length=self.max_seq_length,
            truncation=self.truncation,
            chat_template=self.chat_template,
            eval_source=self.eval_dataset,
            eval_fraction=self.eval_fraction,
            seed=self.seed,
            cache_dir=self.cache_dir,
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp, where: str) -> Any:
    """Check (and mildly coerce) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"config key {key!r}{where}: expected {names}, got {value!r} ({type(value).__name__})")
    if origin in (list, List):
        if isinstance(value, str):  # a CLI convenience: "q_proj,v_proj"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}{where}: expected a list, got {value!r} ({type(value).__name__})")
        return [_coerce(key, v, args[0], where) for v in value] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key {key!r}{where}: expected true or false, got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r}{where}: expected an integer, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}{where}: expected a number, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a model directory named 123
        raise ConfigError(f"config key {key!r}{where}: expected a string, got {value!r} ({type(value).__name__})")
    raise ConfigError(f"config key {key!r}{where}: unsupported type {tp}")  # pragma: no cover


def _set(values: Dict[str, Any], key: str, value: Any, where: str) -> None:
    if key not in FIELDS:
        raise _unknown_key(key, where)
    if key == "progress_bar" and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a boolean
    value = _coerce(key, value, _HINTS[key], where)
    if key in CHOICES and value is not None and value not in CHOICES[key]:
        allowed = ", ".join(CHOICES[key])
        close = difflib.get_close_matches(str(value), CHOICES[key], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key {key!r}{where}: {value!r} is not one of {allowed}{hint}")
    values[key] = value


def parse_overrides(args: Sequence[str]) -> List[tuple]:
    """``["--max_steps", "10", "--packing=false", "--bf16"]`` -> [(key, raw_value), ...].

    Values are parsed as YAML scalars (``10`` -> int, ``false`` -> bool). A flag
    with no value (followed by another flag or nothing) means ``true``.
    Dashes in names are underscores (``--max-steps``).
    """
    import yaml

    pairs = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written --key value or --key=value")
        name = arg[2:]
        if "=" in name:
            name, raw = name.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        key = name.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), **values: Any) -> TrainConfig:
    """Read a YAML config file, then apply CLI overrides (``--key value``), then keyword values.

    Relative ``dataset`` / ``eval_dataset`` paths that do not exist from the
    current directory are looked up next to the config file.
    """
    import yaml

    merged: Dict[str, Any] = {}
    config_dir = None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        config_dir = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as handle:
            try:
                data = yaml.safe_load(handle)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                line = f" line {mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}")
        for key, value in data.items():
            _set(merged, str(key), value, f" in {path}")
    for key, value in parse_overrides(overrides):
        _set(merged, key, value, f" (command-line flag --{key})")
    for key, value in values.items():
        _set(merged, key, value, "")
    config = TrainConfig(**merged)
    if config_dir is not None:
        for key in ("dataset", "eval_dataset"):
            value = getattr(config, key)
            if value and not os.path.isabs(value) and not os.path.exists(value):
                candidate = os.path.join(config_dir, value)
                if os.path.exists(candidate):
                    setattr(config, key, candidate)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks that span keys or ranges (types were checked on the way in)."""
    if not config.dataset:
        raise ConfigError("config key 'dataset' is required (a .jsonl/.json/.parquet/.csv file, a directory or a dataset name)")
    positive = ("batch_tokens", "batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_r",
                "num_epochs", "logging_steps", "eval_batch_size", "pad_to_multiple_of", "eval_max_new_tokens")
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {getattr(config, key)}")
    non_negative = ("save_steps", "eval_steps", "warmup_steps", "warmup_ratio", "eval_max_examples", "learning_rate",
                    "weight_decay", "lora_dropout", "min_lr_ratio", "save_total_limit", "cpu_threads")
    for key in non_negative:
        if getattr(config, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(config, key)}")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ConfigError(f"config key 'eval_fraction' must be in [0, 1), got {config.eval_fraction}")
    if config.packing and config.batch_tokens < config.max_seq_length:
        raise ConfigError(
            f"config key 'batch_tokens' ({config.batch_tokens}) must be >= 'max_seq_length' "
            f"({config.max_seq_length}) so that every example fits in a packed micro-batch"
        )
    if config.model_config and config.model != "tiny-llama":
        raise ConfigError("config key 'model_config' applies only to model: tiny-llama")
    if config.offload_activations and not config.gradient_checkpointing:
        raise ConfigError("config key 'offload_activations' needs 'gradient_checkpointing: true'")
    if isinstance(config.resume, str) and config.resume.lower() in ("true", "false", "yes", "no"):
        config.resume = config.resume.lower() in ("true", "yes")
