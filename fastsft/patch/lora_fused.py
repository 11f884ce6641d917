"""Fused LoRA projections: q/k/v and gate/up of one x through one ``lora_linear_fused`` call.

In Llama-family attention (Llama, Mistral, Qwen2/3, Gemma, Gemma-2/3) q_proj,
k_proj and v_proj read the same hidden states; in their MLPs gate_proj and up_proj
do. When every member of such a group is a LoRA layer patched by
``fastsft.patch.lora``, the first member called with an x computes the outputs of
the whole group in one ``lora_linear_fused`` call (x cast to the compute dtype
once, one read of x for every x A^T, every dA in one pass, dx of the group
accumulated in one buffer) and keeps the other members' outputs for their own
calls with that same x, which then just take them. Works under any attention or
MLP forward (transformers' own or fastsft's), since it only sits in the
projections' forwards.

A member's output is handed out once, and only for the very tensor x it was made
from (same object, same in-place version, same grad mode); anything else
recomputes. When a member is not eligible for the call (two adapters, a merged
adapter ...; the single-layer rules of ``fastsft.patch.lora``), or the
members disagree on dtype handling, every member takes its single-layer path.
Members with DoRA, dropout in training or a LoRA bias make the group one
``lora_linear_ex_fused`` call (each member's own mask, drawn in member order).

Phi-3 packs q/k/v into qkv_proj and gate/up into gate_up_proj: one LoRA layer
each, so the single-layer call is already the fused projection.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

from . import families

logger = logging.getLogger("fastsft")

# (parent kind, member attribute names) of the groups this wires
_GROUPS = (("attention", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
_PACKED = ("qkv_proj", "gate_up_proj")  # Phi-3: one layer holds the whole group


class ProjectionGroup:
    """The LoRA layers of one attention (q/k/v) or MLP (gate/up), computed together."""

    def __init__(self, name: str, members: List[torch.nn.Module]):
        self.name = name
        self.members = members
        self._x: Optional[torch.Tensor] = None
        self._key = None
        self._pending = {}  # member index -> output not yet taken
        self.fused_calls = 0
        self._logged = set()

    def _log_once(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            logger.info("fastsft lora: %s: projections not fused for this call (%s)", self.name, reason)

    def _key_of(self, x: torch.Tensor):
        # torch.compile reads a tensor's _version as data (a guard on it breaks the graph); a traced
        # forward is one function of its inputs, so the same x object is the same value there
        version = None if torch.compiler.is_compiling() else x._version
        return (version, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))

    def clear(self) -> None:
        self._x, self._key, self._pending = None, None, {}

    def output(self, index: int, x: torch.Tensor, kwargs: dict) -> Optional[torch.Tensor]:
        """Member ``index``'s output for x, from the group's fused call; None: take the single path."""
        if self._x is x and index in self._pending and self._key == self._key_of(x):
            y = self._pending.pop(index)
            if not self._pending:
                self.clear()
            return y
        self.clear()
        from . import lora as lora_patch

        for j, member in enumerate(self.members):
            reason = lora_patch._call_reason(member, x, kwargs) if j != index else None
            if reason is not None:  # that member also logs its reason when it is called
                self._log_once(f"{member.__dict__.get(lora_patch._NAME, j)}: {reason}")
                return None
        calls = [lora_patch._kernel_args(m, x) for m in self.members]
        first = calls[0]
        same = all(c["x"].dtype == first["x"].dtype and c["out_dtype"] == first["out_dtype"] for c in calls)
        if not same:
            self._log_once("the projections compute in different dtypes")
            return None
        x_k = first["x"]  # cast once for the whole group
        import fastsft_kernels as fk

        common = ([c["weight"] for c in calls], [c["lora_a"] for c in calls], [c["lora_b"] for c in calls],
                  [c["scaling"] for c in calls])
        with torch.autocast(x.device.type, enabled=False):
            if any(lora_patch.has_extras(c["extras"]) for c in calls):  # DoRA / dropout / LoRA bias
                ys = fk.lora_linear_ex_fused(x_k, *common, biases=[c["bias"] for c in calls],
                                             quant_states=[c["quant_state"] for c in calls],
                                             magnitudes=[c["extras"]["magnitude"] for c in calls],
                                             dropout_ps=[c["extras"]["dropout_p"] for c in calls],
                                             lora_biases=[c["extras"]["lora_bias"] for c in calls])
            else:
                ys = fk.lora_linear_fused(x_k, *common, biases=[c["bias"] for c in calls],
                                          quant_states=[c["quant_state"] for c in calls])
        if first["out_dtype"] is not None:
            ys = [y.to(first["out_dtype"]) for y in ys]
        if not torch.compiler.is_compiling():  # an int read in a trace is a guard: it would recompile every call
            self.fused_calls += 1
        self._pending = {j: y for j, y in enumerate(ys) if j != index}
        self._x, self._key = x, self._key_of(x)
        return ys[index]


def _parent_kind(module: torch.nn.Module) -> Optional[str]:
    if families.is_known_attention(module):
        return "attention"
    if families.mlp_layout(module) is not None:  # "split" (gate/up) or Phi-3's "fused" gate_up_proj
        return "mlp"
    return None


def apply(model: torch.nn.Module, patched: set, group_attr: str) -> List[str]:
    """Wire every q/k/v and gate/up group whose members are all in ``patched``; return report lines."""
    lines = []
    for name, module in model.named_modules():
        kind = _parent_kind(module)
        if kind is None:
            continue
        for group_kind, attrs in _GROUPS:
            if group_kind != kind:
                continue
            members = [getattr(module, a, None) for a in attrs]
            if any(m is None for m in members):
                continue
            if not all(id(m) in patched for m in members) or any(group_attr in m.__dict__ for m in members):
                left = [a for a, m in zip(attrs, members) if id(m) not in patched]
                if left:
                    lines.append(f"{name}: {'+'.join(attrs)} not fused ({', '.join(left)} on peft's path)")
                continue
            group = ProjectionGroup(name, members)
            for i, m in enumerate(members):
                m.__dict__[group_attr] = (group, i)
            lines.append(f"{name}: {'+'.join(attrs)} -> lora_linear_fused")
        for attr in _PACKED:
            m = getattr(module, attr, None)
            if m is not None and id(m) in patched:
                lines.append(f"{name}: {attr} (packed) -> lora_linear, one call for the group")
    return lines


def groups_of(model: torch.nn.Module, group_attr: str) -> List[ProjectionGroup]:
    seen = {}
    for m in model.modules():
        entry = m.__dict__.get(group_attr)
        if entry is not None:
            seen[id(entry[0])] = entry[0]
    return list(seen.values())


def revert(model: torch.nn.Module, group_attr: str) -> None:
    for g in groups_of(model, group_attr):
        g.clear()
    for m in model.modules():
        m.__dict__.pop(group_attr, None)
