"""Live bytes of a traced step, by storage, with the op and module at the peak.

A TorchDispatchMode sees every op's outputs; each new storage is counted once (views share it) and
uncounted when it dies, through a weak reference to the storage (a storage dies with its last tensor).
Every storage belongs to one category, fixed when it appears: what existed before the step (weights,
trainable parameters, optimizer state, gradients kept from earlier micro-batches), or the phase that
allocated it (forward: activations kept for backward; backward; optimizer step). Gradients move to
their own category when autograd accumulates them into .grad. Category totals are kept incrementally,
so the peak's breakdown costs nothing per op (torch's MemTracker recomputes it and takes minutes at 8B).
FLOPs come from torch.utils.flop_counter's formulas, per op; forward ops that run again inside backward
(activation checkpointing) count as recompute.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("weights", "trainable", "optimizer_state", "grads", "activations", "backward", "optimizer_step")
DEVICE, HOST = "device", "host"


@dataclass
class Peak:
    bytes: int = 0
    by_category: Dict[str, int] = field(default_factory=dict)
    op: str = ""
    module: str = ""
    phase: str = ""
    op_output_bytes: int = 0  # what the op at the peak allocated
    op_index: int = -1  # the dispatched op at the peak, counted from 0


@dataclass
class Life:
    """One storage: its size and where it came from, and the op indices of its allocation and death."""
    nbytes: int
    category: str
    where: str
    op: str  # the op whose output it is ("existing": there before the step)
    module: str
    shape: tuple  # of the tensor that first showed the storage
    dtype: str
    born: int
    freed: Optional[int]
    phase: str


class MemoryTracker(TorchDispatchMode):
    def __init__(self, module_tracker=None):
        super().__init__()
        self._seen = WeakIdKeyDictionary()  # storage -> (key, device|host)
        self._refs: Dict[int, weakref.ref] = {}
        self._info: Dict[int, list] = {}  # key -> [nbytes, category, where]
        self._next = 0
        self.live = {DEVICE: 0, HOST: 0}
        self.by_category = {c: 0 for c in CATEGORIES}
        self.phase = "forward"
        self.where = DEVICE  # HOST while offload hooks copy a tensor out
        self.peak = Peak()
        self.host_peak = 0
        self.flops = {"forward": 0, "backward": 0, "recompute": 0, "optimizer_step": 0}
        self.forward_depth = 0  # > 0 inside a module's forward (in backward: a checkpoint's recompute)
        self.module_tracker = module_tracker
        self.max_numel_2d: Dict[str, tuple] = {}  # op -> largest output shape (tests look for L x L tensors)
        self._flop_registry = None
        self.uncounted_ops = set()  # custom operators whose FLOPs no formula gives
        self.flop_scale = 1  # > 1 while one traced op stands for that many identical ones (fold.py)
        self.ops = 0  # ops dispatched so far
        # record=True: every storage's life (op and module that made it, shape, dtype, op indices of its
        # allocation and death) for the live set at the peak (fastsft/plan/breakdown.py)
        self.record = False
        self.lives: list = []
        self._op_name = "existing"

    # ---------------------------------------------------------------- storages
    def register(self, tensors: Iterable[torch.Tensor], category: str, where: str = DEVICE) -> None:
        """Storages that exist before the trace (weights, optimizer state, kept gradients)."""
        for t in tensors:
            if t is not None:
                self._add(t, category, where)

    def reclassify(self, t: torch.Tensor, category: str) -> None:
        entry = self._seen.get(t.untyped_storage())
        if entry is None:
            self._add(t, category, DEVICE)
            return
        info = self._info[entry[0]]
        if info[2] == DEVICE and info[1] != category:
            self.by_category[info[1]] -= info[0]
            self.by_category[category] += info[0]
        info[1] = category
        if len(info) > 3:
            info[3].category = category

    def _add(self, t: torch.Tensor, category: str, where: str) -> int:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" and not _is_fake(t):
            return 0
        st = t.untyped_storage()
        if st in self._seen:
            return 0
        nbytes = st.nbytes()
        key = self._next
        self._next += 1
        self._seen[st] = (key, where)
        self._info[key] = [nbytes, category, where]
        if self.record:
            life = Life(nbytes, category, where, self._op_name, self._module() if self._op_name != "existing" else "",
                        tuple(t.shape), str(t.dtype).replace("torch.", ""), self.ops, None, self.phase)
            self._info[key].append(life)
            self.lives.append(life)
        self._refs[key] = weakref.ref(st, lambda _r, k=key: self._free(k))
        self.live[where] += nbytes
        if where == DEVICE:
            self.by_category[category] += nbytes
        else:
            self.host_peak = max(self.host_peak, self.live[HOST])
        return nbytes if where == DEVICE else 0

    def _free(self, key: int) -> None:
        nbytes, category, where, *life = self._info.pop(key)
        if life:
            life[0].freed = self.ops
        self._refs.pop(key, None)
        self.live[where] -= nbytes
        if where == DEVICE:
            self.by_category[category] -= nbytes

    def _category(self) -> str:
        if self.phase == "forward":
            return "activations"
        return self.phase  # "backward" | "optimizer_step"

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        added = 0
        self._op_name = str(func.overloadpacket)
        category = self._category()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                added += self._add(t, category, self.where)
                if t.dim() >= 2:
                    name = str(func.overloadpacket)
                    shape = tuple(t.shape)
                    best = self.max_numel_2d.get(name)
                    if best is None or t.numel() > _numel(best):
                        self.max_numel_2d[name] = shape
        if self.live[DEVICE] > self.peak.bytes:
            self.peak = Peak(self.live[DEVICE], dict(self.by_category), str(func.overloadpacket),
                             self._module(), self.phase, added, self.ops)
        self._count_flops(func, args, kwargs, out)
        self.ops += 1
        self._op_name = "existing"
        return out

    def live_at_peak(self) -> list:
        """The device storages alive right after the op at the peak (record=True only)."""
        at = self.peak.op_index
        return [life for life in self.lives if life.where == DEVICE and life.born <= at
                and (life.freed is None or life.freed > at)]

    def _module(self) -> str:
        if self.module_tracker is None:
            return ""
        parents = [p for p in self.module_tracker.parents if p != "Global"]
        if not parents:
            return ""
        return max(parents, key=lambda p: (p.count("."), len(p)))

    def _count_flops(self, func, args, kwargs, out) -> None:
        if self._flop_registry is None:
            self._flop_registry = _flop_formulas()
        formula = self._flop_registry.get(func.overloadpacket)
        if formula is None:
            namespace = getattr(func, "namespace", "aten")
            # a custom operator (e.g. fastsft::...) with no FLOP formula; (de)quantization is element-wise,
            # which torch's counter leaves out for aten ops too
            if namespace in ("fastsft", "bitsandbytes") and "quantize" not in func.__name__:
                self.uncounted_ops.add(str(func.overloadpacket))
            return
        flops = formula(*args, **kwargs, out_val=out) * self.flop_scale
        if self.phase == "backward" and self.forward_depth > 0:
            self.flops["recompute"] += flops
        else:
            self.flops[self.phase] += flops

    # ---------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def module_depth(self):
        """Count module forwards (global hooks): forward ops during backward are a checkpoint's recompute."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def pre(module, inputs):
            self.forward_depth += 1

        def post(module, inputs, output):
            self.forward_depth -= 1

        # always_call: a checkpoint's recompute stops early by raising out of the layer's forward
        handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def grad_hooks(self, params: Iterable[torch.nn.Parameter]):
        """.grad storages become 'grads' when autograd accumulates them."""
        handles = []
        for p in params:
            handles.append(p.register_post_accumulate_grad_hook(lambda p: self.reclassify(p.grad, "grads")))
        return handles


