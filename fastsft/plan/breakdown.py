"""What is alive at a traced step's peak, grouped, with the bytes each group costs per token.

The tracker (record=True) keeps every storage's life; the storages alive at the peak are grouped by the
op that made them, their module (layer numbers folded: layers.* and a count), dtype, phase and shape
with the token dimension written `L`. A storage with a dimension equal to the step's token count grows
with the context: its bytes per token are its bytes / tokens; the rest (weights, optimizer state, one
MLP tile's or loss chunk's buffers) are fixed. Trace a length that no other dimension equals (the long
traces do: 100k+ tokens against 4,096-wide hidden states).

Under sequence parallelism a rank holds L/N tokens outside attention and all L inside it (heads/N): a
dimension equal to either grows with the context (written `L/N` or `L`), and every bytes-per-token figure
is one GPU's bytes per token of the whole sequence (L), the unit of the max-context line.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, List, Optional

_LAYER = re.compile(r"\.layers\.\d+")
_PREFIX = re.compile(r"^(PeftModelForCausalLM\.base_model\.model\.|[A-Za-z0-9]+ForCausalLM\.)")


def _module(name: str) -> str:
    return _LAYER.sub(".layers.*", _PREFIX.sub("", name or "")) or "-"


def _shape(shape: tuple, tokens: int, shard: Optional[int] = None, ranks: int = 1) -> str:
    def dim(d):
        return "L" if d == tokens else f"L/{ranks}" if shard is not None and d == shard else str(d)
    return "(" + ", ".join(dim(d) for d in shape) + ")"


def group_live(lives, tokens: int, shard_tokens: Optional[int] = None, ranks: int = 1) -> List[Dict]:
    """Rows, largest first: op, module, dtype, shape, phase, category, count, bytes, bytes_per_token.
    `shard_tokens` (sequence parallelism over `ranks`): a rank's share of the `tokens`, which grows too."""
    shard = shard_tokens if shard_tokens and shard_tokens != tokens else None
    groups = defaultdict(lambda: [0, 0, False])
    for life in lives:
        per_token = tokens in life.shape or (shard is not None and shard in life.shape)
        key = (life.op, _module(life.module), life.dtype, _shape(life.shape, tokens, shard, ranks), life.phase,
               life.category)
        entry = groups[key]
        entry[0] += 1
        entry[1] += life.nbytes
        entry[2] = entry[2] or per_token
    rows = []
    for (op, module, dtype, shape, phase, category), (count, nbytes, per_token) in groups.items():
        rows.append({"op": op, "module": module, "dtype": dtype, "shape": shape, "phase": phase,
                     "category": category, "count": count, "bytes": nbytes,
                     "bytes_per_token": nbytes / tokens if per_token else 0.0})
    rows.sort(key=lambda r: (-r["bytes_per_token"], -r["bytes"]))
    return rows


def summary(rows: List[Dict]) -> Dict:
    per_token = sum(r["bytes_per_token"] for r in rows)
    fixed = sum(r["bytes"] for r in rows if not r["bytes_per_token"])
    return {"bytes_per_token": per_token, "fixed_bytes": fixed}


def lines(rows: List[Dict], tokens: int, top: int = 25, rank_tokens: Optional[int] = None) -> List[str]:
    """The printed table (--breakdown): the per-token rows, then the largest fixed ones. `rank_tokens`:
    sequence parallelism (one GPU's bytes, per token of the whole sequence)."""
    total = summary(rows)
    unit = "per token" if rank_tokens is None else f"per token of the whole sequence (one GPU; it holds {rank_tokens:,})"
    out = [f"  alive at the peak ({tokens:,} tokens): {total['bytes_per_token'] / 1024:,.1f} KiB {unit} + "
           f"{total['fixed_bytes'] / 2 ** 30:.2f} GiB fixed",
           f"    {'KiB/token':>9}  {'n':>4}  {'dtype':<8} {'shape':<22} {'op':<40} module (phase)"]
    growing = [r for r in rows if r["bytes_per_token"]]
    for r in growing[:top]:
        out.append(f"    {r['bytes_per_token'] / 1024:9.2f}  {r['count']:4d}  {r['dtype']:<8} {r['shape']:<22} "
                   f"{r['op']:<40} {r['module']} ({r['phase']})")
    if len(growing) > top:
        rest = sum(r["bytes_per_token"] for r in growing[top:])
        out.append(f"    {rest / 1024:9.2f}        ({len(growing) - top} more rows)")
    fixed = sorted((r for r in rows if not r["bytes_per_token"]), key=lambda r: -r["bytes"])[:8]
    out.append(f"    largest fixed: " + "; ".join(f"{r['op']} {r['module']} {r['shape']} {r['dtype']} x{r['count']} "
                                                 f"{r['bytes'] / 2 ** 30:.2f} GiB" for r in fixed))
    return out


__all__ = ["group_live", "summary", "lines"]
