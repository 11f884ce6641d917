"""The --max-context search: the longest sequence a probe can train, by doubling then bisection.

Kept free of torch/transformers imports so it can be tested with a fake probe.
"""
from __future__ import annotations

import time
from typing import Callable, Optional


class ProbeError(Exception):
    """A probe failed for a reason other than running out of memory (the search stops there)."""


def search_max_length(probe: Callable[[int], bool], *, start: int, cap: int, granularity: int,
                      rel_tol: float = 1 / 16, budget_s: float = 150.0,
                      clock: Callable[[], float] = time.monotonic) -> dict:
    """Longest length L (a multiple of `granularity`, at most `cap`) with probe(L) True.

    probe(L) returns True when L fits and False when it runs out of memory; it raises ProbeError for
    any other failure. Lengths double from `start` until a probe fails or `cap` passes, then bisect
    until the bracket [max_ok, min_failed] is within max(granularity, rel_tol * max_ok). Probing stops
    when `budget_s` has elapsed (a probe already running finishes); the bracket says how far it got.
    Returns max_ok (0 when nothing fitted), min_failed (None when nothing failed), the probes in order,
    and stopped_by: "converged", "cap", "budget" or "error" (with `error`).
    """
    for name, value in (("start", start), ("cap", cap), ("granularity", granularity)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if cap < start:
        raise ValueError(f"cap ({cap}) must be at least start ({start})")
    t0 = clock()
    probes: list = []
    state = {"ok": 0, "failed": None, "error": None}

    def run(length: int) -> Optional[bool]:
        """True / False, or None when the budget is spent or a probe failed otherwise."""
        if probes and clock() - t0 >= budget_s:
            return None
        p0 = clock()
        try:
            ok = bool(probe(length))
        except ProbeError as exc:
            state["error"] = f"length {length}: {exc}"
            probes.append({"length": length, "ok": False, "error": str(exc), "s": round(clock() - p0, 3)})
            state["failed"] = length if state["failed"] is None else min(state["failed"], length)
            return None
        probes.append({"length": length, "ok": ok, "s": round(clock() - p0, 3)})
        if ok:
            state["ok"] = max(state["ok"], length)
        else:
            state["failed"] = length if state["failed"] is None else min(state["failed"], length)
        return ok

    def result(stopped_by: str) -> dict:
        out = {"max_ok": state["ok"], "min_failed": state["failed"], "stopped_by": stopped_by,
               "probes": probes, "elapsed_s": round(clock() - t0, 3), "start": start, "cap": cap,
               "granularity": granularity, "rel_tol": rel_tol, "budget_s": budget_s}
        if state["error"]:
            out["error"] = state["error"]
        return out

    # grow: start, 2*start, ... capped at `cap`
    length = _round(start, granularity)
    while True:
        ok = run(length)
        if ok is None:
            return result("error" if state["error"] else "budget")
        if not ok:
            break
        if length >= cap:
            return result("cap")
        length = min(2 * length, cap)
    # bisect between the longest fit and the shortest failure
    while True:
        lo, hi = state["ok"], state["failed"]
        if hi - lo <= max(granularity, rel_tol * lo):
            return result("converged")
        mid = _round((lo + hi) // 2, granularity)
        if mid <= lo or mid >= hi:
            return result("converged")
        if run(mid) is None:
            return result("error" if state["error"] else "budget")


def _round(length: int, granularity: int) -> int:
    """Down to a multiple of granularity, never below one granule."""
    return max(granularity, (int(length) // granularity) * granularity)
