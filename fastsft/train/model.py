"""Build the tokenizer and model for a run: tiny-llama or a pretrained model, then LoRA / QLoRA / full, then patch."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from fastsft.errors import ConfigError, DataError

logger = logging.getLogger("fastsft.train")

TINY_MODEL = "tiny-llama"
BASE_MODEL_DIR = "base_model"  # output_dir/base_model: the tiny model's weights + tokenizer


@dataclass
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    compute_dtype: torch.dtype
    autocast: bool  # run the forward under torch.autocast(compute_dtype)
    scaler: bool  # fp16: dynamic loss scaling


def resolve_device(config) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but no CUDA device is available")
    return torch.device(config.device)


def resolve_precision(config, device: torch.device) -> Precision:
    name = config.precision
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'precision' is bf16 but this GPU has no bf16; use fp16 (or auto)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, dtype, autocast=name != "fp32", scaler=name == "fp16")


def iter_dataset_texts(source: str, split: str = "train") -> Iterator[str]:
    """Every string in a dataset (recursively through messages), to train the tiny tokenizer on."""
    from fastsft.data.load import load_records

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from strings(item)

    for record in load_records(source, split):
        yield from strings(record)


def build_tiny_base(config, data_source: str, target_dir: str) -> str:
    """Train a BPE tokenizer on the dataset, build a tiny Llama (seeded), save both to `target_dir`."""
    from transformers import LlamaForCausalLM

    from fastsft.tiny import build_tokenizer, tiny_llama_config

    if config.tokenizer:  # a given tokenizer; the tiny model is sized to its vocabulary
        tokenizer = load_tokenizer(config.tokenizer, config)
    else:
        texts = list(iter_dataset_texts(data_source, config.dataset_split))
        if config.eval_dataset:
            texts += list(iter_dataset_texts(config.eval_dataset, config.dataset_split))
        if not texts:
            raise DataError(f"{data_source}: no text found to train the tiny tokenizer on")
        tokenizer = build_tokenizer(texts, vocab_size=config.tokenizer_vocab_size)
    try:
        model_config = tiny_llama_config(len(tokenizer), **config.model_config)
    except TypeError as exc:
        raise ConfigError(f"config key 'model_config': {exc}") from None
    model_config.pad_token_id = tokenizer.pad_token_id
    model_config.bos_token_id = tokenizer.bos_token_id
    model_config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the same seed always gives the same initial weights
        model = LlamaForCausalLM(model_config)
    os.makedirs(target_dir, exist_ok=True)
    model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    return target_dir


def load_tokenizer(path: str, config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out of the loss
    return tokenizer


def load_model(path: str, config, device: torch.device, precision: Precision) -> torch.nn.Module:
    """The base model in the mode's dtype (QLoRA: 4-bit through BitsAndBytesConfig), then LoRA and checkpointing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **base_load_kwargs(config, device, precision))
    if config.mode != "qlora":
        model.to(device)
    return finish_model(model, config, device)


def base_load_kwargs(config, device: torch.device, precision: Precision) -> dict:
    """from_pretrained's arguments for the base as training loads it (`fastsft eval` loads it the same way)."""
    kwargs = dict(trust_remote_code=config.trust_remote_code)
    if config.mode == "qlora":
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a dependency
            raise ConfigError(f"mode 'qlora' needs bitsandbytes ({exc})") from None
        compute = precision.compute_dtype if precision.name != "fp32" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        else:
            kwargs["device_map"] = {"": "cpu"}
    elif config.mode == "lora":
        # the frozen base in the compute dtype; the adapters stay fp32 (peft's autocast_adapter_dtype)
        kwargs["dtype"] = precision.compute_dtype
    else:
        kwargs["dtype"] = torch.float32  # full fine-tuning keeps fp32 master weights; autocast computes in bf16/fp16
    return kwargs


