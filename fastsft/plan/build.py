"""The model of a config, built under FakeTensorMode from its config alone (no weight is read).

The architecture comes from `model_config:` (a `model_type` plus its fields), a local folder's
config.json, or a cached hub config. The base is built with `from_config` in the dtype `fastsft train`
loads it in; QLoRA's linear layers become bitsandbytes `Linear4bit` modules (transformers' own
`replace_with_bnb_linear`) whose weight is what the kernels read: the packed uint8 NF4 data, the 8-bit
double-quantized absmax, its fp32 second-level absmax and code books (a `Params4bit` cannot wrap a fake
tensor, and quantizing would read values). Then the recipe's own steps run on it: `fastsft`: the
trainer's `finish_model` (checkpointing, peft LoRA, kernel patch); `hf`: the transformers + peft recipe
of the end-to-end benchmark.
"""
from __future__ import annotations

import dataclasses

import contextlib
import os
import warnings
from typing import Optional

import torch

from fastsft.errors import ConfigError

RECIPES = ("fastsft", "hf", "hf2024")
# hf2024: the hf recipe with the loss of transformers <= 4.44 (LlamaForCausalLM.forward upcast all logits
# to fp32, the loss took a shifted .contiguous() copy, and the training loop held the outputs until the
# backward returned): the 2024 setup published HF figures (e.g. Unsloth's HF + FA2 baselines) measured.


def architecture(config):
    """The transformers config of `config.model` (plus `model_config:` fields), without weights."""
    from transformers import AutoConfig

    fields = dict(config.model_config or {})
    model_type = fields.pop("model_type", None)
    if model_type is not None:
        try:
            return AutoConfig.for_model(model_type, **fields)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"config key 'model_config': model_type {model_type!r}: {exc}") from None
    if config.model == "tiny-llama":
        from fastsft.tiny import tiny_llama_config

        return tiny_llama_config(config.tokenizer_vocab_size, **fields)
    name = config.model
    if name is None:
        raise ConfigError("config key 'model' is missing (or give model_config: with a model_type)")
    local = os.path.isdir(name)
    if local and not os.path.isfile(os.path.join(name, "config.json")):
        raise ConfigError(f"config key 'model': {name!r} holds no config.json")
    try:
        arch = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        if local:
            raise ConfigError(f"config key 'model': {name}/config.json cannot be read ({_first_line(exc)})") from None
        raise ConfigError(f"config key 'model': no cached config.json for hub model {name!r} (fastsft plan reads "
                          f"no network); give a local folder or a model_config: block with model_type") from None
    for key, value in fields.items():
        setattr(arch, key, value)
    return arch


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_family(arch) -> None:
    from transformers import AutoModelForCausalLM

    if type(arch) not in AutoModelForCausalLM._model_mapping:
        raise ConfigError(f"model type {arch.model_type!r} has no causal-LM class in transformers: "
                          f"fastsft plan cannot trace it")


def base_dtype(config, compute: torch.dtype) -> torch.dtype:
    """The dtype `fastsft train` and the hf recipe load the base in (load_model's rules)."""
    if config.mode == "full":
        return torch.float32  # fp32 master weights; autocast computes in bf16/fp16
    return compute


def build_base(arch, config, compute: torch.dtype, attn_implementation: Optional[str] = None):
    """The transformers model, its parameters fake CPU tensors (call inside the FakeTensorMode)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": base_dtype(config, compute)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(arch, **kwargs)
    if config.mode == "qlora":
        quantize_4bit(model, config, compute)
    return model


def quantize_4bit(model, config, compute: torch.dtype) -> None:
    """bitsandbytes 4-bit linears, as BitsAndBytesConfig(load_in_4bit) loads them, with fake packed data."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                               bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                               bnb_4bit_compute_dtype=compute)
    skip = get_keys_to_not_convert(model)
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # its Params4bit placeholders are meta tensors, which fake mode would wrap
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quant)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _fake_4bit_weight(module, config, compute, QuantState)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; peft's prepare_model_for_kbit_training reads it
    model.quantization_method = "bitsandbytes"


