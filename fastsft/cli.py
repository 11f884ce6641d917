"""The `fastsft` command: train | inspect | eval | merge | export | plan | bench.

Heavy libraries (torch, transformers) are imported inside the commands so that
`fastsft --help` and config errors answer quickly.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional, Sequence

USAGE = """\
usage: fastsft <command> [arguments]

commands:
  train   [CONFIG.yaml] [--key value ...] [--resume [RUN_DIR | CHECKPOINT]] [--overwrite] [--nproc N]
          fine-tune a causal LM; every --key overrides the config file
          (fastsft train --help lists every key);
          --nproc N starts N processes through torchrun (DDP / FSDP2, key 'distributed')
  inspect [CONFIG.yaml] [--key value ...] [--n N] [--index I] [--tokens] [--color | --no-color]
          print rendered examples (trained tokens highlighted) and dataset statistics
  eval    CONFIG.yaml --model DIR [--base MODEL] [--output FILE.json] [--key value ...]
          a saved model's held-out loss, eval_metrics, forgetting probe and gates, without training
  merge   --adapter DIR --output DIR [--base MODEL] [--dtype auto|fp32|bf16|fp16] [--overwrite]
          [--base-weights exact|original]
          merge a LoRA / QLoRA adapter into its base model
  export  gguf MODEL_OR_RUN_DIR --output FILE.gguf [--type f16|bf16|q8_0|f32|q4_0|...] [--overwrite]
          write a model (Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3) as GGUF for llama.cpp / Ollama;
          a LoRA / QLoRA run folder is merged on the way
  plan    CONFIG.yaml [--gpu-memory 80GB] [--max-context | --max-batch] [--recipe fastsft,hf]
          trace one training step on the CPU (no GPU, no weights): peak memory, FLOPs, max context
  bench   how to run the benchmarks

