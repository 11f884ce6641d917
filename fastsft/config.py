"""One typed training config, read from YAML and overridden by CLI flags.

Keys are flat (like TRL / Axolotl): ``model``, ``dataset``, ``output_dir``,
``mode``, ``max_steps``, ``learning_rate`` ... Every key is a field of
:class:`TrainConfig`; an unknown key or a value of the wrong type raises
:class:`fastsft.errors.ConfigError` naming the key (and the closest known key).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from fastsft.config_names import ALIASES, HELP, NO_CHANGE, NO_EFFECT, VALUE_SYNONYMS
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
    "save_strategy": ("steps", "epoch", "no"),
    "eval_strategy": ("steps", "epoch", "no"),
    "long_context": ("auto", "on", "off"),  # issue 22
    "dedup": ("report", "drop", "off"),  # issue 25
}


@dataclass
class TrainConfig:
    # --- model
    model: Optional[str] = None  # required: "tiny-llama", a local directory or a hub name for AutoModelForCausalLM
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
    datasets: Optional[List[Any]] = None  # several sources: [{path, format, mask, weight, split, text_field}]
    dataset_split: str = "train"
    dataset_format: str = "auto"
    mask: str = "assistant"
    dataset_text_field: str = "text"  # format text: the field holding the text
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
    num_epochs: float = 1.0  # a fraction trains on the first part of the last epoch (TRL's num_train_epochs: 1.5)
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
    eval_strategy: str = "steps"  # steps: every eval_steps; epoch: at the end of every epoch; no: at the end only
    eval_at_start: bool = True  # measure the untrained model first (baseline)
    eval_exact_match: bool = False  # greedy generation compared with the reference answer
    eval_max_new_tokens: int = 64
    eval_max_examples: int = 0  # 0: all; else the first N held-out examples for exact match
    eval_batch_size: int = 32  # generation batch size for exact match
    # --- output
    output_dir: str = "outputs/run"
    save_steps: int = 0  # 0: no intermediate checkpoints (the final model is always written)
    save_strategy: str = "steps"  # steps: every save_steps; epoch: at the end of every epoch; no: none
    save_total_limit: int = 2
    logging_steps: int = 1  # console lines every N steps (metrics.jsonl gets every step)
    progress_bar: str = "auto"  # auto: a tqdm bar on a terminal, plain log lines otherwise
    report_to: Union[str, List[str]] = "none"  # none | tensorboard | wandb, or a list
    overwrite_output_dir: bool = False  # start over in an output_dir that holds checkpoints (deletes them)
    resume: Union[bool, str] = False  # true / "latest": the newest checkpoint in output_dir; or a path
    resume_changed_config: bool = False  # resume although keys other than RESUME_FREE_KEYS changed
    # --- issue 24: DoRA
    use_dora: bool = False  # peft LoraConfig(use_dora=True): a trained magnitude per output row (fused by fastsft)
    # --- issue 21: values no one means
    allow_zero_lr: bool = False  # accept learning_rate: 0 / lora_alpha: 0 (a run that changes nothing)
    # --- issue 22: long context on one GPU
    long_context: str = "auto"  # auto: MLP tiles / loss chunk from the memory figures; on: always; off: neither
    mlp_tile_tokens: Optional[int] = None  # the MLP runs over tiles of N tokens above N tokens (None: from memory)
    loss_chunk_tokens: Optional[int] = None  # token rows per logits chunk of the loss (None: from memory)
    # --- issue 23: sequence parallelism (Ulysses)
    sequence_parallel: int = 1  # > 1: each packed micro-batch split over this many ranks (torchrun / --nproc)
    # --- issue 27: self-check of every patched op at step 0
    self_check: Union[bool, str] = "auto"  # auto: wherever the kernels run (GPU; CPU under the interpreter)
    cpu_ops: str = "fastest"  # on CPU tensors each patched op only where it beats transformers' own; patched: all
    # --- issue 25: quality loop
    gates: Dict[str, Any] = field(default_factory=dict)  # {metric: {min: x, max: y}} checked at the final eval
    # --- issue 25: early stopping, the best checkpoint, duplicates and contamination
    early_stopping_patience: Optional[int] = None  # stop after N evals without improvement (None: never)
    early_stopping_threshold: float = 0.0  # an improvement must beat the best by more than this
    metric_for_best_model: Optional[str] = None  # any eval metric (default eval_loss)
    greater_is_better: Optional[bool] = None  # default: False for a name ending in loss, True otherwise
    load_best_model_at_end: bool = False  # the final model is the best eval's checkpoint
    dedup: str = "report"  # report | drop | off: duplicates and train/eval overlap before training
    dedup_threshold: float = 0.85  # near-duplicate: Jaccard similarity of word shingles (MinHash LSH)
    # --- issue 25: held-out metrics and the forgetting probe (fastsft.eval_metrics, fastsft.train.forgetting)
    eval_metrics: List[Any] = field(default_factory=list)  # exact_match | contains | {regex: P} | json | {python: m:f}
    eval_do_sample: bool = False  # sample the eval replies (seeded by seed) instead of greedy decoding
    eval_temperature: float = 1.0  # eval_do_sample: the sampling temperature
    eval_top_p: float = 1.0  # eval_do_sample: nucleus sampling
    eval_worst_examples: int = 10  # rows of eval_worst.md / .jsonl (0: none written)
    forgetting_dataset: Optional[str] = None  # general data whose loss is measured before training and at each eval
    # --- issue 29: torch.compile of the trained model
    torch_compile: bool = False  # compile the model (module.compile) before training, as TRL's torch_compile does
    torch_compile_backend: str = "auto"  # auto: inductor (on CPU only with a C++ compiler, else aot_eager), or a name

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
            text_field=self.dataset_text_field,
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
REPORTERS = ("none", "tensorboard", "wandb")
DATASET_ENTRY_KEYS = ("path", "split", "format", "mask", "weight", "text_field")
# Axolotl's dataset `type` names for fastsft's formats
AXOLOTL_TYPES = {"alpaca": "instruction", "sharegpt": "messages", "chat_template": "messages", "completion": "text"}


def _unknown_key(key: str, where: str) -> ConfigError:
    # close names only: a far-fetched suggestion (per_device_train_batch_size -> eval_batch_size) misleads
    close = difflib.get_close_matches(key, list(FIELDS) + list(ALIASES), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint} (fastsft train --help lists the keys)")


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
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
    if key in ("progress_bar", "long_context") and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a boolean
    if key == "dedup" and isinstance(value, bool):  # issue 25: `dedup: off` (YAML 1.1: false)
        value = "report" if value else "off"
    value = _coerce(key, value, _HINTS[key], where)
    if isinstance(value, str) and value.lower() in VALUE_SYNONYMS.get(key, {}):
        value = VALUE_SYNONYMS[key][value.lower()]  # adamw_torch -> adamw: the same optimizer, another name
    if key in CHOICES and value is not None and value not in CHOICES[key]:
        allowed = ", ".join(CHOICES[key])
        close = difflib.get_close_matches(str(value), CHOICES[key], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key {key!r}{where}: {value!r} is not one of {allowed}{hint}")
    values[key] = value


def _canonical(key: str, value: Any, where: str) -> tuple:
    """(fastsft key, value) for a key that may be an alias; the value may be NO_CHANGE."""
    alias = ALIASES.get(key)
    if alias is None:
        if key not in FIELDS:
            raise _unknown_key(key, where)
        return key, value
    if alias.values is None:
        return alias.key, value
    lookup = value
    if isinstance(value, str) and value.lower() in alias.values:  # bf16: auto (Axolotl)
        lookup = value.lower()
    elif any(isinstance(k, bool) for k in alias.values):
        lookup = _coerce(key, value, bool, where)
    elif isinstance(value, str):
        lookup = value.lower()
    if lookup not in alias.values:
        allowed = ", ".join(str(k).lower() for k in alias.values)
        raise ConfigError(f"config key {key!r}{where} (alias of {alias.key!r}): {value!r} is not one of {allowed}")
    return alias.key, alias.values[lookup]


def _unknown_keys(keys: List[str], where: str) -> ConfigError:
    """Every unknown key of one source in one line (an Axolotl config brings several at once)."""
    if len(keys) == 1:
        return _unknown_key(keys[0], where)
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, list(FIELDS) + list(ALIASES), n=1, cutoff=0.8)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"unknown config keys{where}: {', '.join(parts)}; remove them (fastsft train --help lists "
                       f"the keys)")


def as_written(message: str, written: Dict[str, str]) -> str:
    """Name each key in a message the way the user wrote it ('val_set_size', not 'eval_fraction')."""
    for canonical, name in written.items():
        if name != canonical:
            message = message.replace(f"'{canonical}'", f"'{name}' ({canonical})")
    return message


def _apply_layer(merged: Dict[str, Any], items, where_of, written: Optional[Dict[str, str]] = None,
                 notes: Optional[List[str]] = None) -> None:
    """One source of values (the file, the flags or keyword values); two spellings of a key in one
    source are an error, except a value-mapped flag that agrees (load_in_4bit: true with mode: qlora).
    `written` collects each key's name as the user wrote it; `notes` the keys ignored as without effect."""
    items = list(items)
    unknown = [k for k, _ in items if k not in FIELDS and k not in ALIASES and k not in NO_EFFECT]
    if unknown:
        raise _unknown_keys(unknown, where_of(unknown[0]))
    ignored = [k for k, _ in items if k in NO_EFFECT and k not in FIELDS]
    if ignored and notes is not None:
        notes.append(f"ignored, with no effect in fastsft: {', '.join(ignored)}")
    items = [(k, v) for k, v in items if k not in ignored]
    written = {} if written is None else written
    spelled: Dict[str, tuple] = {}  # fastsft key -> (name as written, value)
    layer: Dict[str, Any] = {}
    for key, value in items:
        where = where_of(key)
        canonical, mapped = _canonical(key, value, where)
        if mapped is NO_CHANGE:
            continue
        if canonical in spelled and spelled[canonical][0] != key:
            other, other_value = spelled[canonical]
            renames = ALIASES.get(key, None), ALIASES.get(other, None)
            plain = any(a is not None and a.values is None for a in renames) or all(a is None for a in renames)
            if plain or other_value != mapped:
                raise ConfigError(f"config keys {other!r} and {key!r}{where} both set {canonical!r}; keep one")
        spelled[canonical] = (key, mapped)
        try:
            _set(layer, canonical, mapped, where)
        except ConfigError as exc:
            raise ConfigError(as_written(str(exc), {canonical: key})) from None
        written[canonical] = key
    merged.update(layer)


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


