"""``long_context: auto | on | off``: MLP tiling, activation offload and the loss chunk, chosen per run.

Two sources of figures:

- the memory planner's (``PlannerPeaks``: ``fastsft plan``'s traced peaks of this config's step, or a
  ``MemoryFigures`` linear breakdown). With them, ``choose`` picks the cheapest
  setting that fits -- nothing, then MLP tiles, then tiles + offloaded checkpoints (only with
  gradient checkpointing) -- and a context that cannot fit gets the verdict (the most tokens that
  fit, the memory the asked context would take) before any weight is loaded;
- without them, the free memory measured once the weights are loaded: the MLP tile (= the
  threshold above which a batch is tiled) and the loss chunk rows each take a bounded share of it
  (``tiled_mlp.default_tile_tokens``, ``loss_chunk.default_chunk_tokens``), so a short batch runs
  untiled and a long one is tiled where it is needed.

``on`` tiles every batch longer than one tile, with a tile of at most half the tokens one rank's MLP
sees (so this run's batches are tiled); it offloads the checkpoints only when the config asks for it
(``offload_activations``) or when the planner's traces show that tiles alone do not fit (with gradient
checkpointing); it never offloads on its own from free memory. ``off`` leaves the model as configured. Explicit ``mlp_tile_tokens`` / ``loss_chunk_tokens`` always win.
The choice is logged in one line.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

from fastsft.errors import ConfigError

GIB = 2**30


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"
# per-token components of the planner's breakdown that the settings act on; the others stay
MLP = "mlp_intermediate"  # gate/up/product and their gradients: per tile once tiled
CHECKPOINTS = "checkpoints"  # the layers' saved inputs: on the host once offloaded
LOGITS = "logits"  # the loss's logits rows: per chunk


@dataclasses.dataclass(frozen=True)
class LongContextChoice:
    tile_tokens: Optional[int]  # None: the MLP is not tiled
    offload: bool
    loss_chunk_tokens: Optional[int]  # None: the kernel's own chunk
    peak_bytes: Optional[int] = None  # from the figures (planner traces or a breakdown) only
    source: str = "free memory"

    def line(self, mode: str, tokens: int, free_bytes: Optional[int] = None, rank: Optional[int] = None) -> str:
        tile = f"MLP tiles of {self.tile_tokens:,} tokens above {self.tile_tokens:,}" if self.tile_tokens \
            else "MLP untiled"
        chunk = f"loss chunk {self.loss_chunk_tokens:,} rows" if self.loss_chunk_tokens else "loss chunk: kernel's own"
        per_rank = f" ({rank:,} per rank's MLP under sequence parallelism)" if rank and rank != tokens else ""
        text = f"long_context {mode}: {tokens:,} tokens per micro-batch{per_rank}; {tile}; {chunk}; " \
               f"offload {'on' if self.offload else 'off'}"
        if self.peak_bytes is not None:
            text += f" ({self.source}: peak {_size(self.peak_bytes)})"
        elif free_bytes is not None:
            text += f" (from {_size(free_bytes)} free after loading the weights)"
        return text


@dataclasses.dataclass(frozen=True)
class MemoryFigures:
    """A step's memory as a linear breakdown (bytes): what does not depend on the token count, and
    the peak bytes per token by component. ``PlannerPeaks`` is the traced counterpart."""

    capacity_bytes: int  # device memory the step may use
    fixed_bytes: int  # weights, adapters, optimizer state, workspaces: independent of the tokens
    per_token_bytes: Dict[str, float]  # peak bytes per token, by component (MLP, CHECKPOINTS, LOGITS, others)
    source: str = "breakdown"

    def _split(self):
        per = self.per_token_bytes
        rest = sum(v for k, v in per.items() if k not in (MLP, CHECKPOINTS, LOGITS))
        return per.get(MLP, 0.0), per.get(CHECKPOINTS, 0.0), per.get(LOGITS, 0.0), rest

    def peak(self, tokens: int, tile: Optional[int], offload: bool, chunk: Optional[int]) -> int:
        """The step's peak for ``tokens`` under a setting."""
        mlp, ckpt, logits, rest = self._split()
        mlp_rows = min(tokens, tile) if tile else tokens
        loss_rows = min(tokens, chunk) if chunk else tokens
        return int(self.fixed_bytes + tokens * rest + (0 if offload else tokens * ckpt)
                   + mlp_rows * mlp + loss_rows * logits)

    def max_tokens(self, tile: Optional[int], offload: bool, chunk: Optional[int]) -> int:
        """The most tokens that fit under a setting (tiles and chunks capped: linear above them)."""
        mlp, ckpt, logits, rest = self._split()
        slope = rest + (0 if offload else ckpt) + (0 if tile else mlp) + (0 if chunk else logits)
        room = self.capacity_bytes - self.fixed_bytes - (tile or 0) * mlp - (chunk or 0) * logits
        if room <= 0:
            return 0
        return int(room // slope) if slope > 0 else 2**62


class PlannerTraceError(Exception):
    """A trace of this config failed (an op the fake tensors cannot run, a data-dependent shape): not a
    verdict on the memory, so the caller falls back to free-memory sizing."""


class PlannerPeaks:
    """Peaks traced by ``fastsft plan`` (FakeTensorMode, CPU): one fake model of the config, each setting
    switched on it between traces (MLP tiles, loss chunk) or in the traced config (offload). A failed trace
    raises PlannerTraceError."""

    source = "planner"

    def __init__(self, config, capacity_bytes: int):
        from fastsft.plan import Margin, prepare

        self.config = dataclasses.replace(config)  # the traces switch offload on this copy
        self.state = prepare(self.config, "fastsft")
        self.capacity_bytes = Margin().budget(capacity_bytes)  # the planner's allocator margin, stated there
        # DDP without sequence parallelism: its gradient buckets (a copy of the trainable gradients) are not
        # in the one-process trace; under sequence parallelism the trace adds them itself (plan.sequence.per_rank)
        self.extra_bytes = ddp_bucket_bytes(config, self.state.params)

    def _set(self, tile, offload, chunk) -> None:
        from fastsft.patch import loss_chunk, tiled_mlp

        if tile:
            tiled_mlp.apply(self.state.model, tile)
        else:
            tiled_mlp.revert(self.state.model)
        loss_chunk.set_chunk_tokens(self.state.model, chunk)
        self.config.offload_activations = offload

    def _trace(self, tokens: int):
        try:
            return self.state.trace(tokens, 1)  # one document of `tokens` (the longest case)
        except (ConfigError, RuntimeError, ImportError) as exc:  # ConfigError: the planner's "untraceable"
            raise PlannerTraceError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
                from exc

    def peak(self, tokens: int, tile: Optional[int], offload: bool, chunk: Optional[int]) -> int:
        self._set(tile, offload, chunk)
        self.last = self._trace(tokens)
        return self.last.peak_bytes + self.extra_bytes

    def max_tokens(self, tile: Optional[int], offload: bool, chunk: Optional[int]) -> int:
        from fastsft.plan.search import search_max

        self._set(tile, offload, chunk)
        return search_max(lambda n: self._trace(n).peak_bytes + self.extra_bytes, self.capacity_bytes,
                          start=(1024, 2048), low=2).best


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def ddp_bucket_bytes(config, params) -> int:
    """DDP's gradient buckets on each rank (world > 1, strategy ddp, no sequence parallelism), else 0."""
    from fastsft.distributed.wrap import resolve_strategy

    if _world_size() <= 1 or config.sequence_parallel > 1 or resolve_strategy(config) != "ddp":
        return 0
    return sum(p.numel() * p.element_size() for p in params)


def choose(peaks, tokens: int, *, mode: str, checkpointing: bool, tile: int, chunk: int,
           offload_asked: bool, tile_asked: bool = False, rank: Optional[int] = None) -> LongContextChoice:
    """The cheapest setting that fits ``tokens`` under ``peaks`` (a MemoryFigures or PlannerPeaks):
    nothing, then MLP tiles, then tiles + offload (with gradient checkpointing). ``tile``/``chunk``: the
    sizes to use when on; ``tile_asked``/``offload_asked``: the config names them, so they stay on.
    ``rank``: the tokens one rank's MLP sees (``rank_tokens``; default ``tokens``), what a tile cuts.
    Raises ConfigError with the verdict when none fits."""
    settings = [(None, False), (tile, False)] if mode == "auto" and not tile_asked else [(tile, False)]
    if checkpointing:
        settings.append((tile, True))
    if offload_asked:  # the user asked for offload: keep it on
        settings = [(t, True) for t, _ in settings]
    for tile_tokens, offload in settings:
        peak = peaks.peak(tokens, tile_tokens, offload, chunk)
        if peak <= peaks.capacity_bytes:
            mlp_tokens = rank or tokens
            return LongContextChoice(tile_tokens if tile_tokens and mlp_tokens > tile_tokens else None, offload, chunk,
                                     peak, source=peaks.source)
    best_tile, best_offload = settings[-1]
    need = peaks.peak(tokens, best_tile, best_offload, chunk)
    fits = peaks.max_tokens(best_tile, best_offload, chunk)
    hint = "" if checkpointing else "; gradient_checkpointing: true would let checkpoints go to the host"
    raise ConfigError(
        f"config key 'max_seq_length': {tokens:,} tokens per micro-batch do not fit in "
        f"{_size(peaks.capacity_bytes)} ({peaks.source} peak with MLP tiles and "
        f"{'offload' if best_offload else 'no offload'}: {_size(need)}); at most {fits:,} tokens fit{hint}")


def micro_batch_tokens(config) -> int:
    return config.batch_tokens if config.packing else config.batch_size * config.max_seq_length


def rank_tokens(config) -> int:
    """The tokens one rank's MLP sees: under sequence parallelism its shard of the micro-batch (L/N)."""
    n = max(1, int(getattr(config, "sequence_parallel", 1) or 1))
    return -(-micro_batch_tokens(config) // n)


def check_positions(config, model_config) -> None:
    """A context above the model's max_position_embeddings needs a RoPE scaling in its config."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit or config.max_seq_length <= limit:
        return
    # transformers 5 spells it rope_parameters (rope_scaling is the same dict), with rope_type
    # "default" when nothing is scaled; older configs have rope_scaling None then
    scaled = False
    for name in ("rope_scaling", "rope_parameters"):
        value = getattr(model_config, name, None)
        if isinstance(value, dict):
            kind = value.get("rope_type", value.get("type", "default"))
            scaled = scaled or kind not in (None, "default")
        elif value:
            scaled = True
    if not scaled:
        raise ConfigError(
            f"config key 'max_seq_length' ({config.max_seq_length:,}) is above the model's max_position_embeddings "
            f"({limit:,}) and its config has no rope_scaling; lower max_seq_length or use a model with RoPE scaling")


def free_sizes(config, model_config, device: torch.device, element_size: int):
    """(tile, chunk, free bytes): the sizes from the free memory now (explicit keys win)."""
    from fastsft.patch import loss_chunk, tiled_mlp

    free = tiled_mlp.free_memory_bytes(device)
    intermediate = int(getattr(model_config, "intermediate_size", 0) or 0)
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    tile = config.mlp_tile_tokens or (tiled_mlp.default_tile_tokens(intermediate, element_size, free)
                                      if intermediate else None)
    if config.long_context == "on" and not config.mlp_tile_tokens and tile:
        tile = min(tile, max(1, rank_tokens(config) // 2))  # "on": tiled at this run's length (a rank's share)
    chunk = config.loss_chunk_tokens or (loss_chunk.default_chunk_tokens(vocab, element_size, free) if vocab else None)
    return tile, chunk, free


def plan_before_load(config, model_config, device: torch.device, element_size: int, *,
                     use_planner: Optional[bool] = None) -> Optional[LongContextChoice]:
    """Before any weight is loaded: the planner's choice for a context longer than the free-memory tile,
    or ConfigError with its verdict when nothing fits. ``use_planner``: default on CUDA devices only
    (the planner plans a GPU's memory). None when not consulted (short context, off, untraceable)."""
    import logging

    if config.long_context == "off":
        return None
    if use_planner is None:
        use_planner = device.type == "cuda"
    tokens = micro_batch_tokens(config)
    tile, chunk, free = free_sizes(config, model_config, device, element_size)
    if not use_planner or (config.long_context == "auto" and tile and rank_tokens(config) <= tile):
        return None
    capacity = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else free

    def fall_back(reason) -> None:
        logging.getLogger("fastsft").warning("long_context: the planner cannot trace this config (%s); "
                                             "sizes from free memory", reason)

    try:
        peaks = PlannerPeaks(config, capacity)
    except (ConfigError, ImportError) as exc:  # e.g. kernels not yet traceable: sizes from free memory
        return fall_back(exc)
    try:  # choose's "does not fit" verdict (a ConfigError) is not caught: it stops the run before loading
        return choose(peaks, tokens, mode=config.long_context, checkpointing=config.gradient_checkpointing,
                      tile=tile, chunk=chunk, offload_asked=config.offload_activations,
                      tile_asked=bool(config.mlp_tile_tokens), rank=rank_tokens(config))
    except PlannerTraceError as exc:
        return fall_back(exc)


def apply_explicit(model: torch.nn.Module, config) -> None:
    """The sizes the config names (the trainer's model and fastsft plan's fake one alike)."""
    from fastsft.patch import loss_chunk, tiled_mlp

    if config.mlp_tile_tokens:
        tiled_mlp.apply(model, config.mlp_tile_tokens)
    if config.loss_chunk_tokens:
        loss_chunk.set_chunk_tokens(model, config.loss_chunk_tokens)


def apply(config, model: torch.nn.Module, device: torch.device, element_size: int,
          planned: Optional[LongContextChoice] = None) -> Optional[str]:
    """Set the tiles and the loss chunk on the loaded model; returns the one line to log (None: nothing set).

    ``planned``: the planner's choice (``plan_before_load``); without it the sizes come from the free memory."""
    from fastsft.patch import loss_chunk, tiled_mlp

    if config.long_context == "off" and not config.mlp_tile_tokens and not config.loss_chunk_tokens:
        return None
    tile, chunk, free = free_sizes(config, getattr(model, "config", None), device, element_size)
    choice = planned or LongContextChoice(tile if config.long_context != "off" or config.mlp_tile_tokens else None,
                                          bool(config.offload_activations),
                                          chunk if config.long_context != "off" or config.loss_chunk_tokens else None)
    if choice.tile_tokens:
        tiled_mlp.apply(model, choice.tile_tokens)
    loss_chunk.set_chunk_tokens(model, choice.loss_chunk_tokens)
    if choice.offload and not config.offload_activations:
        config.offload_activations = True  # the planner's choice (gradient checkpointing is on)
    return choice.line(config.long_context, micro_batch_tokens(config), None if planned else free,
                       rank=rank_tokens(config))


__all__ = ["MemoryFigures", "PlannerPeaks", "PlannerTraceError", "LongContextChoice", "choose", "check_positions",
           "plan_before_load", "apply", "apply_explicit", "ddp_bucket_bytes"]
