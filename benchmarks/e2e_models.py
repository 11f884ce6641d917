"""Architectures, the saved random-weight checkpoints, model construction and FLOP accounting for the
end-to-end benchmark.

Models are built from configs with random weights (no download): in bf16 directly on the GPU (never in
fp32 on the CPU: an 8B model would need 32 GB), or in fp32 for the tiny CPU smoke config, and saved once
to a local folder (save_random_model: safetensors + config + a word-level tokenizer of the same
vocabulary). Every provider loads that folder its own way (e2e_providers), so the weights are identical
across providers and each stack quantizes and wraps them as its users would. build_model() builds the
same model in memory (used by the unit tests of the checkpointing helpers).
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("full", "lora", "qlora")


@dataclass(frozen=True)
class Arch:
    """One architecture: the transformers config class and the published shape."""

    name: str
    family: str                 # transformers config class: "llama" | "qwen2" | "gemma2"
    source: str                 # the checkpoint whose config.json this reproduces
    config: dict = field(default_factory=dict)
    # attention implementation of the plain transformers baseline: SDPA, except
    # Gemma-2, whose attention-logit softcapping SDPA cannot express
    hf_attention: str = "sdpa"
    # gradient checkpointing when --grad-ckpt auto
    grad_ckpt_default: bool = False


_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

ARCHS = {
    a.name: a
    for a in (
        Arch("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B", dict(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
            rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE,
            bos_token_id=128000, eos_token_id=128001)),
        Arch("llama-3.1-8b", "llama", "meta-llama/Llama-3.1-8B", dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
            rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=dict(_LLAMA3_ROPE, factor=8.0),
            bos_token_id=128000, eos_token_id=128001), grad_ckpt_default=True),
        Arch("qwen2.5-7b", "qwen2", "Qwen/Qwen2.5-7B", dict(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False, bos_token_id=151643, eos_token_id=151643), grad_ckpt_default=True),
        Arch("gemma-2-2b", "gemma2", "google/gemma-2-2b", dict(
            hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
            rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            pad_token_id=0, bos_token_id=2, eos_token_id=1), hf_attention="eager"),
        # the --smoke config: seconds on a CPU
        Arch("tiny-llama", "llama", "(smoke test config)", dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=509, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=1, eos_token_id=2), grad_ckpt_default=True),
    )
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"--model must be one of {', '.join(ARCHS)}; got {name!r}")
    return ARCHS[name]


def build_config(arch: Arch):
    """The transformers config of `arch` (use_cache off: training only)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "gemma2": transformers.Gemma2Config}[arch.family]
    kwargs = dict(arch.config)
    if "rope_parameters" not in inspect.signature(cls.__init__).parameters:
        # transformers < 5 spells RoPE settings as rope_theta + rope_scaling
        rope = dict(kwargs.pop("rope_parameters"))
        kwargs["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = rope
    config = cls(**kwargs)
    config.use_cache = False
    return config


def pad_token_id(config) -> int:
    pad = getattr(config, "pad_token_id", None)
    return int(pad) if pad is not None else int(config.eos_token_id if isinstance(config.eos_token_id, int)
                                                 else config.eos_token_id[0])


# ---------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    windows: tuple  # per layer: sliding window length, or None for full causal attention

    @classmethod
    def of(cls, config) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        windows = tuple(window if (t == "sliding_attention" and window) else None for t in layer_types)
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size, windows)

    def linear_shapes(self) -> dict:
        """(in, out) of every linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: decoder linears + the LM head (embeddings excluded)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return self.layers * per_layer + self.vocab * self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linear_shapes().values())


FLOPS_FORMULA = (
    "per step: tokens * W + A, W = 6*N (full) or 4*N + 6*N_lora (lora/qlora: frozen base forward + "
    "backward to activations, adapters trained); N = decoder linear weights + LM head (embeddings excluded), "
    "N_lora = rank*(in+out) summed over adapted linears; A = 12 * heads*head_dim * sum over layers and "
    "documents of the (query, key) pairs a causal (or sliding-window) mask keeps, i.e. 12*L*d*s_eff per token "
    "with s_eff = attended keys per query; padding, gradient-checkpoint recomputation and NF4 dequantization "
    "are not counted (model FLOPs, not hardware FLOPs)")


def attended_pairs(length: int, window: Optional[int]) -> int:
    """(query, key) pairs a causal mask (optionally with a sliding window) keeps in one document."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    # rows 1..window attend to 1..window keys; the remaining rows attend to `window` keys each
    return window * (window + 1) // 2 + (length - window) * window


