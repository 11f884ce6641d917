"""The Triton versions the project admits, each in a small environment of its own.

The admitted minors come from the ``triton>=A.B,<C.D`` requirement in pyproject.toml
(3.6, 3.7, 3.8, 3.9 today). A version other than the running one is installed once,
with ``pip install --no-deps --target``, into a cache folder (``$FASTSFT_TRITON_ENVS``,
else ``~/.cache/fastsft/triton/<minor>``); a subprocess with that folder first on
PYTHONPATH imports that Triton and everything else (torch, fastsft_kernels) from the
running environment. Ahead-of-time compiles need nothing more: the wheel carries its
own ptxas and cuobjdump, and neither a GPU nor the interpreter is involved.
"""
from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REQUIREMENT = re.compile(r"""["']triton\s*>=\s*(\d+)\.(\d+)\s*,\s*<\s*(\d+)\.(\d+)["']""")


def admitted_minors(pyproject: Optional[str] = None) -> List[str]:
    """Every minor release between pyproject's bounds: ["3.6", "3.7", "3.8", "3.9"]."""
    path = pyproject or os.path.join(_ROOT, "pyproject.toml")
    with open(path) as f:
        match = _REQUIREMENT.search(f.read())
    if match is None:
        raise ValueError(f"{path}: no 'triton>=A.B,<C.D' requirement to take the admitted versions from")
    lo_major, lo_minor, hi_major, hi_minor = (int(g) for g in match.groups())
    if lo_major != hi_major:  # minors of another major cannot be enumerated
        raise ValueError(f"{path}: triton bounds span majors ({lo_major}.{lo_minor} to {hi_major}.{hi_minor}); "
                         "list the admitted minors by hand")
    return [f"{lo_major}.{m}" for m in range(lo_minor, hi_minor)]


def minor_of(version: str) -> str:
    return ".".join(version.split(".")[:2])


def running_version() -> str:
    import triton

    return triton.__version__


def cache_root() -> str:
    return os.environ.get("FASTSFT_TRITON_ENVS") or os.path.join(os.path.expanduser("~"), ".cache", "fastsft",
                                                                 "triton")


def _installed(folder: str) -> Optional[str]:
    """The Triton version installed in ``folder`` (from its dist-info), None when none is."""
    found = glob.glob(os.path.join(folder, "triton-*.dist-info"))
    if not found or not os.path.isfile(os.path.join(folder, "triton", "__init__.py")):
        return None
    return os.path.basename(found[0])[len("triton-"):-len(".dist-info")]


def ensure(minor: str, log=print) -> Optional[str]:
    """The PYTHONPATH folder holding the newest ``minor`` release, installed on first use.

    None when the running Triton is that minor already (nothing to install)."""
    if minor_of(running_version()) == minor:
        return None
    folder = os.path.join(cache_root(), minor)
    if _installed(folder):
        return folder
    os.makedirs(cache_root(), exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:  # pytest-xdist workers: one download, the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        return folder if _installed(folder) else _install(minor, folder, log)


def _install(minor: str, folder: str, log) -> str:
    tmp = f"{folder}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"installing triton=={minor}.* into {folder} (one download, cached)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                           "--no-compile", "--target", tmp, f"triton=={minor}.*"], capture_output=True, text=True)
    if proc.returncode != 0 or not _installed(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"pip could not install triton=={minor}.*: {(proc.stderr or proc.stdout)[-800:]}")
    shutil.rmtree(folder, ignore_errors=True)  # a broken earlier copy
    os.rename(tmp, folder)  # atomic: a folder with a dist-info is a complete install
    return folder


def env_for(minor: str, base: Optional[Dict[str, str]] = None, log=print) -> Dict[str, str]:
    """Environment for a subprocess that imports Triton ``minor`` (and compiles: no interpreter)."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()
           if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences Triton 3.9's notice
    folder = ensure(minor, log=log)
    if folder is not None:
        env["PYTHONPATH"] = folder + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def version_in(env: Dict[str, str]) -> str:
    """The Triton version a subprocess with ``env`` imports."""
    proc = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env, cwd="/",
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()
