"""Test harness shared by every test.

Without CUDA, the Triton kernels run on the CPU through Triton's interpreter:
TRITON_INTERPRET=1 must be set before triton is imported, and
FASTSFT_TRITON_ON_CPU=1 makes the public ops take the Triton path for CPU
tensors instead of the PyTorch reference. Both are set here, at import time,
before any test module imports triton.
"""
import os

import pytest

try:  # torch is needed to know whether CUDA exists
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASTSFT_TRITON_ON_CPU", "1")
    # The suite runs with one pytest-xdist worker per core: a second OpenMP thread
    # per worker only spins against the other worker (measured: 4 tiny training
    # steps took ~10 s with 2 threads, ~0.1 s with 1).
    torch.set_num_threads(1)

# No hub access anywhere in the suite: tests build their models and tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from fastsft_kernels.testing import install_interpreter_shims, poison_outputs  # noqa: E402

install_interpreter_shims()  # bf16 tl.dot and fp32 -> bf16 rounding as on the GPU; a no-op unless TRITON_INTERPRET=1


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter):
    """Figures a test measured (record_property("figure", text), e.g. the real tier's parity errors),
    printed at the end: report properties reach the controller under pytest-xdist too."""
    lines = [f"{report.nodeid}: {value}" for report in terminalreporter.stats.get("passed", [])
             for name, value in getattr(report, "user_properties", ()) if name == "figure"]
    if lines:
        terminalreporter.write_sep("-", "measured figures (this machine)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _poisoned_kernel_outputs():
    """Every buffer a launcher allocates starts as NaN, so unwritten elements fail."""
    with poison_outputs():
        yield


@pytest.fixture
def reference_ops(monkeypatch):
    """Trainer and CLI tests run the PyTorch reference ops (the kernels have their own parity tests)
    with one intra-op thread: the models are tiny, and on a shared 2-core runner (pytest -n 2)
    OpenMP threads spin against each other and make every step ~50x slower."""
    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"