def model_flops(shape: Shape, mode: str, doc_lengths, rank: int) -> float:
    """Model FLOPs of one training step (forward + backward) over documents of the given lengths."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    tokens = sum(doc_lengths)
    n = shape.matmul_params()
    per_token = 6 * n if mode == "full" else 4 * n + 6 * shape.lora_params(rank)
    pairs = sum(attended_pairs(length, w) for length in doc_lengths for w in shape.windows)
    return float(tokens * per_token + 12 * shape.heads * shape.head_dim * pairs)


# ---------------------------------------------------------------- the saved checkpoint
SAVED_MARK = "fastsft_benchmark_model.json"


def default_model_root() -> str:
    """Where the random-weight checkpoints go: $FASTSFT_BENCH_MODELS, else /dev/shm (RAM: an 8B bf16
    checkpoint is 16 GB, written and read back in seconds), else the temporary folder."""
    import tempfile

    if os.environ.get("FASTSFT_BENCH_MODELS"):
        return os.environ["FASTSFT_BENCH_MODELS"]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm/fastsft-bench-models"
    return os.path.join(tempfile.gettempdir(), "fastsft-bench-models")


def saved_model_dir(root: str, name: str, seed: int, dtype: torch.dtype) -> str:
    return os.path.join(root, f"{name}-seed{seed}-{str(dtype).replace('torch.', '')}")


def is_saved(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SAVED_MARK))


def save_random_model(arch: Arch, folder: str, *, seed: int, device: str, dtype: torch.dtype) -> str:
    """Build `arch` with random weights (seeded) and save it with a tokenizer to `folder` (once: a folder
    that holds a finished save is reused). The marker file is written last, so a save cut short is redone."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    if is_saved(folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    config = build_config(arch)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    word_level_tokenizer(config).save_pretrained(folder)
    with open(os.path.join(folder, SAVED_MARK), "w") as f:
        json.dump({"arch": arch.name, "source": arch.source, "seed": seed, "dtype": str(dtype)}, f)
    return folder