def finish_model(model: torch.nn.Module, config, device: Optional[torch.device] = None) -> torch.nn.Module:
    """The loaded base -> the model `fastsft train` trains: checkpointing, LoRA, kernels (`fastsft plan`
    calls this on a base built under FakeTensorMode, so both trace the same steps)."""
    model.config.use_cache = False

    if config.mode == "qlora":
        prepare_quantized_base(model, config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if config.mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        try:
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
                bias=config.lora_bias,
                use_rslora=config.use_rslora,
                use_dora=config.use_dora,
                modules_to_save=config.lora_modules_to_save,
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():
                # peft asks transformers for a renamed property; nothing a user of fastsft can act on
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                model = get_peft_model(model, lora)
        except ValueError as exc:
            raise ConfigError(f"LoRA options (lora_*): {exc}") from None
    if config.gradient_checkpointing:
        drop_input_require_grads(model)
    if config.patch_kernels:
        import fastsft

        fastest = getattr(config, "cpu_ops", "fastest") == "fastest"
        if fastest and config.mode == "full" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # FSDP2 shards the parameters: timing ops on them crashed a 2-process CPU run (signal 11)
            logger.info("cpu_ops: fastest is not applied to a full fine-tune over several processes (FSDP2); "
                        "every patch kept")
            fastest = False
        model = fastsft.patch_model(model, self_check=device is not None and wants_self_check(config, device),
                                    fastest_on_cpu=fastest)
    from fastsft.train.long_context import apply_explicit

    apply_explicit(model, config)  # issue 22: mlp_tile_tokens / loss_chunk_tokens (fastsft plan traces them too)
    return model


def wants_self_check(config, device: torch.device) -> bool:
    """self_check: auto -> on wherever the ops run kernels (a GPU, or CPU under the interpreter)."""
    value = getattr(config, "self_check", "auto")
    if value == "auto":
        from fastsft_kernels._triton_utils import triton_on_cpu

        return device.type == "cuda" or (device.type == "cpu" and triton_on_cpu())
    if isinstance(value, bool):
        return value
    raise ConfigError(f"config key 'self_check' must be true, false or auto; got {value!r}")


def prepare_quantized_base(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    """What peft's prepare_model_for_kbit_training is for, without its fp32 upcast.

    The base is frozen (LoRA adds the trainable weights) and checkpointing recomputes
    with use_reentrant=False, which needs no input-grad hook. Embeddings, norms and
    lm_head stay in the compute dtype they were loaded in: peft's blanket upcast to
    fp32 would make the residual stream fp32 and send fp32 activations into every
    kernel (attention's exact-fp32 path, no tensor cores); the kernels already keep
    their statistics and accumulators in fp32.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")  # transformers', peft's


def drop_input_require_grads(model: torch.nn.Module) -> int:
    """Remove the forward hooks that make the input embeddings' output require grad.

    transformers' gradient_checkpointing_enable and peft's get_peft_model add them for reentrant
    checkpointing, which needs an input that requires grad. fastsft checkpoints with use_reentrant=False:
    the adapters inside each layer make its output require grad. With the hook, the embeddings'
    output becomes a leaf that requires grad: autograd keeps it on the device for the whole backward
    (hidden_size values per token: 8 KiB per token at 8B, alive at the long-context peak even with
    offloaded checkpoints) and the backward computes and stores its gradient, which nothing reads.
    Returns the number of hooks removed."""
    removed = 0
    for module in model.modules():
        hooks = getattr(module, "_forward_hooks", None)
        if not hooks:
            continue
        for key, hook in list(hooks.items()):
            if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
                del hooks[key]
                removed += 1
    for module in model.modules():  # their handles: disable_input_require_grads would find nothing to remove
        if getattr(module, "_require_grads_hooks", None):
            module._require_grads_hooks = []
        module.__dict__.pop("_require_grads_hook", None)
    return removed


def prepare_base(config, output_dir: str, resuming: bool) -> str:
    """The directory (or hub name) to load the base model and tokenizer from."""
    if config.model != TINY_MODEL:
        return config.model
    target = os.path.join(output_dir, BASE_MODEL_DIR)
    if resuming and os.path.isfile(os.path.join(target, "config.json")):
        return os.path.abspath(target)  # the exact weights and tokenizer the run started with
    return os.path.abspath(build_tiny_base(config, config.dataset, target))


def count_parameters(model: torch.nn.Module) -> tuple:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
