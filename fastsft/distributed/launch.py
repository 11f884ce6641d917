"""``fastsft train CONFIG --nproc N``: start torchrun (standalone, this machine) for the user.

The same as ``torchrun --standalone --nproc_per_node N -m fastsft train CONFIG ...``,
run in this process through torch's elastic launcher so that a failure comes
back as the failing rank and its exit code: when one rank fails, torchrun stops
the others (no rank waits forever in a collective) and this command exits with
the failing rank's code (2 for a config or data error, 1 for a training error,
128+N after a signal).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from fastsft.errors import ConfigError

SHUTDOWN_TIMEOUT_S = 60  # after SIGTERM/SIGINT the ranks finish the step and write a checkpoint


def parse_nproc(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--nproc expects a positive integer, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--nproc expects a positive integer, got {n}")
    import os

    if n > 1 and os.environ.get("TORCHELASTIC_RUN_ID"):
        raise ConfigError("--nproc is for starting a run; this process is already one rank of a torchrun job")
    return n


def usable_cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def check_nproc(nproc: int, device: str) -> None:
    """--nproc above the devices (GPUs, else CPU cores) this machine has is refused before anything starts:
    64 ranks on 2 cores never reach the first step."""
    cores = usable_cores()
    gpus = 0
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    limit, what = (gpus, f"{gpus} GPU{'s' if gpus != 1 else ''}") if gpus else (cores, f"{cores} usable CPU cores")
    if nproc > limit:
        raise ConfigError(f"--nproc {nproc}: this machine has {what}; use at most --nproc {limit} "
                          f"(one process per {'GPU' if gpus else 'core'})")


def check_enough_records(nproc: int, records: Optional[int], dataset: str) -> None:
    """Fewer training records than processes can never give each rank a micro-batch: refused before the
    workers start (the ranks check the packed micro-batches again once the data is tokenised)."""
    if records is not None and records < nproc:
        raise ConfigError(f"{dataset}: {nproc} processes need at least {nproc} micro-batches per epoch, but the data "
                          f"holds {records} record{'s' if records != 1 else ''}: use at most --nproc {max(1, records)}, "
                          f"or more data")


def launch(nproc: int, fastsft_args: Sequence[str], *, entry: Sequence[str] = ("--module", "fastsft")) -> int:
    """Run ``python -m fastsft <fastsft_args>`` on `nproc` local processes; returns the exit code.

    `entry`: what torchrun runs (its ``--module NAME`` or a script path) before the arguments."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", *entry, *fastsft_args])
    args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"  # what --standalone means to torchrun
    import uuid

    args.rdzv_id = str(uuid.uuid4())
    config, cmd, cmd_args = config_from_args(args)
    config.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its per-rank restart chatter
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
        print(f"fastsft: rank {rank} of {nproc} failed ({how}; its error is above); the other ranks were stopped",
              file=sys.stderr)
        return code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
