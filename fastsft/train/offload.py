"""Offloaded activations whose copies overlap the compute (``offload_activations: true``).

With non-reentrant gradient checkpointing, what a training forward saves for backward is
essentially one tensor per decoder layer (the layer's input, which its recompute starts
from) plus a few tensors around the loss. ``torch.autograd.graph.save_on_cpu`` moves them
to host memory with a synchronous copy each way. Here instead:

- forward (pack): each saved tensor is copied device -> pinned host on a side CUDA stream
  (the side stream first waits for the compute that produced it); the device tensor is
  ``record_stream``'d on the side stream, so its memory is reused only after the copy, and
  the compute stream never waits;
- backward (unpack): the tensors are grouped by decoder layer (forward hooks before and
  after each layer open a new group). Unpacking a tensor of group g starts the host -> device
  copy of the group before it on the side stream (one layer ahead: at most two layers' tensors on the device,
  a double buffer), and the compute stream waits only on the event of the copy it needs.

On a CPU device the same code runs with the stream operations as no-ops: the "host" copy
is a plain CPU tensor and the prefetch a plain copy, so the tests hold the code path to
bit-exact round trips and unchanged gradients. Parameters (they stay resident anyway) and
tensors under ``MIN_BYTES`` are kept as they are.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional

import torch

MIN_BYTES = 1024  # smaller saved tensors stay where they are: a copy would cost more than it frees


class _Streams:
    """The side stream and its events on CUDA; every operation a no-op elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None

    def on_side(self):
        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def side_waits_for_compute(self) -> None:
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(self.device))

    def mark(self) -> Optional["torch.cuda.Event"]:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def compute_waits(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def used_on_side(self, t: torch.Tensor) -> None:
        if self.cuda:
            t.record_stream(self.side)

    def used_on_compute(self, t: torch.Tensor) -> None:
        if self.cuda:
            t.record_stream(torch.cuda.current_stream(self.device))


class _Offloaded:
    """One saved tensor in host memory, and its device copy while prefetched."""

    __slots__ = ("host", "group", "on_device", "ready")

    def __init__(self, host: torch.Tensor, group: int):
        self.host = host
        self.group = group
        self.on_device: Optional[torch.Tensor] = None
        self.ready = None


class OverlappedOffload:
    """``with OverlappedOffload(device, layers): loss = model(...)``, then ``loss.backward()``.

    ``layers``: the decoder layers (one group each); without them every tensor is its own group.
    ``stats`` counts what happened: offloaded tensors and bytes, kept tensors, prefetched and
    synchronous restores (for tests and the log).
    """

    def __init__(self, device: torch.device, layers: Iterable[torch.nn.Module] = ()):
        self.device = torch.device(device)
        self.streams = _Streams(self.device)
        self.layers = list(layers)
        self.groups: List[List[_Offloaded]] = []
        self.group = 0 if self.layers else -1
        self.stats = {"offloaded": 0, "offloaded_bytes": 0, "kept": 0, "prefetched": 0, "synchronous": 0}
        self._handles = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # ------------------------------------------------------------ context
    def __enter__(self):
        for layer in self.layers:  # a layer's checkpoint, and what comes between layers, each a group
            self._handles.append(layer.register_forward_pre_hook(self._next_group))
            self._handles.append(layer.register_forward_hook(self._next_group))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:  # the recompute in backward must not open groups
            handle.remove()
        self._handles.clear()
        return False

    def _next_group(self, module, *args) -> None:
        self.group += 1

    # ------------------------------------------------------------ forward: device -> host
    def _keep(self, t: torch.Tensor) -> bool:
        return (isinstance(t, torch.nn.Parameter) or t.device.type != self.device.type
                or t.numel() * t.element_size() < MIN_BYTES or t.layout != torch.strided)

    def _pack(self, t: torch.Tensor):
        if self._keep(t):
            self.stats["kept"] += 1
            return t
        if not self.layers:
            self.group += 1
        host = torch.empty_like(t, device="cpu", pin_memory=self.streams.cuda)
        self.streams.side_waits_for_compute()
        with self.streams.on_side():
            host.copy_(t, non_blocking=self.streams.cuda)
        self.streams.used_on_side(t)  # its memory is reused only once the copy has run
        entry = _Offloaded(host, self.group)
        while len(self.groups) <= entry.group:
            self.groups.append([])
        self.groups[entry.group].append(entry)
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += host.numel() * host.element_size()
        return entry

    # ------------------------------------------------------------ backward: host -> device
    def _fetch(self, entry: _Offloaded) -> None:
        with self.streams.on_side():
            on_device = torch.empty_like(entry.host, device=self.device)
            on_device.copy_(entry.host, non_blocking=self.streams.cuda)
            entry.ready = self.streams.mark()
        entry.on_device = on_device

    def _prefetch_before(self, group: int) -> None:
        """Start copying the tensors of the nearest earlier group that has any."""
        group = min(group, len(self.groups)) - 1
        while group >= 0 and not self.groups[group]:
            group -= 1
        if group < 0:
            return
        for entry in self.groups[group]:
            if entry.on_device is None:
                self._fetch(entry)

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        entry = packed
        if entry.on_device is None:
            self.stats["synchronous"] += 1
            self._fetch(entry)  # not prefetched (the first group of the backward, or a second unpack)
        else:
            self.stats["prefetched"] += 1
        self._prefetch_before(entry.group)  # the next layer of the backward, while this one runs
        self.streams.compute_waits(entry.ready)
        t, entry.on_device, entry.ready = entry.on_device, None, None
        self.streams.used_on_compute(t)
        return t


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The model's checkpointed decoder layers (transformers' GradientCheckpointingLayer), in order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


__all__ = ["OverlappedOffload", "decoder_layers", "MIN_BYTES"]
