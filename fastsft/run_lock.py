"""One run per output_dir: a lock file holding the owner's pid and host (no torch import).

A second run into a locked folder is refused in one line naming the other run; a lock whose
process is gone (same host, dead pid) is taken over with one line. The lock is created with
O_EXCL, so two runs started at the same moment cannot both take it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Optional

from fastsft.errors import ConfigError
from fastsft.run_dir import LOCK_FILE


def _read(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def holder(output_dir: str) -> Optional[dict]:
    """The live run that holds output_dir's lock (not this process), or None."""
    info = _read(os.path.join(output_dir, LOCK_FILE))
    if not info:
        return None
    pid, host = int(info.get("pid", -1)), info.get("host")
    if pid == os.getpid() and host == socket.gethostname():
        return None
    if host == socket.gethostname() and not _alive(pid):
        return None
    return info


def _describe(info: dict) -> str:
    started = info.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"pid {info.get('pid')} on {info.get('host')}{since}"


def check_unlocked(output_dir: str) -> None:
    """Refuse at once when another live run holds output_dir (before any data is read)."""
    info = holder(output_dir)
    if info is not None:
        path = os.path.join(output_dir, LOCK_FILE)
        raise ConfigError(f"output_dir {output_dir!r} is in use by another run ({_describe(info)}); wait for it, "
                          f"choose another output_dir, or delete {path} if that run is gone")


def acquire(output_dir: str) -> str:
    """Create output_dir and its lock (taking over a stale one); returns the lock's path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            check_unlocked(output_dir)  # a live other run: refused
            stale = _read(path) or {}
            if stale.get("pid") != os.getpid():
                print(f"output_dir: took over the lock of a run that is gone ({_describe(stale)})", file=sys.stderr)
            os.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(mine, handle)
        return path
    check_unlocked(output_dir)  # lost a race to a run that started just now
    raise ConfigError(f"output_dir {output_dir!r}: could not take the lock {path}")


def release(output_dir: str) -> None:
    """Remove the lock if this process holds it."""
    path = os.path.join(output_dir, LOCK_FILE)
    info = _read(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except OSError:
            pass
