"""Tiled MLP: the gate/up -> SwiGLU -> down block run over token tiles, forward and backward.

At long context the MLP's intermediates (gate, up, their product and, in backward, their
gradients: several tokens x intermediate_size buffers, 14,336 wide at 8B) are the largest
per-token cost left once the logits are chunked and attention is O(N). Above
``tile_tokens`` tokens the MLP runs over tiles of that many tokens: the forward keeps only
its input (no intermediates), and the backward recomputes each tile's forward under
autograd and back-propagates it at once, so at most one tile's intermediates are alive.

Exactness: every token's output is the same computation as untiled (the MLP is per
token, so packed sequences need nothing special). Parameter gradients (LoRA adapters,
or every weight in full fine-tuning) are summed across tiles in fp32 and rounded once
to the parameter's dtype. Dropout inside the MLP (LoRA dropout) draws the same masks in
the backward's recompute as in the forward: the RNG state is saved and restored, as
torch.utils.checkpoint does. Autocast is re-entered in backward with the forward's state.

It composes with non-reentrant gradient checkpointing: the checkpointed layer's recompute
runs this forward again (saving only the input), then this backward runs.

Hooks: the swiglu patch's MLP forwards call :func:`run` (patch/layers.py); an MLP the
swiglu patch left alone (swiglu off) gets its own instance forward from :func:`apply`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, List, Optional

import torch

from . import base_model_of
from .families import is_patched, mlp_layout, original_forward, restore_forward, set_forward

logger = logging.getLogger("fastsft.patch")

_ATTR = "_fastsft_mlp_tile_tokens"  # on each tiled MLP module: tokens per tile (and the threshold)
_TAG = "fastsft.tiled_mlp"
_SWIGLU_TAG = "fastsft.swiglu"


def tile_tokens_of(module: torch.nn.Module) -> Optional[int]:
    return module.__dict__.get(_ATTR)


# ---------------------------------------------------------------- autograd
def _autocast_state(device_type: str):
    states = []
    for kind in {device_type, "cpu"}:
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            states.append((kind, torch.get_autocast_dtype(kind)))
    return states


@contextlib.contextmanager
def _autocast_as(states, device_type: str):
    with contextlib.ExitStack() as stack:
        enabled = {kind for kind, _ in states}
        for kind in {device_type, "cpu"}:
            if kind not in enabled and torch.amp.is_autocast_available(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        for kind, dtype in states:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        yield


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _tiles(rows: int, tile: int):
    for start in range(0, rows, tile):
        yield start, min(start + tile, rows)


def _forward_tiles(body: Callable, x2d: torch.Tensor, tile: int) -> torch.Tensor:
    out = None
    for start, end in _tiles(x2d.shape[0], tile):
        y = body(x2d[start:end])
        if out is None:
            out = y.new_empty((x2d.shape[0], y.shape[-1]))
        out[start:end] = y
    return out


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, body, tile, x2d, *params):
        ctx.body, ctx.tile, ctx.params = body, tile, params
        ctx.autocast = _autocast_state(x2d.device.type)
        ctx.rng = _rng_state(x2d.device)
        # autograd is off inside Function.forward; detached, the tiles are plain tensors (a view made
        # under no_grad would still claim requires_grad, which module hooks such as ModTracker trip on)
        out = _forward_tiles(body, x2d.detach(), tile)
        ctx.save_for_backward(x2d)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x2d,) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        want_x = needs[2]
        trained = [i for i, need in enumerate(needs[3:]) if need]
        if not want_x and not trained:
            return (None, None, None) + (None,) * len(ctx.params)
        grad_x = torch.empty_like(x2d) if want_x else None
        sums: List[Optional[torch.Tensor]] = [None] * len(trained)
        device = x2d.device
        # the forward's RNG stream again, tile after tile in the same order: same dropout masks
        with torch.random.fork_rng(devices=_rng_devices(device), device_type=device.type), \
                torch.enable_grad(), _autocast_as(ctx.autocast, device.type):
            _set_rng_state(ctx.rng, device)
            for start, end in _tiles(x2d.shape[0], ctx.tile):
                xt = x2d[start:end].detach().requires_grad_(want_x)
                y = ctx.body(xt)
                inputs = ([xt] if want_x else []) + [ctx.params[i] for i in trained]
                grads = torch.autograd.grad(y, inputs, grad_out[start:end], allow_unused=True)
                del y
                if want_x:
                    grad_x[start:end] = grads[0]
                    grads = grads[1:]
                for k, g in enumerate(grads):
                    if g is None:
                        continue
                    if sums[k] is None:
                        sums[k] = g.float() if g.dtype != torch.float32 else g
                    else:
                        sums[k].add_(g)  # fp32 accumulation across tiles
        out = [None] * len(ctx.params)
        for k, i in enumerate(trained):
            if sums[k] is not None:
                out[i] = sums[k].to(ctx.params[i].dtype)
        return (None, None, grad_x) + tuple(out)


@torch.compiler.disable
def _run_tiled(module: torch.nn.Module, x: torch.Tensor, body: Callable, tile: int) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    params = tuple(p for p in module.parameters() if p.requires_grad)
    if torch.is_grad_enabled() and (x.requires_grad or params):
        out = _TiledMLP.apply(body, tile, x2d, *params)
    else:
        out = _forward_tiles(body, x2d, tile)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def run(module: torch.nn.Module, x: torch.Tensor, body: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """body(x), over token tiles when the module is tiled and x holds more tokens than a tile."""
    tile = module.__dict__.get(_ATTR)
    if tile is None or x.dim() < 2 or x.numel() <= tile * x.shape[-1]:
        return body(x)
    return _run_tiled(module, x, body, tile)


def run_mlp(mlp: torch.nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """mlp(x) over tiles of ``tile`` tokens (for tests and callers holding a bare MLP module)."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    return _run_tiled(mlp, x, mlp, tile) if x.numel() > tile * x.shape[-1] else mlp(x)


