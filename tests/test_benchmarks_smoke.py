"""The kernel benchmark CLI without a GPU. Every op's tiny CPU case (--smoke) runs inside the GPU suite's
dry run (tests/test_gpu_suite.py checks each op's results), in one process for all ops.

Run as subprocesses from the repository root, the way users call them
(benchmarks/__init__.py drops the root from sys.path so kernels/ never imports
as a top-level `kernels`).
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "benchmarks.kernels", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


def test_help():
    out = _run("--help")
    assert out.returncode == 0 and "--op" in out.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU behaviour")
def test_full_benchmark_without_gpu_says_so_and_exits_zero():
    out = _run("--op", "cross_entropy")
    assert out.returncode == 0
    assert "needs a CUDA GPU" in out.stdout
