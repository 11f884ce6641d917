"""Every kernel benchmark runs its tiny CPU case, so the benchmark code never rots.

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


OPS = ["cross_entropy", "linear_cross_entropy", "lora_linear", "varlen_attention", "rms_norm", "rope", "swiglu"]


@pytest.mark.parametrize("op", OPS)
def test_smoke(op):
    out = _run("--op", op, "--smoke")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"== {op}" in out.stdout
    assert "fastsft" in out.stdout