# ---------------------------------------------------------------- model-level switch
def _stock_tiled_forward(self, x):
    inner = original_forward(self)
    return run(self, x, inner)


def apply(model: torch.nn.Module, tile_tokens: int) -> List[str]:
    """Tile every known MLP of ``model`` above ``tile_tokens`` tokens; returns what was tiled."""
    if not isinstance(tile_tokens, int) or isinstance(tile_tokens, bool) or tile_tokens <= 0:
        raise ValueError(f"tile_tokens must be a positive int, got {tile_tokens!r}")
    done = {}
    for _, module in base_model_of(model).named_modules():
        if mlp_layout(module) is None:
            continue
        module.__dict__[_ATTR] = tile_tokens
        if not is_patched(module, _SWIGLU_TAG):  # the swiglu forward consults the attribute itself
            set_forward(module, _stock_tiled_forward, _TAG)
        done[type(module).__name__] = done.get(type(module).__name__, 0) + 1
    return [f"{name} x{count} (tiles of {tile_tokens} tokens)" for name, count in sorted(done.items())]


def revert(model: torch.nn.Module) -> None:
    for _, module in base_model_of(model).named_modules():
        module.__dict__.pop(_ATTR, None)
        restore_forward(module, _TAG)


# ---------------------------------------------------------------- default tile from free memory
# bytes per token of one tile in backward: gate, up, act(gate)*up and their gradients (about
# 6 intermediate-wide buffers in the compute dtype) plus slack for LoRA's and the kernels' own
_TILE_BUFFERS = 8
# a tile's intermediates take at most 1/4 of the free memory: a 16k-token batch of an 8B model
# stays untiled with 18 GiB free (a 24 GB card after QLoRA weights); the planner refines this
_TILE_FRACTION = 4
_TILE_MULTIPLE = 1024
_MIN_TILE = 1024


def default_tile_tokens(intermediate_size: int, element_size: int, free_bytes: int) -> int:
    """Tokens per tile (= the threshold) so one tile's intermediates fit in 1/4 of free memory."""
    per_token = max(1, _TILE_BUFFERS * intermediate_size * element_size)
    tokens = free_bytes // _TILE_FRACTION // per_token
    return max(_MIN_TILE, tokens // _TILE_MULTIPLE * _TILE_MULTIPLE)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device (CUDA: the driver's figure; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


__all__ = ["apply", "revert", "run", "run_mlp", "tile_tokens_of", "default_tile_tokens", "free_memory_bytes"]