fastsft --version prints the version.
Exit codes: 0 done, 1 training stopped (e.g. non-finite loss), 2 bad config or data,
3 a quality gate failed (the model is saved, marked GATE_FAILED),
128+N stopped by signal N after writing a checkpoint (resume with --resume).
"""

TRAIN_USAGE = """\
usage: fastsft train [CONFIG.yaml] [--key value ...]

  --resume                  continue from the newest checkpoint in output_dir
  --resume DIR              ... from a run folder's newest checkpoint, or from a checkpoint
                            (without CONFIG.yaml the checkpoint's own config is used)
  --resume_changed_config   resume although the config changed (new values from the resumed step)
  --overwrite               replace a finished run (or its checkpoints) in output_dir
"""

INSPECT_USAGE = """\
usage: fastsft inspect [CONFIG.yaml] [--key value ...] [options]

  --n N, --examples N   how many examples to show (default 3)
  --index I             start at the example with source index I (0-based, as the headers show)
  --tokens              one line per token: position, id, text, trained or not
  --color / --no-color  trained tokens in bold green (default: on a terminal) or [[between brackets]]
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _split_config(args: Sequence[str]) -> tuple:
    """(config path or None, remaining --key value arguments)."""
    args = list(args)
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    return None, args


def _pop_flag(args: List[str], *names: str) -> Optional[bool]:
    found = None
    for name in names:
        while name in args:
            args.remove(name)
            found = name
    return found


def _pop_value(args: List[str], name: str) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None


def _quiet_library_bars() -> None:
    """transformers' per-file "Loading weights" / "Writing model shards" bars would bury the run's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _saved_config_for_resume(overrides: Sequence[str]) -> Optional[str]:
    """`fastsft train --resume DIR` without a config file: the checkpoint's own fastsft_config.yaml."""
    from fastsft import preflight, run_dir
    from fastsft.config import parse_overrides

    values = dict(parse_overrides(overrides))
    resume = values.get("resume", values.get("resume_from_checkpoint"))
    if resume in (None, False, "false", ""):
        return None
    output_dir = values.get("output_dir")
    if resume in (True, "latest"):
        if output_dir is None:
            return None
        resume = output_dir
    checkpoint = preflight.resolve_resume(str(resume), str(output_dir or resume))
    if checkpoint is None:
        return None
    path = os.path.join(checkpoint, run_dir.CONFIG_FILE)
    return path if os.path.isfile(path) else None


def _run_folder_of(checkpoint_config: str) -> Optional[str]:
    """output_dir/checkpoints/step-N/fastsft_config.yaml -> output_dir (the run folder, wherever it is now)."""
    from fastsft import run_dir

    checkpoint = os.path.dirname(checkpoint_config)
    parent = os.path.dirname(checkpoint)
    return os.path.dirname(parent) if os.path.basename(parent) == run_dir.CHECKPOINTS_DIR else None


def cmd_train(args: Sequence[str]) -> int:
    from fastsft import preflight
    from fastsft.config import load_config
    from fastsft.data.check import check_config_data

    path, overrides = _split_config(args)
    from fastsft.distributed.launch import launch, parse_nproc

    nproc = parse_nproc(_pop_value(overrides, "--nproc"))
    if path is None:
        path = _saved_config_for_resume(overrides)
        folder = _run_folder_of(path) if path else None
        if folder and not any(a == "--output_dir" or a.startswith("--output_dir=") for a in overrides):
            overrides = [*overrides, "--output_dir", folder]  # the run continues where it now is
    config = load_config(path, overrides)
    # before torch / transformers load and before anything is written: the folder, the resume point, the
    # model path, every record of the data
    preflight.check_run(config, os.path.abspath(config.output_dir))
    _check_sequence_parallel(config, nproc)  # a config error first: it holds on any machine
    if nproc is not None and nproc > 1:
        from fastsft.distributed.launch import check_nproc

        check_nproc(nproc, config.device)
    records = check_config_data(config)
    if nproc is not None and nproc > 1:  # torchrun, one process per rank, each running this command
        from fastsft.distributed.launch import check_enough_records

        check_enough_records(nproc, records, config.dataset or "the training data")
        return launch(nproc, ["train", *([path] if path else []), *overrides])
    _quiet_library_bars()
    from fastsft.train import train

    result = train(config, command=["train", *args])
    if result.status == "interrupted":
        return 128 + int(result.signal or 0)
    if config.gates:  # issue 25: the model is saved; a failed gate marks it and exits 3
        from fastsft.gates import EXIT_GATE_FAILED, apply_gates

        if not apply_gates(config.gates, result.summary, result.output_dir, sys.stderr):
            return EXIT_GATE_FAILED
    return EXIT_OK


def _check_sequence_parallel(config, nproc: Optional[int]) -> None:
    """sequence_parallel against --nproc (or the torchrun job this process is a rank of), and the model family."""
    if config.sequence_parallel == 1:
        return
    from fastsft.distributed.context import _env_int
    from fastsft.distributed.sequence import check_config

    world = nproc if nproc is not None else _env_int("WORLD_SIZE", 1)
    check_config(config, world, launched=world > 1)


def cmd_inspect(args: Sequence[str]) -> int:
    from fastsft.config import load_config
    from fastsft.data.check import check_config_data
    from fastsft.errors import ConfigError

    path, rest = _split_config(args)
    rest = list(rest)
    count = _pop_value(rest, "--examples")
    count = _pop_value(rest, "--n") or count
    start = _pop_value(rest, "--index")
    tokens = bool(_pop_flag(rest, "--tokens"))
    color_flag = _pop_flag(rest, "--color", "--no-color")
    config = load_config(path, rest)
    numbers = {}
    for name, value, default in (("--n", count, 3), ("--index", start, None)):
        try:
            numbers[name] = int(value) if value is not None else default
        except ValueError:
            raise ConfigError(f"{name} expects an integer, got {value!r}") from None
        if numbers[name] is not None and numbers[name] < 0:
            raise ConfigError(f"{name} must be >= 0, got {numbers[name]}")
    check_config_data(config)
    color = sys.stdout.isatty() if color_flag is None else color_flag == "--color"
    _quiet_library_bars()

    import tempfile

    from fastsft.data import inspect_report, prepare_data
    from fastsft.train.model import TINY_MODEL, build_tiny_base, load_tokenizer

    if config.model == TINY_MODEL:
        # the tokenizer the run would train on this dataset (nothing is written to output_dir)
        with tempfile.TemporaryDirectory() as scratch:
            source = config.dataset or config.datasets[0]["path"]
            base = build_tiny_base(config, source, os.path.join(scratch, "base"))
            tokenizer = load_tokenizer(base, config)
    else:
        from fastsft.sources import check_model_source

        check_model_source(config.tokenizer or config.model, key="tokenizer" if config.tokenizer else "model",
                           tokenizer=True)
        tokenizer = load_tokenizer(config.tokenizer or config.model, config)
    if config.datasets:
        from fastsft.data.mix import prepare_mixture

        data, mixture = prepare_mixture(config, tokenizer)
    else:
        data, mixture = prepare_data(config.data_options(), tokenizer), None
    print(inspect_report(data, tokenizer, num_examples=numbers["--n"], color=color,
                         batch_tokens=config.batch_tokens if config.packing else None, seed=config.seed,
                         start_index=numbers["--index"], tokens=tokens))
    from fastsft.data.audit import config_audit_lines  # issue 25

    print("\n".join(config_audit_lines(config, data, tokenizer)))
    from fastsft.data.dedup import inspect_lines  # issue 25: duplicates and train/eval overlap

    print("\n".join(inspect_lines(config, data, mixture)))
    return EXIT_OK


EVAL_USAGE = """\
usage: fastsft eval CONFIG.yaml --model DIR [--base MODEL] [--output FILE.json] [--key value ...]

  --model DIR      a run's output_dir, a checkpoint, a merged model folder or an adapter folder
  --base MODEL     the base model (default: the adapter's own; a full model: the config's model)
  --output FILE    the results JSON (default: DIR/eval_results.json; eval_worst.md / .jsonl beside it)
The config's eval split (eval_dataset / eval_fraction), eval_metrics, forgetting_dataset and gates apply.
Exit codes: 0 every gate passed, 2 bad input, 3 a gate failed (DIR is marked GATE_FAILED).
"""


def cmd_eval(args: Sequence[str]) -> int:
    """issue 25: the same metrics and gates as a training run's final eval, on a saved model."""
    from fastsft.config import load_config
    from fastsft.data.check import check_config_data
    from fastsft.errors import ConfigError
    from fastsft.gates import EXIT_GATE_FAILED, apply_gates, gate_failures

    path, rest = _split_config(args)
    rest = list(rest)
    model_dir, base, output = _pop_value(rest, "--model"), _pop_value(rest, "--base"), _pop_value(rest, "--output")
    if path is None or not model_dir:
        raise ConfigError("usage: fastsft eval CONFIG.yaml --model DIR (a saved model or adapter folder)")
    config = load_config(path, rest)
    from fastsft.train.eval_saved import model_kind

    model_kind(model_dir)  # before any data is read
    check_config_data(config)
    _quiet_library_bars()
    from fastsft.train.eval_saved import evaluate_saved, write_results

    results = evaluate_saved(config, model_dir, base=base, output=output, say=print)
    failures = gate_failures(config.gates, results)
    write_results(results, failures)
    print(f"results written to {results['results_file']}")
    if config.gates and not apply_gates(config.gates, results, model_dir, sys.stderr):
        return EXIT_GATE_FAILED
    return EXIT_OK


def cmd_merge(args: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastsft merge", description="merge a LoRA adapter into its base model")
    parser.add_argument("--adapter", required=True, help="a LoRA/QLoRA output_dir or checkpoint")
    parser.add_argument("--output", required=True, help="where to write the merged model")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--overwrite", action="store_true", help="replace what --output already holds")
    parser.add_argument("--base-weights", default="exact", dest="base_weights",
                        help="QLoRA: exact (the 4-bit base as training saw it, default) | original (16-bit checkpoint)")
    options = parser.parse_args(list(args))
    from fastsft.preflight import check_writable
    from fastsft.errors import ConfigError
    from fastsft.sources import check_model_source

    check_writable(options.output, "--output")
    if os.path.isdir(options.output) and os.listdir(options.output) and not options.overwrite:
        raise ConfigError(f"--output {options.output!r} is not empty: pass --overwrite to replace what it holds, "
                          f"or choose another folder")
    if not os.path.isfile(os.path.join(options.adapter, "adapter_config.json")):
        raise ConfigError(f"--adapter {options.adapter!r} holds no adapter_config.json (is it a LoRA/QLoRA "
                          f"output_dir or checkpoint?)")
    if options.base:
        check_model_source(options.base, key="--base")
    _quiet_library_bars()
    from fastsft.train.merge import merge_adapter

    from fastsft.export.drift import drift_line

    report = merge_adapter(options.adapter, options.output, dtype=options.dtype, base=options.base,
                           base_weights=options.base_weights, overwrite=options.overwrite)
    print(drift_line(report))
    print(f"merged model written to {options.output} (report: merge_report.json)")
    return EXIT_OK


def cmd_export(args: Sequence[str]) -> int:
    """issue 26: `fastsft export gguf SOURCE --output FILE [--type f16|bf16|q8_0|f32] [--overwrite]`; SOURCE is a
    merged model, a full run, or a LoRA / QLoRA run folder (merged on the way)."""
    import argparse

    parser = argparse.ArgumentParser(prog="fastsft export", description="export a model as GGUF (llama.cpp, Ollama)")
    parser.add_argument("format", choices=["gguf"])
    parser.add_argument("model", help="a merged model folder, a full run's output_dir, or a LoRA/QLoRA run folder "
                                      "or checkpoint (merged on the way)")
    parser.add_argument("--output", required=True, help="the .gguf file to write")
    parser.add_argument("--type", default="f16", help="f16 | bf16 | q8_0 | f32 | q5_1 | q5_0 | q4_1 | q4_0")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--base", default=None, help="adapter: its base model (default: the one it records)")
    parser.add_argument("--base-weights", default="exact", dest="base_weights",
                        help="QLoRA adapter: exact (the 4-bit base as training saw it, default) | original")
    parser.add_argument("--merge-dtype", default="fp32", dest="merge_dtype",
                        help="adapter: dtype of the temporary merged model (fp32 default | bf16 | fp16)")
    options = parser.parse_args(list(args))
    from fastsft.errors import ConfigError
    from fastsft.export.from_run import export_gguf_from

    if not os.path.isdir(options.model):
        raise ConfigError(f"{options.model!r} is not a folder (a merged model, or a run's output_dir)")
    _quiet_library_bars()
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs the temporary file's name
    path = export_gguf_from(options.model, options.output, options.type, overwrite=options.overwrite,
                            base=options.base, base_weights=options.base_weights, merge_dtype=options.merge_dtype)
    print(f"GGUF written to {path}")
    return EXIT_OK


def cmd_bench(args: Sequence[str]) -> int:
    print("Benchmarks run from a checkout of the repository:\n"
          "  python -m benchmarks.kernels --help   # per-kernel timings (GPU; --smoke for a tiny CPU run)\n"
          "  python -m benchmarks.e2e --help       # end-to-end training throughput (GPU)")
    return EXIT_OK


def cmd_plan(args: Sequence[str]) -> int:
    from fastsft.plan.cli import cmd_plan as plan

    return plan(args)


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "eval": cmd_eval, "merge": cmd_merge, "export": cmd_export, "bench": cmd_bench,
            "plan": cmd_plan}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fastsft")
    except Exception:  # not installed (a bare checkout): the package's own
        from fastsft import __version__

        return __version__


def _command_help(command: str) -> str:
    if command == "train":
        from fastsft.config import help_text

        return TRAIN_USAGE + "\n" + help_text()
    if command == "inspect":
        return INSPECT_USAGE
    if command == "eval":
        return EVAL_USAGE
    if command == "plan":
        from fastsft.plan.cli import PLAN_USAGE

        return PLAN_USAGE
    return USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] in ("--version", "-V", "version"):
        print(f"fastsft {_version()}")
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"fastsft: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    if command not in ("merge", "export") and any(a in ("-h", "--help") for a in rest):
        print(_command_help(command))
        return EXIT_OK
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # bitsandbytes logs, at import, that an optional hub kernel package is absent: noise for every run
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from fastsft.errors import ConfigError, DataError

    try:
        return COMMANDS[command](rest)
    except (ConfigError, DataError) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "data error"
        print(f"fastsft {command}: {kind}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastsft {command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a disk that fills up or a folder removed under the run: say which file
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"fastsft {command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a training stop the loop explains (TrainingError) exits 1 without a traceback
        from fastsft.errors import TrainingError

        if isinstance(exc, TrainingError):
            print(f"fastsft {command}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