def _fake_4bit_weight(module, config, compute, QuantState) -> None:
    """The tensors a bitsandbytes NF4 weight holds: packed 4-bit data and (double-quantized) absmax."""
    out_f, in_f = module.out_features, module.in_features
    n = out_f * in_f
    blocks = (n + 63) // 64
    code = torch.empty(16, dtype=torch.float32)
    if config.bnb_4bit_use_double_quant:
        blocks2 = (blocks + 255) // 256
        state2 = QuantState(absmax=torch.empty(blocks2, dtype=torch.float32), code=torch.empty(256),
                            blocksize=256, dtype=torch.float32)
        state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8), shape=torch.Size([out_f, in_f]),
                           code=code, blocksize=64, quant_type=config.bnb_4bit_quant_type, dtype=compute,
                           offset=torch.empty((), dtype=torch.float32), state2=state2)
    else:
        state = QuantState(absmax=torch.empty(blocks, dtype=torch.float32), shape=torch.Size([out_f, in_f]),
                           code=code, blocksize=64, quant_type=config.bnb_4bit_quant_type, dtype=compute)
    weight = torch.nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8), requires_grad=False)
    weight.quant_state = state
    weight.quant_type = config.bnb_4bit_quant_type
    weight.blocksize = 64
    weight.compress_statistics = config.bnb_4bit_use_double_quant
    weight.quant_storage = torch.uint8
    weight.bnb_quantized = True
    weight.module = module
    module.weight = weight
    if module.bias is not None:
        module.bias = torch.nn.Parameter(torch.empty(out_f, dtype=compute), requires_grad=False)
    module.compute_dtype = compute
    module.compute_type_is_set = True
    module.support_avx512bf16_for_cpu = False  # a CPU inference repack; the planned run is a GPU's


def quant_state_tensors(model):
    """Every tensor of the 4-bit quant states (weights too: they live on the device)."""
    out = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            out += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return out


def finish_hf(model, config):
    """The e2e benchmark's `hf` provider (benchmarks/e2e_providers.hf_recipe) after its from_pretrained:
    QLoRA: peft's prepare_model_for_kbit_training (every non-4-bit parameter upcast to fp32, then HF
    gradient checkpointing); full: every parameter trained; LoRA/QLoRA: get_peft_model; checkpointing
    as the Trainer's gradient_checkpointing=True turns it on."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    if config.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        with _quiet():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.mode == "full":
        model.requires_grad_(True)
    else:
        # the run's adapter as peft builds it (DoRA and a LoRA bias change what is computed and kept)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          bias=config.lora_bias, use_dora=config.use_dora, target_modules=config.lora_target_modules,
                          task_type="CAUSAL_LM")
        with _quiet():
            model = get_peft_model(model, lora)
    if config.gradient_checkpointing and config.mode != "qlora":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _peft_casts_in_place():
    """peft moves each new adapter to its base layer's device and dtype with Module.to, which swaps fake
    parameters (torch.utils.swap_tensors) and fails on the weak reference fake mode's cache holds. Every
    fake tensor is on the one (CPU) device already: the same cast, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    stock = BaseTunerLayer._move_adapter_to_device_of_base_layer

    def cast(self, adapter_name, device=None):
        _, dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
            return
        for name in self.adapter_layer_names + self.other_param_names:
            layer = getattr(self, name, None)
            if isinstance(layer, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and adapter_name in layer:
                item = layer[adapter_name]
                tensors = item.parameters() if isinstance(item, torch.nn.Module) else [item]
                for t in tensors:
                    if t.dtype.is_floating_point and t.dtype != dtype:
                        t.data = t.data.to(dtype)

    swap = torch.utils.swap_tensors

    def swap_or_set(t1, t2):
        """Module.to / _apply swaps every fake parameter; where fake mode's cache holds a weak reference
        to it, the swap fails: set the data instead (same dtype, device and shape result)."""
        try:
            swap(t1, t2)
        except RuntimeError:
            t1.data = t2.detach()

    BaseTunerLayer._move_adapter_to_device_of_base_layer = cast
    torch.utils.swap_tensors = swap_or_set
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = stock
        torch.utils.swap_tensors = swap


def build_model(config, recipe: str, compute: torch.dtype):
    """The model the recipe trains (call inside the FakeTensorMode)."""
    arch = architecture(config)
    check_family(arch)
    with _peft_casts_in_place():
        return _build(arch, config, recipe, compute)


def _build(arch, config, recipe, compute):
    if recipe in ("hf", "hf2024"):
        # the benchmark's choice: SDPA, eager for Gemma-2 (its logit soft-capping)
        attention = "eager" if arch.model_type == "gemma2" else "sdpa"
        model = build_base(arch, config, compute, attn_implementation=attention)
        model = finish_hf(model, config)
    else:
        from fastsft.train.model import finish_model

        model = build_base(arch, config, compute)
        # the GPU run's kernels: cpu_ops only chooses among ops where real CPU tensors run, never here
        gpu_config = dataclasses.replace(config, cpu_ops="patched")
        with _quiet():
            model = finish_model(model, gpu_config)
    model.train()
    return model, arch
