"""`fastsft plan CONFIG.yaml [options] [--key value ...]`: print and write the plan of a training step."""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional, Sequence

from fastsft.errors import ConfigError

LABEL = "traced on CPU (FakeTensorMode), not measured on a GPU"

PLAN_USAGE = """\
usage: fastsft plan CONFIG.yaml [options] [--key value ...]

Trace one optimizer step of what `fastsft train CONFIG.yaml` runs, under FakeTensorMode on the CPU
(no weights are read, no GPU is used), and print its peak device memory (weights / trainable parameters
+ gradients + optimizer state / saved activations / the largest transient), host memory, FLOPs and tokens.
The model's architecture comes from `model_config:` (with model_type), a local folder's config.json or a
cached hub config.json.

  --recipe R            fastsft (default), hf (transformers + peft + bitsandbytes, SDPA, padded batches,
                        prepare_model_for_kbit_training), hf2024 (hf with the 2024 loss: fp32 logits
                        upcast in forward, a shifted copy, outputs held through backward), or a comma list
                        (fastsft,hf) for a side-by-side ratio
  --seq-len N           tokens per document (default: max_seq_length, capped by batch_tokens when packing)
  --batch N             documents per micro-batch (default: batch_tokens / seq-len packed, batch_size padded)
  --gpu-memory SIZE     does the step fit a GPU of SIZE? (80GB, 24GiB, 40960MB; GB = GiB = 2^30 bytes)
  --max-context         with --gpu-memory: the longest document (batch 1) that fits, to 1%
  --max-batch           with --gpu-memory: the most documents of --seq-len tokens per micro-batch that fit
  --reserve SIZE        memory a trace cannot see: CUDA context, cuBLAS workspace (default 1GiB)
  --slack F             allocator slack, a fraction of the traced peak (default 0.05)
  --breakdown           what is alive at the peak, grouped (op, module, dtype, shape with L for the tokens),
                        with bytes per token; with --max-context, at the longest context found
  --json PATH           where the JSON goes (default fastsft-plan.json)
  --sequence_parallel N (or sequence_parallel: N) one GPU of an N-way Ulysses group: its L/N tokens, the
                        all-to-all around attention; --max-context then gives the sequence over N GPUs
"""


def _take(args: List[str], name: str, flag: bool = False):
    for i, arg in enumerate(args):
        if arg == name:
            if flag:
                del args[i]
                return True
            if i + 1 >= len(args):
                raise ConfigError(f"{name} needs a value")
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if not flag and arg.startswith(name + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return False if flag else None


def _positive_int(value: Optional[str], name: str) -> Optional[int]:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} expects a positive integer, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"{name} expects a positive integer, got {value!r}")
    return number


