"""`fastsft eval CONFIG --model DIR` (issue 25): a saved model's held-out loss, eval_metrics and forgetting
probe, without training, so CI can apply the same gates to any model folder.

DIR is a full / merged model folder (config.json) or a LoRA adapter folder (adapter_config.json, loaded
on its base with peft). The forgetting baseline is the base model: the adapter switched off, or for a
full model --base (default: the config's model; tiny-llama: DIR/base_model).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from typing import Optional

import torch

from fastsft import eval_metrics, run_dir
from fastsft.errors import ConfigError
from fastsft.train.evaluate import (autocast_factory, evaluate_loss, generate_replies, held_out_batches,
                                    reference_replies)
from fastsft.train.forgetting import describe, prepare_probe, relative_increase
from fastsft.train.model import (BASE_MODEL_DIR, TINY_MODEL, base_load_kwargs, load_tokenizer, resolve_device,
                                 resolve_precision)

RESULTS_FILE = "eval_results.json"


def model_kind(model_dir: str) -> str:
    """'adapter' or 'full'; ConfigError naming the folder otherwise (before any heavy work)."""
    if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
        return "adapter"
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return "full"
    raise ConfigError(f"--model {model_dir!r} holds neither adapter_config.json nor config.json (give a run's "
                      f"output_dir, a checkpoint, a merged model folder or an adapter folder)")


def _adapter_base(model_dir: str, base: Optional[str]) -> str:
    if base:
        return base
    with open(os.path.join(model_dir, "adapter_config.json"), encoding="utf-8") as handle:
        named = json.load(handle).get("base_model_name_or_path")
    if not named:
        raise ConfigError(f"{model_dir}/adapter_config.json names no base model: pass --base MODEL")
    return named


def _full_base(config, model_dir: str, base: Optional[str]) -> Optional[str]:
    """The model a full / merged model is compared with by the forgetting probe (None: none at hand)."""
    if base:
        return base
    if config.model == TINY_MODEL:
        local = os.path.join(model_dir, BASE_MODEL_DIR)
        return local if os.path.isfile(os.path.join(local, "config.json")) else None
    return config.model


@contextlib.contextmanager
def _quiet(name: str):
    """INFO lines of one logger held back for a block."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _as_trained(model, config):
    """patch_kernels: the kernels the run computed with (its own eval's numbers; bitsandbytes' own 4-bit
    forward does not run every shape on CPU, fastsft's fused NF4 LoRA path does)."""
    if not config.patch_kernels:
        return model
    import fastsft

    return fastsft.patch_model(model, self_check=False)


def _load(path: str, config, device: torch.device, precision, *, as_base: bool):
    """A model for evaluation. An adapter's base loads as training loaded it (QLoRA: 4-bit), so the numbers
    match the run's own final eval; a full / merged model in the compute dtype."""
    from transformers import AutoModelForCausalLM

    if as_base:
        kwargs = base_load_kwargs(config, device, precision)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if "quantization_config" not in kwargs:
            model.to(device)
        return model.eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=precision.compute_dtype,
                                                trust_remote_code=config.trust_remote_code).to(device).eval()


