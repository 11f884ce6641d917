"""`fastsft plan`: one optimizer step of a config traced under FakeTensorMode on the CPU: peak device
memory and its parts, host memory, FLOPs, and the largest context or micro-batch a GPU fits.

Python API (for other tools, e.g. a long-context feature checking what it saves):

    from fastsft.plan import load_plan_config, prepare, plan_step, max_context, Margin, parse_size
    config = load_plan_config("examples/plan/llama-3.1-8b-qlora.yaml")
    prepared = prepare(config, "fastsft")              # the fake model, built once (~10 s at 8B)
    step = plan_step(config, 8192, model_state=prepared)  # StepPlan: peak_bytes, weights_bytes, ...
    found = max_context(config, parse_size("80GB"), model_state=prepared)  # SearchResult: .best tokens
"""
from __future__ import annotations

from fastsft.plan.config import load_plan_config
from fastsft.plan.search import Margin, SearchResult, parse_size, search_max
from fastsft.plan.step import PreparedModel, StepPlan, plan_step, prepare

__all__ = ["load_plan_config", "prepare", "plan_step", "max_context", "max_batch", "Margin", "parse_size",
           "StepPlan", "SearchResult", "PreparedModel"]


def max_context(config, gpu_bytes: int, *, recipe: str = "fastsft", margin: Margin = None, batch: int = 1,
                model_state=None, tolerance: float = 0.01) -> SearchResult:
    """The longest sequence (tokens per document, `batch` documents) whose step fits `gpu_bytes`; with
    sequence_parallel N, per GPU, the sequence a multiple of N (searched in tokens per rank)."""
    from fastsft.plan.sequence import scale_search, size_of

    state = model_state or prepare(config, recipe)
    budget = (margin or Margin()).budget(gpu_bytes)
    unit = size_of(config)
    found = search_max(lambda n: state.trace(n * unit, batch).peak_bytes, budget, start=(1024, 2048),
                       low=max(1, 2 // unit), tolerance=tolerance)
    return scale_search(found, unit)


def max_batch(config, gpu_bytes: int, seq_len: int, *, recipe: str = "fastsft", margin: Margin = None,
              model_state=None) -> SearchResult:
    """The most documents of `seq_len` tokens per micro-batch whose step fits `gpu_bytes`."""
    state = model_state or prepare(config, recipe)
    budget = (margin or Margin()).budget(gpu_bytes)
    return search_max(lambda b: state.trace(seq_len, b).peak_bytes, budget, start=(1, 2), low=1,
                      tolerance=0.0)