def _resolve_relative(value: str, config_dir: Optional[str]) -> tuple:
    """(path, base) for a relative path: the current directory, or next to the config file when it exists
    only there (so a config moved with its data keeps working)."""
    if not value or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value), None
    if config_dir is not None and not os.path.exists(value) and os.path.exists(os.path.join(config_dir, value)):
        return os.path.join(config_dir, value), f"next to the config file, {config_dir}"
    return os.path.abspath(value), "relative to the current directory"


def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping, naming both lines (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise ConfigError(f"{self.name} lines {seen[key]} and {line} both set {key!r}; keep one")
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), **values: Any) -> TrainConfig:
    """Read a YAML config file, then apply CLI overrides (``--key value``), then keyword values.

    Aliases (ALIASES: TRL / TrainingArguments / Axolotl names) map onto fastsft's keys. Relative
    ``dataset`` / ``eval_dataset`` / ``output_dir`` / ``resume`` / ``chat_template`` (.jinja) paths that do not exist from the
    current directory but do next to the config file are taken from there.
    """
    import yaml

    merged: Dict[str, Any] = {}
    written: Dict[str, str] = {}  # fastsft key -> the name the user wrote
    notes: List[str] = []
    config_dir = None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        config_dir = os.path.dirname(os.path.abspath(path))
        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.load(handle, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte offset {exc.start}: {exc.reason})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}")
        _apply_layer(merged, [(str(k), v) for k, v in data.items()], lambda key: f" in {path}", written, notes)
    _apply_layer(merged, parse_overrides(overrides), lambda key: f" (command-line flag --{key})", written, notes)
    _apply_layer(merged, list(values.items()), lambda key: "", written, notes)
    _batch_budget(merged, written, notes)
    config = TrainConfig(**merged)
    config._notes = notes  # lines the trainer prints (where relative paths were found, keys ignored)
    config._written = written
    config._config_dir = config_dir  # issue 25: python metrics and JSON schemas next to the config
    for key in ("dataset", "eval_dataset", "output_dir", "forgetting_dataset"):
        value = getattr(config, key)
        if value:
            resolved, base = _resolve_relative(value, config_dir)
            if key in ("dataset", "eval_dataset", "forgetting_dataset"):
                # a relative name that exists nowhere may be a datasets hub name: keep it as written
                if base is not None and not os.path.exists(resolved):
                    continue
            setattr(config, key, resolved)
            if key == "output_dir" and base is not None:
                config._notes.append(f"output_dir: {resolved} ({base})")
    template = config.chat_template
    if isinstance(template, str) and template.endswith(".jinja") and "{" not in template:
        config.chat_template = _resolve_relative(template, config_dir)[0]  # a template file travels with its config
    if isinstance(config.resume, str) and config.resume.lower() not in ("true", "false", "yes", "no", "latest", ""):
        config.resume = _resolve_relative(config.resume, config_dir)[0]
    for entry in config.datasets or []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
            resolved, base = _resolve_relative(entry["path"], config_dir)
            if base is None or os.path.exists(resolved):
                entry["path"] = resolved
    try:
        validate(config)
    except ConfigError as exc:
        raise ConfigError(as_written(str(exc), written)) from None
    return config


