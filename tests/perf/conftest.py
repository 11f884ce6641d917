"""Probes for the performance contracts: what each fastsft kernel op receives, and host syncs.

- ``kernel_recorder``: wraps the public ``fastsft_kernels`` ops, which the patches look up
  at call time, and records every call with the dtype of each tensor argument. It sees
  what a GPU run would hand the kernels, whichever path (Triton or reference) runs them.
- ``SyncCounter``: counts the calls that make the host wait for the device or read a
  device value back: ``.item()``/``bool()``/``int()``/``float()`` of a tensor, ``.tolist()``,
  ``.cpu()``, ``.to("cpu")``, ``.numpy()``, ``nonzero``/``argwhere``, boolean-mask indexing,
  ``masked_select``, ``torch.equal``, ``unique``, ``repeat_interleave`` without an output
  size. A CPU run cannot tell host tensors from device ones, so every such call counts.
  Inside a Triton launch (the interpreter copies every argument to numpy, a CPU-only
  artefact; on a GPU a launch is asynchronous) counting pauses.
"""
from __future__ import annotations

import collections
import contextlib
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

OPS = ("linear_cross_entropy", "cross_entropy", "lora_linear", "lora_linear_fused", "varlen_attention",
       "rms_norm", "rope", "swiglu", "lora_linear_ex", "lora_linear_ex_fused")


class KernelCall:
    __slots__ = ("op", "args")

    def __init__(self, op, args):
        self.op = op
        self.args = args  # [(position or name, tensor)]


class KernelRecorder:
    def __init__(self):
        self.calls = []

    def count(self, op: str) -> int:
        return sum(1 for c in self.calls if c.op == op)

    def counts(self) -> dict:
        return dict(collections.Counter(c.op for c in self.calls))

    def dtype_table(self) -> dict:
        """{op: {argument: sorted dtype names}} (parameters marked 'param')."""
        table = collections.defaultdict(lambda: collections.defaultdict(set))
        for call in self.calls:
            for where, t in call.args:
                if t.is_floating_point():
                    kind = "trainable param " if isinstance(t, torch.nn.Parameter) and t.requires_grad else ""
                    table[call.op][where].add(kind + str(t.dtype).replace("torch.", ""))
        return {op: {w: sorted(d) for w, d in args.items()} for op, args in table.items()}


def _tensors(args, kwargs):
    found = [(i, a) for i, a in enumerate(args) if torch.is_tensor(a)]
    found += [(k, v) for k, v in kwargs.items() if torch.is_tensor(v)]
    return found


@pytest.fixture
def kernel_recorder(monkeypatch):
    import fastsft_kernels

    recorder = KernelRecorder()
    for name in OPS:
        op = getattr(fastsft_kernels, name)

        def wrapped(*args, _op=op, _name=name, **kwargs):
            recorder.calls.append(KernelCall(_name, _tensors(args, kwargs)))
            return _op(*args, **kwargs)

        monkeypatch.setattr(fastsft_kernels, name, wrapped)
    return recorder


# ------------------------------------------------------------------ host syncs
_aten = torch.ops.aten
_SYNC_ATEN = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.argwhere.default, _aten.equal.default,
    _aten.masked_select.default, _aten.is_nonzero.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten.repeat_interleave.Tensor,
}
_MASK_INDEXED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
_SYNC_METHODS = {"tolist", "cpu", "numpy"}


def _is_mask(t) -> bool:
    return torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8)


def _caller() -> str:
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if os.path.abspath(name) == here or f"{os.sep}torch{os.sep}" in name:
            continue
        short = name.split("site-packages" + os.sep)[-1]
        for root in ("fastsft" + os.sep, "kernels" + os.sep, "tests" + os.sep):
            if root in short:
                short = short[short.index(root):]
                break
        return f"{short}:{frame.lineno} {frame.line}"
    return "?"


class SyncCounter:
    """``with SyncCounter() as syncs: ...``; ``syncs.events`` lists (what, where)."""

    def __init__(self):
        self.events = []
        self.triton_launches = 0  # the launchers ran as on a GPU (not the CPU reference path)
        self._paused = 0
        self._modes = None
        self._restore = None

    def _record(self, what):
        if not self._paused:
            self.events.append((what, _caller()))

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __enter__(self):
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name in _SYNC_METHODS:
                    counter._record(name)
                elif name == "to":
                    targets = list(args[1:]) + [kwargs.get("device")]
                    if any(t == "cpu" or (isinstance(t, str) and t.startswith("cpu")) for t in targets):
                        counter._record("to('cpu')")
                return func(*args, **kwargs)

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in _SYNC_ATEN:
                    if not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None):
                        counter._record(str(func.overloadpacket.__name__))
                elif func in _MASK_INDEXED and any(_is_mask(i) for i in (args[1] or ())):
                    counter._record(f"{func.overloadpacket.__name__} with a boolean mask")
                return func(*args, **kwargs)

        self._restore = _pause_inside_triton_launches(self)
        self._modes = (Functions(), Dispatch())
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._restore()
        return False

    def summary(self) -> str:
        counts = collections.Counter(self.events)
        return "\n".join(f"{n} x {what} at {where}" for (what, where), n in counts.most_common()) or "none"


def _pause_inside_triton_launches(counter):
    """A Triton launch is asynchronous on a GPU; the interpreter's host copies are not syncs."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return lambda: None
    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        counter.triton_launches += 1
        with counter.paused():
            return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = call

    def restore():
        interpreter.GridExecutor.__call__ = original

    return restore


@pytest.fixture
def sync_counter():
    return SyncCounter


# ------------------------------------------------------------------ tiny models and packed batches
VOCAB = 128


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved 2-layer tiny Llama for the trainer's builder (load_model reads a directory)."""
    import transformers

    from fastsft.tiny import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny_llama")
    config = tiny_llama_config(VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def packed_batch(lengths=(7, 11, 5), seed=0, vocab=VOCAB):
    """The trainer's collator on random documents (never zeros), packed into one row."""
    from fastsft.data.collate import collate
    from fastsft.data.example import Example

    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append(Example(input_ids=ids, labels=[-100] * 2 + ids[2:], source_index=i))
    return collate(examples, packing=True, pad_token_id=0)


@pytest.fixture
def make_packed_batch():
    return packed_batch
