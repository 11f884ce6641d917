"""GPU sizes, the allocator margin, and the largest context / micro-batch that fits.

A step's traced peak is linear in the sequence length (and in the micro-batch): a + b * L. Two traces
fit the line, its crossing with the budget is traced, and the bracket [fits, does not fit] closes from
there (secant steps on the latest two traces, bisection when a step would not shrink it) until it is
within 1% (`tolerance`), so a model whose peak is not linear (eager attention's L x L scores) still
gets a traced answer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from fastsft.errors import ConfigError

GiB = 1024 ** 3
SIZE_FORMS = "a number with a unit: 80GB, 80G, 80GiB, 24gb, 40960MB, 40960MiB, 0.5TB (GB = GiB = 2^30 bytes)"
_UNITS = {"": None, "b": 1, "k": 2 ** 10, "kb": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20, "mb": 2 ** 20,
          "mib": 2 ** 20, "g": GiB, "gb": GiB, "gib": GiB, "t": 2 ** 40, "tb": 2 ** 40, "tib": 2 ** 40}


def parse_size(text: str, what: str = "--gpu-memory", *, allow_zero: bool = False) -> int:
    """'80GB' -> bytes. GB and GiB both mean 2^30 bytes: an '80 GB' GPU reports about 80 GiB.
    `allow_zero`: any zero size ('0', '0MB', '0GiB') is 0 bytes (--reserve); otherwise it is refused."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if allow_zero and match and unit in _UNITS and float(match.group(1)) == 0:
        return 0
    if not match or unit not in _UNITS or _UNITS[unit] is None:
        raise ConfigError(f"{what} {text!r} is not a size; give {SIZE_FORMS}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{what} {text!r} must be more than 0 bytes")
    return value


@dataclass
class Margin:
    """What a trace of allocations cannot see, stated: a fixed reserve (CUDA context, cuBLAS workspace,
    bitsandbytes' buffers) and a fraction of the peak (the caching allocator's rounding and
    fragmentation). Defaults to be calibrated on a GPU (max_memory_reserved vs max_memory_allocated)."""
    reserve_bytes: int = GiB
    slack: float = 0.05

    def budget(self, gpu_bytes: int) -> int:
        """The largest traced peak that fits a GPU of `gpu_bytes`."""
        return int((gpu_bytes - self.reserve_bytes) / (1.0 + self.slack))

    def describe(self) -> str:
        return (f"margin: {self.reserve_bytes / GiB:.2f} GiB reserved (CUDA context, cuBLAS workspace, "
                f"bitsandbytes buffers) + {100 * self.slack:.0f}% of the traced peak (allocator slack)")


@dataclass
class SearchResult:
    best: int  # largest value that fits (0: none)
    budget_bytes: int
    traces: List[Tuple[int, int]] = field(default_factory=list)  # (value, peak bytes) in trace order
    fit: Optional[Tuple[float, float]] = None  # (a, b): peak = a + b * value from the first two traces
    # (a, b) through the answer's trace and the farthest trace at least half its value: the line where the
    # answer is (the first two traces may sit below a threshold: MLP tiles, loss chunks)
    local_fit: Optional[Tuple[float, float]] = None
    unit: Optional[str] = None  # what one value (b's unit) is, where a caller restated it (sequence parallelism)

    def to_dict(self) -> dict:
        return {"best": self.best, "budget_bytes": self.budget_bytes, **({"unit": self.unit} if self.unit else {}),
                "traces": [{"value": v, "peak_bytes": p} for v, p in self.traces],
                "linear_fit": {"a_bytes": self.fit[0], "b_bytes_per_unit": self.fit[1]} if self.fit else None,
                "local_fit": ({"a_bytes": self.local_fit[0], "b_bytes_per_unit": self.local_fit[1]}
                              if self.local_fit else None)}


def search_max(peak_of: Callable[[int], int], budget: int, *, start: Tuple[int, int] = (1024, 2048),
               low: int = 1, high: int = 1 << 24, tolerance: float = 0.01, max_traces: int = 14) -> SearchResult:
    """The largest integer v in [low, high] with peak_of(v) <= budget, to `tolerance` (relative); the
    answer is traced (it fits) and so is a value at most `tolerance` above it (it does not)."""
    result = SearchResult(0, budget)
    seen = {}

    def trace(v: int) -> int:
        if v not in seen:
            seen[v] = peak_of(v)
            result.traces.append((v, seen[v]))
        return seen[v]

    a_v, b_v = max(low, start[0]), max(low + 1, start[1])
    pa, pb = trace(a_v), trace(b_v)
    slope = (pb - pa) / (b_v - a_v)
    result.fit = (pa - slope * a_v, slope)
    fits, fails = (None, None)
    for v, p in ((a_v, pa), (b_v, pb)):
        if p <= budget:
            fits = v if fits is None else max(fits, v)
        elif fails is None or v < fails:
            fails = v
    if fits is None:  # even the smaller start does not fit: go down
        fails = a_v
        fits_v, v = None, a_v
        if result.fit[0] > budget and slope >= 0:  # the line's intercept is over budget: only `low` can tell
            v = low + 1
        while v > low and fits_v is None and len(seen) < max_traces:
            v = max(low, v // 2)
            if trace(v) <= budget:
                fits_v = v
            else:
                fails = v
        if fits_v is None:
            return result
        fits = fits_v
    last = list(seen.items())[-2:]
    while len(seen) < max_traces:
        if fails is not None and fails - fits <= max(1, math.floor(tolerance * fits)):
            break
        (v1, p1), (v2, p2) = last
        guess = None
        if p2 != p1:
            b = (p2 - p1) / (v2 - v1)
            if b > 0:
                guess = int(math.floor(v1 + (budget - p1) / b))
        upper = fails - 1 if fails is not None else high
        if guess is None or guess <= fits or guess > upper:
            guess = (fits + upper + 1) // 2 if fails is not None else min(high, fits * 2)
        if guess in seen or guess <= fits:
            guess = fits + 1
        if guess > high:
            break
        p = trace(guess)
        last = [last[-1], (guess, p)]
        if p <= budget:
            fits = guess
            if fails is None or fails > guess + 1:  # confirm the next value does not fit (L* + 1)
                nxt = guess + 1
                if nxt <= high and nxt not in seen and (fails is None or nxt < fails):
                    pn = trace(nxt)
                    last = [last[-1], (nxt, pn)]
                    if pn <= budget:
                        fits = nxt
                    else:
                        fails = nxt
        else:
            fails = guess
    result.best = fits
    if fits in seen:
        near = [(v, p) for v, p in seen.items() if v != fits and v >= fits / 2]
        if near:
            v, p = max(near, key=lambda t: abs(t[0] - fits))
            slope = (seen[fits] - p) / (fits - v)
            result.local_fit = (seen[fits] - slope * fits, slope)
    return result
