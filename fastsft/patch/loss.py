"""Loss patch: the causal-LM forward computes its loss with linear_cross_entropy.

When labels are given, the patched forward runs the decoder, then computes the
loss from the final hidden states and the output embedding without building
the (tokens x vocab) logits, and returns ``logits=None``. Without labels it is
the model's own forward (logits returned as usual).

Semantics follow transformers' ForCausalLMLoss: labels are aligned to input_ids
and shifted here (position t predicts label t+1; the last position predicts
nothing), or taken as given through ``shift_labels``; ``ignore_index`` (default
-100) marks untrained positions; ``num_items_in_batch`` (passed by the Trainer
for token-exact gradient accumulation) is the divisor of the summed loss;
Gemma-2/3's ``final_logit_softcapping`` is applied inside the kernel.

Acts on the model instance (an instance ``forward``); a peft model is patched
through its base model, whose forward peft calls. Falls back to the model's own
forward (logged once per reason) for calls the fused path does not cover: an
output embedding that is not a plain Linear (e.g. a LoRA-wrapped lm_head) or
``logits_to_keep`` given together with labels. ``return_dict=False`` callers
get the tuple form, as from the stock forward.
"""
from __future__ import annotations

import inspect
import logging
from typing import List, Optional

import torch
import torch.nn.functional as F

import fastsft_kernels as fk

from . import base_model_of, loss_chunk
from .dtypes import autocast_dtype, cached_weight_cast, drop_weight_cast, to_autocast
from .families import original_forward, restore_forward, set_forward

logger = logging.getLogger("fastsft.patch")

_TAG = "fastsft.cross_entropy"
# families whose CausalLM forward is exactly: decoder -> lm_head -> [softcap] -> loss
_KNOWN_CAUSAL_LM = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
}
# attribute names that, on an unknown architecture, mean logits are transformed after lm_head
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier", "logits_soft_cap", "lm_head_multiplier",
                     "mup_width_multiplier", "logit_scale_init")
_warned: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("cross_entropy: fused loss not used (%s); the model's own loss is computed instead", reason)


def _fused_loss(hidden, weight, labels, bias, ignore_index, num_items, softcap, chunk_size=None):
    return fk.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   reduction="mean", num_items=num_items, softcap=softcap, chunk_size=chunk_size)


def _lm_head(model) -> Optional[torch.nn.Linear]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # LoRA / quantized / custom heads: not a plain matmul
        return None
    if head.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # e.g. packed 4-bit data
        return None
    return head