def evaluate_saved(config, model_dir: str, *, base: Optional[str] = None, output: Optional[str] = None,
                   say=print) -> dict:
    """Run the eval split's loss, the eval_metrics and the forgetting probe on a saved model; write the
    results JSON (and eval_worst.md / .jsonl next to it); return the results (plain metric names)."""
    from fastsft.data import prepare_data
    from fastsft.sources import check_model_source

    kind = model_kind(model_dir)
    device = resolve_device(config)
    precision = resolve_precision(config, device)
    compute = precision.compute_dtype
    tokenizer_dir = model_dir if os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")) else \
        (config.tokenizer or (_adapter_base(model_dir, base) if kind == "adapter" else config.model))
    tokenizer = load_tokenizer(tokenizer_dir, config)
    if config.datasets:
        from fastsft.data.mix import prepare_mixture

        data = prepare_mixture(config, tokenizer)[0]
    else:
        data = prepare_data(config.data_options(), tokenizer)
    probe = prepare_probe(config, tokenizer) if config.forgetting_dataset else None
    if not data.eval and probe is None:
        raise ConfigError("fastsft eval needs a held-out split (eval_dataset or eval_fraction) or a "
                          "forgetting_dataset")
    metrics = eval_metrics.config_metrics(config) if data.eval else []
    examples = data.eval[: config.eval_max_examples or None]
    eval_metrics.check_python_metrics(metrics, reference_replies(tokenizer, examples))
    if kind == "adapter":
        from peft import PeftModel

        base_path = _adapter_base(model_dir, base)
        check_model_source(base_path, key="--base (the adapter's base model)")
        with warnings.catch_warnings():  # peft asks transformers for a renamed property: nothing to act on
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            base_model = _load(base_path, config, device, precision, as_base=True)
            model = PeftModel.from_pretrained(base_model, model_dir).eval()
            if config.mode != "qlora":
                model.to(device)  # the adapter's weights beside the base's
        model = _as_trained(model, config)
    else:
        model = _as_trained(_load(model_dir, config, device, precision, as_base=False), config)
    autocast = autocast_factory(device, compute, precision.autocast)
    pad = tokenizer.pad_token_id
    results: dict = {"model": os.path.abspath(model_dir), "kind": kind}
    parts = []
    if data.eval:
        results["eval_loss"] = evaluate_loss(model, held_out_batches(data.eval, config, pad), device=device,
                                             autocast=autocast)
        parts.append(f"loss {results['eval_loss']:.4f} on {len(data.eval)} held-out examples")
    out_path = os.path.abspath(output or os.path.join(model_dir, RESULTS_FILE))
    folder = os.path.dirname(out_path)
    os.makedirs(folder, exist_ok=True)
    names = [os.path.basename(out_path)]
    if metrics:
        replies = generate_replies(model, tokenizer, examples, device=device, autocast=autocast,
                                   max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size,
                                   do_sample=config.eval_do_sample, temperature=config.eval_temperature,
                                   top_p=config.eval_top_p, seed=config.seed)
        scored = eval_metrics.score_replies(metrics, replies)
        results.update(scored["means"])
        results["eval_examples"] = len(replies)
        parts += [f"{m.name} {scored['means'][m.name]:.4g}" if m.kind == "python" else
                  f"{m.name} {100 * scored['means'][m.name]:.1f}%" for m in metrics]
        if config.eval_worst_examples > 0 and replies:
            names += [eval_metrics.WORST_MD, eval_metrics.WORST_JSONL]
            rows = eval_metrics.worst_rows(metrics, replies, scored["per_reply"], config.eval_worst_examples)
    if probe is not None:
        batches = held_out_batches(probe, config, pad)
        loss = evaluate_loss(model, batches, device=device, autocast=autocast)
        before = None
        if kind == "adapter":
            with model.disable_adapter(), _quiet("fastsft"):  # not one "peft path (adapters disabled)" per layer
                before = evaluate_loss(model, batches, device=device, autocast=autocast)
        else:
            base_path = _full_base(config, model_dir, base)
            if base_path is None:
                say("forgetting: no base model to compare with (pass --base MODEL)")
            else:
                check_model_source(base_path, key="--base")
                base_model = _as_trained(_load(base_path, config, device, precision, as_base=False), config)
                before = evaluate_loss(base_model, batches, device=device, autocast=autocast)
                del base_model
        results["forgetting_loss"] = loss
        results["forgetting_loss_start"] = before
        results["forgetting"] = relative_increase(loss, before)
        parts.append(describe(loss, results["forgetting"]))
    if os.path.isfile(os.path.join(folder, run_dir.MANIFEST_FILE)):
        run_dir.record(folder, names)  # a run folder: these names are fastsft's (removed by --overwrite)
    if len(names) > 1:
        eval_metrics.write_worst(folder, rows, metrics, None)
    results["metric_names"] = [m.name for m in metrics]
    results["results_file"] = out_path
    say(f"eval of {model_dir}: " + ", ".join(parts))
    return results


def write_results(results: dict, gate_failures: list) -> None:
    results = dict(results, gates={"passed": not gate_failures, "failures": gate_failures})
    with open(results["results_file"], "w", encoding="utf-8") as handle:
        json.dump({k: (None if isinstance(v, float) and v != v else v) for k, v in results.items()}, handle, indent=2)
        handle.write("\n")