def default_shape(config, recipe: str) -> tuple:
    """(tokens per document, documents per micro-batch) of the config's micro-batch."""
    if recipe != "fastsft" or not config.packing:
        return config.max_seq_length, config.batch_size
    seq = min(config.max_seq_length, config.batch_tokens)
    return seq, max(1, config.batch_tokens // seq)


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def step_lines(step) -> List[str]:
    where = f"{step.peak_op}" + (f" in {step.peak_module}" if step.peak_module else "") + f", {step.peak_phase}"
    lines = [
        f"  step: {step.batch} x {step.seq_len:,} tokens per micro-batch x {step.accumulation} micro-batch(es) = "
        f"{step.tokens_per_step:,} tokens",
        f"  peak device memory   {gib(step.peak_bytes)}   (at {where})",
        f"    weights (frozen)              {gib(step.weights_bytes)}",
        f"    trainable params+grads+optim  {gib(step.trainable_bytes)}   (params {gib(step.trainable_params_bytes)}, "
        f"grads {gib(step.grads_bytes)}, optimizer state {gib(step.optimizer_state_bytes)})",
        f"    saved activations             {gib(step.activations_bytes)}   (allocated in forward, alive at the peak)",
        f"    transient                     {gib(step.transient_bytes)}   (backward / optimizer working set; "
        f"the op at the peak allocated {gib(step.peak_op_output_bytes)})",
        f"  host memory          {gib(step.host_bytes)}   (offloaded activations)",
        f"  FLOPs per step       {step.flops_model / 1e12:,.1f} TFLOP model (forward + backward), "
        f"{step.flops_recompute / 1e12:,.1f} TFLOP recompute (the optimizer's element-wise ops not counted)",
    ]
    if step.flops_uncounted_ops:
        lines.append(f"  FLOPs not counted (no formula): {', '.join(step.flops_uncounted_ops)}")
    return lines


def breakdown_of(state, seq: int, rows: int) -> dict:
    """Trace `rows` x `seq` tokens recording every storage; print and return what is alive at the peak."""
    from fastsft.plan.breakdown import lines

    step = state.trace(seq, rows, breakdown=True)
    print(f"  breakdown at {rows} x {seq:,} tokens (peak {gib(step.peak_bytes)}, at {step.peak_op}, {step.peak_phase}):")
    for line in lines(step.breakdown["rows"], step.breakdown["tokens"], rank_tokens=step.breakdown.get("rank_tokens")):
        print(line)
    return step.breakdown


def describe(config, arch) -> str:
    layers = getattr(arch, "num_hidden_layers", "?")
    what = {"lora": f"LoRA r={config.lora_r}", "qlora": f"QLoRA r={config.lora_r} ({config.bnb_4bit_quant_type})",
            "full": "full fine-tuning"}[config.mode]
    extras = [config.precision if config.precision != "auto" else "bf16 (auto)"]
    if config.gradient_checkpointing:
        extras.append("gradient checkpointing")
    if config.offload_activations:
        extras.append("offloaded activations")
    return f"{config.model} ({arch.model_type}, {layers} layers), {what}, {', '.join(extras)}"


def cmd_plan(args: Sequence[str]) -> int:
    from fastsft.plan import Margin, load_plan_config, max_batch, max_context, parse_size, prepare
    from fastsft.plan.build import RECIPES

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a plan reads no network: an uncached hub name fails at once
    rest = list(args)
    recipes = [r.strip() for r in (_take(rest, "--recipe") or "fastsft").split(",") if r.strip()]
    for recipe in recipes:
        if recipe not in RECIPES:
            raise ConfigError(f"--recipe {recipe!r}: choose from {', '.join(RECIPES)} (or a comma list)")
    seq_len = _positive_int(_take(rest, "--seq-len"), "--seq-len")
    batch = _positive_int(_take(rest, "--batch"), "--batch")
    gpu_text = _take(rest, "--gpu-memory")
    gpu = parse_size(gpu_text) if gpu_text is not None else None
    want_context = _take(rest, "--max-context", flag=True)
    want_batch = _take(rest, "--max-batch", flag=True)
    reserve_text = _take(rest, "--reserve")
    slack_text = _take(rest, "--slack")
    json_path = _take(rest, "--json") or "fastsft-plan.json"
    want_breakdown = _take(rest, "--breakdown", flag=True)
    margin = Margin()
    if reserve_text is not None:
        margin.reserve_bytes = parse_size(reserve_text, "--reserve", allow_zero=True)
    if slack_text is not None:
        try:
            margin.slack = float(slack_text)
        except ValueError:
            raise ConfigError(f"--slack expects a fraction such as 0.05, got {slack_text!r}") from None
        if not 0 <= margin.slack < 1:
            raise ConfigError(f"--slack expects a fraction in [0, 1), got {slack_text!r}")
    if (want_context or want_batch) and gpu is None:
        raise ConfigError("--max-context / --max-batch need --gpu-memory SIZE (e.g. --gpu-memory 80GB)")
    path = rest.pop(0) if rest and not rest[0].startswith("-") else None
    if path is None:
        raise ConfigError("fastsft plan needs a config file: fastsft plan CONFIG.yaml (fastsft plan --help)")
    config = load_plan_config(path, rest)

    started = time.perf_counter()
    report = {"label": LABEL, "config": os.path.abspath(path), "margin": {"reserve_bytes": margin.reserve_bytes,
              "slack": margin.slack}, "gpu_memory_bytes": gpu, "recipes": {}}
    print(f"fastsft plan: {LABEL}")
    for recipe in recipes:
        state = prepare(config, recipe)
        if recipe == recipes[0]:
            print(f"model: {describe(config, state.arch)}")
            report["model"] = describe(config, state.arch)
        seq, rows = default_shape(config, recipe)
        seq, rows = seq_len or seq, batch or rows
        step = state.trace(seq, rows)
        entry = {"step": step.to_dict(), "build_seconds": round(state.build_seconds, 2)}
        kernels_off = recipe == "fastsft" and not config.patch_kernels
        entry["kernels"] = None if recipe != "fastsft" else ("off" if kernels_off else "traced as operators")
        if recipe == "fastsft" and not kernels_off:
            from fastsft.plan.step import missing_operators

            missing = missing_operators()
            if missing:  # they traced through kernels/reference.py: not the kernels' own allocations
                entry["kernels"] = f"reference path for {', '.join(missing)} (not torch.library operators yet)"
                print(f"note: {', '.join(missing)} traced through kernels/reference.py, not as the kernels "
                      f"allocate (they are not torch.library operators yet)")
        if recipe == "fastsft" and getattr(config, "torch_compile", False):
            # what is traced is the eager step: the compiled graph's buffers are the backend's choice
            entry["torch_compile"] = "traced as the eager step"
            print("note: torch_compile: true is traced as the eager step (the compiled graph's own buffers, "
                  "e.g. inductor's fusions, are not traced)")
        print(f"recipe {recipe}" + (" (patch_kernels: false: fastsft's builder without its kernels)"
                                    if kernels_off else "") + ":")
        for line in step_lines(step):
            print(line)
        from fastsft.plan.sequence import describe as describe_sequence

        if describe_sequence(step):
            print(describe_sequence(step))
        if gpu is not None:
            budget = margin.budget(gpu)
            fits = step.peak_bytes <= budget
            entry["fits"] = fits
            print(f"  --gpu-memory {gpu_text}: {'fits' if fits else 'does NOT fit'} (peak {gib(step.peak_bytes)}, "
                  f"budget {gib(budget)} after the margin)")
        if want_context:
            found = max_context(config, gpu, recipe=recipe, margin=margin, model_state=state)
            entry["max_context"] = found.to_dict()
            fit = found.local_fit or found.fit
            over = f" over {config.sequence_parallel} GPUs" if config.sequence_parallel > 1 else ""
            per = " of the whole sequence, one GPU's" if config.sequence_parallel > 1 else ""
            print(f"  max context at {gpu_text}{over}: {found.best:,} tokens (batch 1; {len(found.traces)} traces"
                  f"{', peak there ' + gib(fit[0]) + ' + ' + f'{fit[1] / 1024:.1f} KiB/token' + per if fit else ''})")
        if want_batch:
            found = max_batch(config, gpu, seq, recipe=recipe, margin=margin, model_state=state)
            entry["max_batch"] = found.to_dict()
            print(f"  max micro-batch at {gpu_text}: {found.best} x {seq:,} tokens ({len(found.traces)} traces)")
        if want_breakdown:
            at = entry.get("max_context", {}).get("best") or seq
            entry["breakdown"] = breakdown_of(state, at, rows if at == seq else 1)
        report["recipes"][recipe] = entry
    if len(recipes) > 1:
        peaks = {r: report["recipes"][r]["step"]["peak_bytes"] for r in recipes}
        base = peaks[recipes[-1]]
        print("peak ratio: " + ", ".join(f"{r} {peaks[r] / base:.2f}x" for r in recipes) + f" (of {recipes[-1]})")
    print(margin.describe())
    report["seconds"] = round(time.perf_counter() - started, 1)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"{report['seconds']:.0f} s; JSON written to {json_path}")
    return 0