def _gemm_4bit_flops(a, b, shape, *args, out_val=None, **kwargs) -> int:
    """bitsandbytes' 4-bit matmul: A (..., K) times the dequantized (N, K) weight."""
    n, k = int(shape[0]), int(shape[1])
    return 2 * (a.numel() // a.shape[-1]) * n * k


def _flop_formulas() -> dict:
    """torch.utils.flop_counter's formulas (and fastsft/plan/flops.py's for the fastsft:: operators), plus
    the ops it lacks that a planned step runs: the CPU flash-attention kernels SDPA picks for fake CPU
    tensors (their GPU twins' formulas: same argument order) and bitsandbytes' 4-bit matmul."""
    from torch.utils.flop_counter import flop_registry

    from fastsft.plan.flops import register

    register()  # the fastsft:: operators' formulas (fastsft/plan/flops.py)
    formulas = dict(flop_registry)
    aten = torch.ops.aten
    for cpu, gpu in (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward",
                      "_scaled_dot_product_flash_attention_backward")):
        if hasattr(aten, cpu) and getattr(aten, gpu) in flop_registry:
            formulas[getattr(aten, cpu)] = flop_registry[getattr(aten, gpu)]
    bnb = getattr(torch.ops, "bitsandbytes", None)
    if bnb is not None and hasattr(bnb, "gemm_4bit"):
        formulas[bnb.gemm_4bit] = _gemm_4bit_flops
    return formulas


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def offload_to_host(tracker: MemoryTracker):
    """What `save_on_cpu` does on a GPU, for fake CPU tensors: pack copies a saved tensor to host memory
    (pinned, counted as host), unpack copies it back to the device in backward (counted as device).
    torch's save_on_cpu would see CPU tensors already and neither copy nor count them."""

    def pack(t):
        previous = tracker.where
        tracker.where = HOST
        try:
            packed = torch.empty_like(t)
            packed.copy_(t)
        finally:
            tracker.where = previous
        return packed

    def unpack(packed):
        return packed.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def overlapped_offload(tracker: MemoryTracker, model):
    """fastsft's own offload (fastsft.train.offload, what `fastsft train` runs with offload_activations):
    its copies to host memory counted as host, and its prefetch one layer ahead in backward counted
    on the device (two layers' checkpoints there at once), as on a GPU; its stream operations are
    no-ops on CPU."""
    from fastsft.train.offload import OverlappedOffload, decoder_layers

    class Traced(OverlappedOffload):
        def _pack(self, t):
            previous = tracker.where
            tracker.where = HOST
            try:
                return super()._pack(t)
            finally:
                tracker.where = previous

    return Traced(torch.device("cpu"), decoder_layers(model))
