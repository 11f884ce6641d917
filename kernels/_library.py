"""Helpers for registering the kernels as ``torch.library`` operators (namespace ``fastsft``).

Every public op is a ``torch.library.custom_op``: an opaque node to torch.compile (no graph
break, no retrace of the launchers' host logic), a fake implementation that allocates what
the Triton path allocates (outputs, saved tensors, gradients, large transients), and its
backward registered with ``register_autograd`` as one more operator with its own fake.
The real implementation dispatches as before: CUDA -> Triton; CPU -> ``reference`` unless
``FASTSFT_TRITON_ON_CPU=1``.

On the reference path a backward operator recomputes the reference forward and
differentiates it (``reference_vjp``). Inside an operator's implementation the dispatcher
has switched autograd off (the autograd keys are excluded), so that helper switches it back
on for the recompute only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

NAMESPACE = "fastsft"

_C = torch._C
# ADInplaceOrView too: in-place writes into views (the reference's out[start:end] = ...) need it
_AUTOGRAD_KEYS = (_C.DispatchKey.AutogradFunctionality, _C.DispatchKey.AutogradOther,
                  _C.DispatchKey.AutogradNestedTensor, _C.DispatchKey.ADInplaceOrView)


@contextlib.contextmanager
def autograd_enabled():
    """Re-enable autograd inside an operator implementation (reference backward only)."""
    exclude = _C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with _C._ForceDispatchKeyGuard(_C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def reference_vjp(fn: Callable, primals: Sequence, needs: Sequence[bool], cotangents: Sequence):
    """Gradients of ``fn(*primals)`` (a tensor or a tuple of tensors) w.r.t. the primals whose
    ``needs`` flag is set, for the given cotangents. Entries not needed come back as None."""
    with autograd_enabled():
        leaves = [p.detach().requires_grad_(bool(n)) if isinstance(p, torch.Tensor) and n else
                  (p.detach() if isinstance(p, torch.Tensor) else p) for p, n in zip(primals, needs)]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        wanted = [leaf for leaf, n in zip(leaves, needs) if n]
        pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None and o.requires_grad]
        if not wanted:
            return [None] * len(primals)
        if not pairs and any(c is not None for c in cotangents):
            raise RuntimeError("reference_vjp: the recomputed forward did not record autograd")
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True) \
            if pairs else [None] * len(wanted)
    result, it = [], iter(grads)
    for p, n in zip(primals, needs):
        if not n:
            result.append(None)
            continue
        g = next(it)
        result.append(torch.zeros_like(p) if g is None else g)
    return result


def nothing(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an absent tensor output (operators cannot return None)."""
    return like.new_empty(0)