def _softcap(config) -> Optional[float]:
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _unsupported_reason(model) -> Optional[str]:
    """Why this model's forward cannot safely be replaced (None when it can)."""
    name = type(model).__name__
    if not hasattr(model, "base_model_prefix") or not hasattr(model, "get_output_embeddings"):
        return f"{name} is not a transformers PreTrainedModel"
    decoder = getattr(model, model.base_model_prefix, None)
    if decoder is None or decoder is model:
        return f"{name} has no decoder under {model.base_model_prefix!r}"
    if name in _KNOWN_CAUSAL_LM:
        return None
    if not name.endswith("ForCausalLM"):
        return f"{name} is not a *ForCausalLM model"
    config = getattr(model, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"{name} scales its logits ({attr})"
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return f"the source of {name}.forward is unavailable to check its loss"
    # the standard body: logits = self.lm_head(hidden_states[...]) ... self.loss_function(...)
    if "self.lm_head(hidden_states" not in source or "self.loss_function(" not in source:
        return f"{name}.forward is not the standard lm_head + loss_function form"
    transforms = [line for line in source.splitlines() if "logits =" in line and "self.lm_head" not in line
                  and "final_logit_softcapping" not in line and "torch.tanh(logits)" not in line]
    if transforms:
        return f"{name}.forward transforms the logits after lm_head ({transforms[0].strip()})"
    return None


def _signature_names(fn) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


_CACHE_KEYWORDS: dict = {}


def _cache_keyword(decoder) -> str:
    """The decoder's name for the KV cache: ``cache`` (newer transformers) or ``past_key_values``."""
    cls = type(decoder)
    if cls not in _CACHE_KEYWORDS:
        _CACHE_KEYWORDS[cls] = "cache" if "cache" in _signature_names(cls.forward) else "past_key_values"
    return _CACHE_KEYWORDS[cls]


def _causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    # the 4th parameter is the cache under either name; it is passed on only when given, under
    # the name this transformers uses (the old name logs a deprecation warning on every call)
    if "cache" in kwargs:
        if past_key_values is not None:
            raise ValueError("pass the cache as either `cache` or `past_key_values`, not both")
        past_key_values = kwargs.pop("cache")
    decoder = getattr(self, self.base_model_prefix)
    cache_kw = _cache_keyword(decoder)
    if past_key_values is not None:
        kwargs[cache_kw] = past_key_values

    head = _lm_head(self)
    if labels is None or head is None or not _is_zero(logits_to_keep):
        if labels is not None:
            _warn_once("the output embedding is not a plain Linear" if head is None
                       else "logits_to_keep was given with labels")
        return original_forward(self)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                      logits_to_keep=logits_to_keep, **kwargs)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)

    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(shift_labels.shape)} do not match the hidden states "
                         f"{tuple(hidden.shape[:-1])}")
    if torch.is_tensor(num_items):
        num_items = num_items.to(hidden.device)
    # under autocast the kernel gets the autocast dtype: the hidden states (already, from a patched
    # norm) and lm_head's weight, whose cast is made once per weight version (per optimizer step
    # for a trained fp32 head; a frozen head is loaded in the compute dtype and is not cast)
    dtype = autocast_dtype(hidden)
    weight = cached_weight_cast(head, head.weight, dtype)
    bias = to_autocast(head.bias, dtype)
    loss = _fused_loss(to_autocast(hidden, dtype).reshape(-1, hidden.shape[-1]), weight,
                       shift_labels.reshape(-1).to(hidden.device), bias, ignore_index, num_items,
                       _softcap(self.config), loss_chunk.chunk_tokens_of(self))
    out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions,
                                 **{_cache_field(CausalLMOutputWithPast): getattr(outputs, _cache_field(type(outputs)))})
    if return_dict:
        return out
    # the stock forward's tuple layout (loss, logits, cache, ...): to_tuple() would drop the None logits and
    # shift the cache into their place
    return (loss, None) + tuple(v for k, v in out.items() if k not in ("loss", "logits"))


def _cache_field(output_cls) -> str:
    """The output dataclass's cache field (reading the old name logs a deprecation warning).
    A lookup in the class's field dict, not dataclasses.fields(): torch.compile traces it."""
    return "cache" if "cache" in output_cls.__dataclass_fields__ else "past_key_values"


def _is_zero(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def apply(model: torch.nn.Module) -> List[str]:
    base = base_model_of(model)
    reason = _unsupported_reason(base)
    if reason is not None:
        logger.warning("cross_entropy: not patched: %s", reason)
        return []
    if _lm_head(base) is None:
        # still patch: the head may become a plain Linear later (e.g. merge); each call re-checks
        logger.warning("cross_entropy: %s's output embedding is %s, not a plain Linear; "
                       "the model's own loss is used until it is", type(base).__name__,
                       type(base.get_output_embeddings()).__name__)
    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if decoder is not None:
        _cache_keyword(decoder)  # filled now: a first fill inside torch.compile's trace would recompile once
    set_forward(base, _causal_lm_forward, _TAG)
    return [f"{type(base).__name__}.forward -> linear_cross_entropy"
            + (f" (softcap {_softcap(base.config)})" if _softcap(base.config) else "")]


def revert(model: torch.nn.Module) -> None:
    base = base_model_of(model)
    restore_forward(base, _TAG)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None:
        drop_weight_cast(head)


__all__ = ["apply", "revert"]