def word_level_tokenizer(config):
    """A tokenizer with one token per id of the model's vocabulary (the benchmark feeds token ids; a
    stack that loads a checkpoint by path, such as Unsloth, also loads its tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bos, eos = config.bos_token_id, config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    vocab = {f"<t{i}>": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"<t{eos}>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"<t{bos}>", eos_token=f"<t{eos}>",
                                   unk_token=f"<t{eos}>", pad_token=f"<t{pad_token_id(config)}>")


# ---------------------------------------------------------------- construction
def build_model(arch: Arch, *, mode: str, device: str, dtype: torch.dtype, attn_implementation: str,
                seed: int, lora_rank: int = 16, lora_alpha: int = 32, adapter_dtype: str = "fp32"):
    """Random-weight CausalLM of `arch` on `device`, ready to train in `mode` (full, lora, qlora)."""
    from transformers import AutoModelForCausalLM

    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}; got {mode!r}")
    config = build_config(arch)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.config.use_cache = False
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode == "qlora":
        quantize_decoder_linears_nf4(model, compute_dtype=dtype)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    # peft's default keeps fp32 adapters on a bf16 base ("fp32"); "model" keeps them in the model dtype
    if adapter_dtype not in ("fp32", "model"):
        raise ValueError(f"adapter_dtype must be 'fp32' or 'model'; got {adapter_dtype!r}")
    model = get_peft_model(model, lora, autocast_adapter_dtype=(adapter_dtype == "fp32"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32 if adapter_dtype == "fp32" else dtype)
    return model


def quantize_decoder_linears_nf4(model, *, compute_dtype: torch.dtype) -> None:
    """Replace every nn.Linear inside the decoder layers by a bitsandbytes NF4 Linear4bit (double
    quantization, blocksize 64: the usual QLoRA recipe). Embeddings and the LM head stay dense."""
    import bitsandbytes as bnb

    layers = decoder_layers(model)
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                device = child.weight.device
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                # Params4bit quantizes when moved to a device
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del child
    # what transformers' bnb loader sets, and what peft reads to pick its 4-bit LoRA layer
    model.is_loaded_in_4bit = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"found no decoder layers (GradientCheckpointingLayer) in {type(model).__name__}")
    return layers


# ---------------------------------------------------------------- activation checkpointing
def enable_gradient_checkpointing(model, *, offload: bool) -> None:
    """Non-reentrant activation checkpointing of every decoder layer; with `offload`, each layer's
    input is kept in (pinned) CPU memory instead of on the device until the backward pass needs it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.21 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not offload:
        return
    # The offloading checkpoint is reentrant-style: the layer inputs must require grad for its
    # backward to run, which a frozen embedding does not give (the same fix peft uses).
    base.enable_input_require_grads()
    for module in base.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = offloaded_checkpoint


def offloaded_checkpoint(function: Callable, *args):
    """Drop-in for torch.utils.checkpoint.checkpoint(function, *args) that offloads the saved inputs."""
    return _OffloadedCheckpoint.apply(function, *args)


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run `function` without saving activations; save its tensor inputs on the CPU; in backward, copy them
    back, recompute under grad and backpropagate. Parameter gradients accumulate directly (as in the
    reentrant torch checkpoint); gradients flow to the tensor inputs. The recompute runs under the
    forward's autocast state. No RNG state is replayed: the benchmark's models have no dropout."""

    @staticmethod
    def forward(ctx, function, *args):
        ctx.function = function
        device_type = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.devices = []
        ctx.saved = []
        for a in args:
            if torch.is_tensor(a):
                ctx.devices.append(a.device)
                if a.is_cuda:
                    host = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
                    host.copy_(a, non_blocking=True)  # ordered on the current stream before any reuse of `a`
                    ctx.saved.append(host)
                else:
                    ctx.saved.append(a.detach())
            else:
                ctx.devices.append(None)
                ctx.saved.append(a)
        ctx.requires = [torch.is_tensor(a) and a.requires_grad for a in args]
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = []
        for a, device, requires in zip(ctx.saved, ctx.devices, ctx.requires):
            if device is None:
                inputs.append(a)
                continue
            t = a.to(device, non_blocking=True).detach()
            inputs.append(t.requires_grad_(requires))
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            outputs = ctx.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(t.grad if torch.is_tensor(t) and r else None for t, r in zip(inputs, ctx.requires))
        return (None,) + grads


def count_recomputes(model) -> Callable[[], int]:
    """Hook a module inside the first decoder layer; the returned callable reads how many times it ran.
    Hooks on the layer itself sit outside the checkpoint; one inside it fires again on recompute."""
    layer = decoder_layers(model)[0]
    inner = next(m for m in layer.children() if any(True for _ in m.parameters()))
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    handle = inner.register_forward_hook(hook)

    def read_and_remove() -> int:
        handle.remove()
        return calls["n"]

    return read_and_remove


def parameter_counts(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        # a packed NF4 tensor stores two weights per byte
        total += p.numel() * (2 if p.dtype == torch.uint8 else 1)
    return {"trainable_params": int(trainable), "total_params": int(total)}


@functools.lru_cache(maxsize=None)
def arch_shape(name: str) -> Shape:
    return Shape.of(build_config(get_arch(name)))