def _batch_budget(merged: Dict[str, Any], written: Dict[str, str], notes: List[str]) -> None:
    """Under packing a batch size counts sequences of max_seq_length tokens, as in Axolotl and TRL:
    batch_tokens = batch size x max_seq_length, unless batch_tokens is given (then it wins, said once)."""
    if not merged.get("packing", FIELDS["packing"].default) or "batch_size" not in written:
        return
    size = merged["batch_size"]
    name = written["batch_size"]
    length = merged.get("max_seq_length", FIELDS["max_seq_length"].default)
    if "batch_tokens" in written:
        if merged.get("batch_tokens") != size * length:
            notes.append(f"packing: batch_tokens {merged.get('batch_tokens')} wins over {name} {size} "
                         f"(= {size * length} tokens)")
        return
    if isinstance(size, int) and isinstance(length, int) and size > 0 and length > 0:
        merged["batch_tokens"] = size * length
        notes.append(f"packing: {name} {size} x max_seq_length {length} = batch_tokens {size * length} per micro-batch")


def _check_datasets(entries: List[Dict[str, Any]]) -> None:
    from fastsft.data.options import FORMATS, MASKS  # no heavy imports there

    for n, entry in enumerate(entries, start=1):
        where = f"config key 'datasets', entry {n}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with 'path' (and format, mask, weight, split), got {entry!r}")
        if "type" in entry and "format" not in entry:  # Axolotl's spelling
            kind = entry.pop("type")
            entry["format"] = AXOLOTL_TYPES.get(kind, kind)
        for key in entry:
            if key not in DATASET_ENTRY_KEYS:
                close = difflib.get_close_matches(key, DATASET_ENTRY_KEYS, n=1, cutoff=0.7)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(DATASET_ENTRY_KEYS)}){hint}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{where}: 'path' (a file, directory or datasets name) is required")
        for key, choices in (("format", FORMATS), ("mask", MASKS)):
            if key in entry and entry[key] not in choices:
                raise ConfigError(f"{where}: {key} {entry[key]!r} is not one of {', '.join(choices)}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 100:
            raise ConfigError(f"{where}: weight must be a number in (0, 100], got {weight!r}")
        for key in ("split", "text_field"):
            if key in entry and not isinstance(entry[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {entry[key]!r}")


def validate(config: TrainConfig) -> None:
    """Checks that span keys or ranges (types were checked on the way in)."""
    from fastsft.eval_metrics import config_metrics  # issue 25
    from fastsft.gates import check_gates

    check_gates(config.gates, [m.name for m in config_metrics(config)])
    if not config.eval_temperature > 0 or not 0 < config.eval_top_p <= 1 or config.eval_worst_examples < 0:
        raise ConfigError(f"config keys eval_temperature (> 0), eval_top_p (in (0, 1]) and eval_worst_examples (>= 0): "
                          f"got {config.eval_temperature}, {config.eval_top_p}, {config.eval_worst_examples}")
    from fastsft import early_stopping  # issue 25: early stopping, best model, dedup
    from fastsft.data.dedup import check_dedup

    early_stopping.check_config(config)
    check_dedup(config)
    if isinstance(config.resume, str) and config.resume.lower() in ("true", "false", "yes", "no", ""):
        config.resume = config.resume.lower() in ("true", "yes")
    if not config.model:
        raise ConfigError("config key 'model' is required: a local model directory, a hub name, "
                          "or tiny-llama for a tiny model built from the data")
    if config.datasets and config.dataset:
        raise ConfigError("config keys 'dataset' and 'datasets' both given; keep one")
    if config.datasets:
        _check_datasets(config.datasets)
    elif not config.dataset:
        raise ConfigError("config key 'dataset' is required (a .jsonl/.json/.parquet/.csv file, a directory or a dataset name)")
    for key, f in FIELDS.items():  # NaN / inf: a typo or a computed value gone wrong, never meant
        value = getattr(config, key)
        if _HINTS[key] is float and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be a finite number, got {value}")
    if not config.allow_zero_lr:
        if config.learning_rate == 0:
            raise ConfigError("config key 'learning_rate' is 0: the run would change no weight; set a learning rate, "
                              "or allow_zero_lr: true to run it anyway")
        if config.mode in ("lora", "qlora") and config.lora_alpha == 0:
            raise ConfigError("config key 'lora_alpha' is 0: the adapter's output is scaled to nothing and the run "
                              "changes nothing; set lora_alpha (e.g. 2 x lora_r), or allow_zero_lr: true to run it anyway")
    positive = ("batch_tokens", "batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_r",
                "num_epochs", "logging_steps", "eval_batch_size", "pad_to_multiple_of", "eval_max_new_tokens",
                "tokenizer_vocab_size")
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {getattr(config, key)}")
    non_negative = ("save_steps", "eval_steps", "warmup_steps", "eval_max_examples", "learning_rate",
                    "weight_decay", "save_total_limit", "cpu_threads", "adam_epsilon")
    for key in non_negative:
        if getattr(config, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(config, key)}")
    for key, low, high, closed in (("warmup_ratio", 0, 1, True), ("min_lr_ratio", 0, 1, True),
                                   ("eval_fraction", 0, 1, False), ("lora_dropout", 0, 1, False),
                                   ("adam_beta1", 0, 1, False), ("adam_beta2", 0, 1, False)):
        value = getattr(config, key)
        if not (low <= value <= high if closed else low <= value < high):
            interval = f"[{low}, {high}]" if closed else f"[{low}, {high})"
            raise ConfigError(f"config key {key!r} must be in {interval}, got {value}")
    if config.packing and config.batch_tokens < config.max_seq_length:
        raise ConfigError(
            f"config key 'batch_tokens' ({config.batch_tokens}) must be >= 'max_seq_length' "
            f"({config.max_seq_length}) so that every example fits in a packed micro-batch"
        )
    if config.use_dora and config.mode == "full":  # issue 24
        raise ConfigError("config key 'use_dora' applies to mode lora or qlora, not full")
    if config.model == "tiny-llama" and config.tokenizer is None and config.tokenizer_vocab_size < 260:
        raise ConfigError(f"config key 'tokenizer_vocab_size' must be >= 260 for tiny-llama (256 bytes + 4 special "
                          f"tokens), got {config.tokenizer_vocab_size}")
    if config.model_config and config.model != "tiny-llama":
        raise ConfigError("config key 'model_config' applies only to model: tiny-llama")
    if config.offload_activations and not config.gradient_checkpointing:
        raise ConfigError("config key 'offload_activations' needs 'gradient_checkpointing: true'")
    for key in ("mlp_tile_tokens", "loss_chunk_tokens"):  # issue 22
        if getattr(config, key) is not None and getattr(config, key) <= 0:
            raise ConfigError(f"config key {key!r} must be a positive integer, got {getattr(config, key)}")
    if config.overwrite_output_dir and config.resume not in (False, None, ""):
        raise ConfigError("--overwrite and --resume contradict each other: resume continues the run, "
                          "overwrite deletes it; give one")
    template = config.chat_template
    if isinstance(template, str) and template.endswith(".jinja") and os.path.isfile(template):
        from fastsft.data.templates import check_template_syntax  # light: jinja2 only

        with open(template, encoding="utf-8") as handle:
            check_template_syntax(handle.read(), template)
    if config.self_check not in (True, False, "auto"):  # issue 27
        raise ConfigError(f"config key 'self_check' must be true, false or auto; got {config.self_check!r}")
    if config.cpu_ops not in ("patched", "fastest"):  # issue 27
        raise ConfigError(f"config key 'cpu_ops' must be patched or fastest; got {config.cpu_ops!r}")
    if config.torch_compile_backend != "auto":  # issue 29
        from fastsft.train.compile import check_backend

        check_backend(config.torch_compile_backend)
    if not config.dataset_text_field:
        raise ConfigError("config key 'dataset_text_field' must name a field")
    reporters = [config.report_to] if isinstance(config.report_to, str) else list(config.report_to)
    for name in reporters:
        if name not in REPORTERS:
            raise ConfigError(f"config key 'report_to': {name!r} is not one of {', '.join(REPORTERS)}")


def reporters(config: TrainConfig) -> List[str]:
    names = [config.report_to] if isinstance(config.report_to, str) else list(config.report_to)
    return [n for n in names if n != "none"]


def help_text() -> str:
    """Every key with its type, default and a one-line description, then the aliases."""
    lines = ["config keys (YAML `key: value`, or --key value on the command line):"]
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = _type_name(_HINTS[name])
        lines.append(f"  --{name} ({kind}, default {default!r})")
        lines.append(f"      {HELP.get(name, '')}")
    lines.append("")
    lines.append("aliases (TRL / TrainingArguments / Axolotl names; both spellings in one config is an error):")
    for name, alias in ALIASES.items():
        mapping = "" if alias.values is None else " (" + ", ".join(
            f"{str(k).lower()} -> {'unchanged' if v is NO_CHANGE else v}" for k, v in alias.values.items()) + ")"
        lines.append(f"  {name} = {alias.key}{mapping}   [{alias.origin}]")
    return "\n".join(lines)
