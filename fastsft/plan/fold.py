"""Folded MLP tiles: a long trace runs each tiled MLP's identical tiles once, accounted exactly.

A tiled MLP (fastsft.patch.tiled_mlp) of L tokens runs ceil(L / tile) tiles in forward and again in
backward, and at 1M tokens those tile bodies are most of a trace's operators (128 tiles x 32 layers
x forward, recompute and backward). Every full tile after the first is the same computation on the
same shapes with the same tensors alive around it: tile 1 allocates the full-size output (forward) or
the fp32 gradient sums (backward), tiles 2..n only reuse them, and a last partial tile is smaller. So
the trace runs tiles 1 and 2 (KEPT), tile 3 and the partial tile; tile 3 stands for tiles 3..n_full.
Memory: tile 2 starts with what tile 1 left, and from tile 3 on every full tile starts and ends with
the same live set, so the peak over the tiles is the peak of tiles 1 to 3 (the test compares a folded
and an unfolded trace byte for byte). FLOPs: the tracker counts tile 3's operators (n_full - 2) times.
Up to KEPT + 1 full tiles nothing is folded.
"""
from __future__ import annotations

import contextlib


# tiles run before the one that stands for the rest: the live set at a tile's start holds what the
# previous tile left (its output / its gradients, until the next assignment) and, from tile 2, what tile
# 1 allocated once (the output, the fp32 sums; an fp32 gradient becomes the sum itself), so it is the
# same from tile 3 on
KEPT = 2


class TileFolder:
    """Replaces tiled_mlp's tile iterator while a trace runs; `folded` counts the tile bodies skipped."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.folded = 0

    def tiles(self, rows: int, tile: int):
        full, rest = divmod(rows, tile)
        if full <= KEPT + 1:
            for start in range(0, rows, tile):
                yield start, min(start + tile, rows)
            return
        for k in range(KEPT):
            yield k * tile, (k + 1) * tile
        previous = self.tracker.flop_scale
        self.tracker.flop_scale = previous * (full - KEPT)  # this tile stands for tiles KEPT+1..full
        try:
            yield KEPT * tile, (KEPT + 1) * tile
        finally:
            self.tracker.flop_scale = previous
        self.folded += full - KEPT - 1
        if rest:
            yield full * tile, rows


@contextlib.contextmanager
def folded_tiles(tracker):
    """Within the block, tiled MLPs run their identical tiles once (see the module's docstring)."""
    from fastsft.patch import tiled_mlp

    folder = TileFolder(tracker)
    stock = tiled_mlp._tiles
    tiled_mlp._tiles = folder.tiles
    try:
        yield folder
    finally:
        tiled_mlp._tiles = stock


__all__ = ["TileFolder", "folded_tiles"]
