"""The distribution installs `fastsft` and `fastsft_kernels`, and never a top-level `kernels`."""
import glob
import importlib
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import fastsft_kernels
from fastsft_kernels import _triton_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repo_kernels_folder_is_not_importable_as_kernels():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # Hugging Face's package may be installed: it must not be ours
        origin = os.path.abspath(spec.origin or (list(spec.submodule_search_locations or [""])[0]))
        assert not origin.startswith(os.path.join(REPO, "kernels")), origin


@pytest.mark.parametrize("name", sorted(fastsft_kernels._OPS))
def test_public_ops_resolve(name):
    op = getattr(fastsft_kernels, name)
    assert callable(op)
    assert name in dir(fastsft_kernels)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_op"):
        fastsft_kernels.no_such_op


def test_dispatch_rule(monkeypatch):
    cpu = torch.randn(3)
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    assert not _triton_utils.use_triton(cpu)
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "1")
    assert _triton_utils.use_triton(cpu)
    if torch.cuda.is_available():
        monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
        assert _triton_utils.use_triton(cpu.cuda())


def test_wheel_contains_only_the_two_packages(tmp_path):
    """A regular (non-editable) build maps kernels/ to fastsft_kernels."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "fastsft-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastsft", "fastsft_kernels"}, top
    for module in ("reference", "cross_entropy", "lora", "attention", "norm", "rope", "swiglu"):
        assert f"fastsft_kernels/{module}.py" in names
    # the installed wheel imports from its own location
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    code = ("import fastsft_kernels, fastsft, importlib.util;"
            "print(fastsft_kernels.__file__); print(fastsft.__file__)")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert all(line.startswith(str(target)) for line in lines), lines
