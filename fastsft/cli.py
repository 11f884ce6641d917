"""The `fastsft` command: train | inspect | merge | bench.

Heavy libraries (torch, transformers) are imported inside the commands so that
`fastsft --help` and config errors answer quickly.
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional, Sequence

USAGE = """\
usage: fastsft <command> [arguments]

commands:
  train   [CONFIG.yaml] [--key value ...] [--resume [CHECKPOINT]] [--nproc N]
          fine-tune a causal LM; every --key overrides the config file;
          --nproc N starts N processes through torchrun (DDP / FSDP2, key 'distributed')
  inspect [CONFIG.yaml] [--key value ...] [--examples N] [--color | --no-color]
          print rendered examples (trained tokens highlighted) and dataset statistics
  merge   --adapter DIR --output DIR [--base MODEL] [--dtype auto|fp32|bf16|fp16]
          merge a LoRA / QLoRA adapter into its base model
  bench   how to run the benchmarks

Config keys are the fields of fastsft.config.TrainConfig (see examples/demo.yaml).
Exit codes: 0 done, 1 training stopped (e.g. non-finite loss), 2 bad config or data,
128+N stopped by signal N after writing a checkpoint (resume with --resume).
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


def cmd_train(args: Sequence[str]) -> int:
    from fastsft.config import load_config

    path, overrides = _split_config(args)
    from fastsft.distributed.launch import launch, parse_nproc

    nproc = parse_nproc(_pop_value(overrides, "--nproc"))
    config = load_config(path, overrides)
    if nproc is not None and nproc > 1:  # torchrun, one process per rank, each running this command
        return launch(nproc, ["train", *([path] if path else []), *overrides])
    _quiet_library_bars()
    from fastsft.train import train  # after the config is known to be good: torch etc. load here

    result = train(config)
    if result.status == "interrupted":
        return 128 + int(result.signal or 0)
    return EXIT_OK


def cmd_inspect(args: Sequence[str]) -> int:
    from fastsft.config import load_config

    path, rest = _split_config(args)
    rest = list(rest)
    count = _pop_value(rest, "--examples")
    color_flag = _pop_flag(rest, "--color", "--no-color")
    config = load_config(path, rest)
    try:
        num_examples = int(count) if count is not None else 3
    except ValueError:
        from fastsft.errors import ConfigError

        raise ConfigError(f"--examples expects an integer, got {count!r}") from None
    color = sys.stdout.isatty() if color_flag is None else color_flag == "--color"
    _quiet_library_bars()

    import os
    import tempfile

    from fastsft.data import inspect_report, prepare_data
    from fastsft.train.model import TINY_MODEL, build_tiny_base, load_tokenizer

    if config.model == TINY_MODEL:
        # the tokenizer the run would train on this dataset (nothing is written to output_dir)
        with tempfile.TemporaryDirectory() as scratch:
            base = build_tiny_base(config, config.dataset, os.path.join(scratch, "base"))
            tokenizer = load_tokenizer(base, config)
    else:
        tokenizer = load_tokenizer(config.tokenizer or config.model, config)
    data = prepare_data(config.data_options(), tokenizer)
    print(inspect_report(data, tokenizer, num_examples=num_examples, color=color,
                         batch_tokens=config.batch_tokens if config.packing else None, seed=config.seed))
    return EXIT_OK


def cmd_merge(args: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastsft merge", description="merge a LoRA adapter into its base model")
    parser.add_argument("--adapter", required=True, help="a LoRA/QLoRA output_dir or checkpoint")
    parser.add_argument("--output", required=True, help="where to write the merged model")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    options = parser.parse_args(list(args))
    _quiet_library_bars()
    from fastsft.train.merge import merge_adapter

    out = merge_adapter(options.adapter, options.output, dtype=options.dtype, base=options.base)
    print(f"merged model written to {out}")
    return EXIT_OK


def cmd_bench(args: Sequence[str]) -> int:
    print("Benchmarks run from a checkout of the repository:\n"
          "  python -m benchmarks.kernels --help   # per-kernel timings (GPU; --smoke for a tiny CPU run)\n"
          "  python -m benchmarks.e2e --help       # end-to-end training throughput (GPU)")
    return EXIT_OK


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "merge": cmd_merge, "bench": cmd_bench}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"fastsft: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    if command != "merge" and any(a in ("-h", "--help") for a in rest):
        print(USAGE)
        return EXIT_OK
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from fastsft.errors import ConfigError, DataError

    try:
        return COMMANDS[command](rest)
    except (ConfigError, DataError) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "data error"
        print(f"fastsft {command}: {kind}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastsft {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a training stop the loop explains (TrainingError) exits 1 without a traceback
        from fastsft.train.loop import TrainingError

        if isinstance(exc, TrainingError):
            print(f"fastsft {command}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
