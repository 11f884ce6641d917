"""FLOP formulas of the fastsft:: operators, for torch.utils.flop_counter (and so for `fastsft plan`).

Counted as torch's own formulas count the ops the `hf` recipe runs, so that both recipes' model FLOPs
compare at the same shapes:

- matmuls: 2 * m * n * k each (lora_linear: the base projection, x A^T and (x A^T) B^T per weight; its
  backward: dX through the base weight and the adapters, dW when the weight is trained, dA, dB; a 4-bit
  weight's dequantization is element-wise, not counted, as for bitsandbytes' gemm_4bit; lora_linear_ex
  (DoRA, dropout, LoRA bias) adds DoRA's row norm and, with dropout, its base product on the dropped x);
- attention: torch's SDPA formulas (full s x s scores per document, not halved for causal masks: what
  torch counts for the hf recipe's SDPA), per packed document. The documents' lengths come from
  cu_seqlens when its values exist; under FakeTensorMode (a plan) they do not, and the tokens are taken
  as documents of max_seqlen tokens each (exact for a plan's batches, whose documents are all as long);
- linear + cross-entropy: the logits matmul (2 N H V), and where the forward computes the gradients
  (reduction mean/sum) dH and dW there (2 N V H each); the recomputing backward counts the logits again;
- element-wise ops (RMSNorm, RoPE, SwiGLU, cross-entropy on given logits, the gradient scaling):
  0, as torch's counter leaves element-wise aten ops out.
"""
from __future__ import annotations

import importlib

import torch

_REGISTERED = False


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.device.type == "meta")


def document_lengths(cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int) -> list:
    """Tokens per packed document: from cu_seqlens' values, or (fake) documents of max_seqlen tokens."""
    if not _is_fake(cu_seqlens):
        bounds = [int(b) for b in cu_seqlens.detach().to("cpu").tolist()]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    size = max(1, min(int(max_seqlen), tokens))
    full, rest = divmod(tokens, size)
    return [size] * full + ([rest] if rest else [])


def _per_document(q, k, v, cu_seqlens, max_seqlen, backward: bool) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    heads, dim = q.shape[1], q.shape[2]
    kv_heads, dv = k.shape[1], v.shape[2]
    total = 0
    counts = {}
    for s in document_lengths(cu_seqlens, q.shape[0], max_seqlen):
        counts[s] = counts.get(s, 0) + 1
    for s, n in counts.items():
        shapes = ((1, heads, s, dim), (1, kv_heads, s, dim), (1, kv_heads, s, dv))
        if backward:
            total += n * sdpa_backward_flop_count((1, heads, s, dv), *shapes)
        else:
            total += n * sdpa_flop_count(*shapes)
    return total


def attention_flops(q, k, v, cu_seqlens, max_seqlen, *args, out_val=None, **kwargs) -> int:
    return _per_document(q, k, v, cu_seqlens, max_seqlen, backward=False)


def attention_backward_flops(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, *args, out_val=None, **kwargs) -> int:
    return _per_document(q, k, v, cu_seqlens, max_seqlen, backward=True)


def _ranks(lora_as) -> list:
    return [int(a.shape[0]) if isinstance(a, torch.Tensor) and a.dim() == 2 else 0 for a in lora_as]


def lora_flops(x2, weights, lora_as, lora_bs, scalings, biases, has_bias, absmax, code, absmax2, code2, offset,
               blocksize, blocksize2, shapes, *args, out_val=None, **kwargs) -> int:
    tokens, features = int(x2.shape[0]), int(x2.shape[1])
    total = 0
    for (out_f, _), r in zip(shapes, _ranks(lora_as)):
        total += 2 * tokens * features * out_f + 2 * tokens * features * r + 2 * tokens * r * out_f
    return total


def lora_backward_flops(grads, x2, xa, weights, lora_as, lora_bs, scalings, biases, has_bias, absmax, code, absmax2,
                        code2, offset, blocksize, blocksize2, shapes, quant_types, strategies, need_x, need_w, need_a,
                        need_b, need_bias, out_val=None, **kwargs) -> int:
    tokens, features = int(x2.shape[0]), int(x2.shape[1])
    total = 0
    for i, ((out_f, _), r) in enumerate(zip(shapes, _ranks(lora_as))):
        if r and (need_x or need_a[i]):
            total += 2 * tokens * out_f * r  # g B: the adapters' gradient path (shared by dX and dA)
        if need_x:
            total += 2 * tokens * out_f * features + 2 * tokens * r * features  # g W, (g B) A
        if need_w[i] and absmax[i] is None:
            total += 2 * tokens * out_f * features
        if need_a[i]:
            total += 2 * tokens * r * features
        if need_b[i]:
            total += 2 * tokens * out_f * r
    return total


def lora_ex_flops(x2, weights, lora_as, lora_bs, scalings, biases, has_bias, magnitudes, is_dora, masks, ps,
                  absmax, code, absmax2, code2, offset, blocksize, blocksize2, shapes, *args, out_val=None,
                  **kwargs) -> int:
    """lora_linear's count, plus DoRA's row norm (W A^T: 2 out r in, as peft's B A is) and, with dropout,
    DoRA's base product on the dropped x (peft recomputes it too)."""
    tokens, features = int(x2.shape[0]), int(x2.shape[1])
    total = 0
    for i, ((out_f, _), r) in enumerate(zip(shapes, _ranks(lora_as))):
        total += 2 * tokens * features * out_f + 2 * tokens * features * r + 2 * tokens * r * out_f
        if is_dora[i]:
            total += 2 * out_f * r * features
            if masks[i] is not None:
                total += 2 * tokens * features * out_f
    return total


def lora_ex_backward_flops(grads, x2, xas, zs, norms, kept_ys, weights, lora_as, lora_bs, scalings, biases, has_bias,
                           magnitudes, is_dora, masks, ps, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                           shapes, quant_types, strategies, need_x, need_w, need_a, need_b, need_bias, need_m,
                           out_val=None, **kwargs) -> int:
    """lora_linear_backward's count, plus DoRA with dropout's second product through W (dX and dW)."""
    total = lora_backward_flops(grads, x2, None, weights, lora_as, lora_bs, scalings, biases, has_bias, absmax,
                                code, absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, strategies,
                                need_x, need_w, need_a, need_b, need_bias)
    tokens, features = int(x2.shape[0]), int(x2.shape[1])
    for i, (out_f, _) in enumerate(shapes):
        if is_dora[i] and masks[i] is not None:
            total += 2 * tokens * out_f * features * (int(bool(need_x)) + int(need_w[i] and absmax[i] is None))
    return total


def _lce(hidden, weight, needs: tuple, forward_grads: bool) -> int:
    rows, width = int(hidden.numel() // hidden.shape[-1]), int(hidden.shape[-1])
    vocab = int(weight.shape[0])
    logits = 2 * rows * width * vocab
    if not forward_grads:
        return logits
    return logits + sum(logits for flag in needs[:2] if flag)


def linear_cross_entropy_flops(hidden, weight, bias, labels, ignore_index, reduction, num_items_tensor,
                               num_items_value, softcap, z_loss, label_smoothing, chunk_rows, needs_hidden,
                               needs_weight, needs_bias, out_val=None, **kwargs) -> int:
    needs = (needs_hidden, needs_weight)
    return _lce(hidden, weight, needs, any(needs) and reduction != "none")


def linear_cross_entropy_backward_flops(grad_output, hidden, weight, bias, labels, stats, divisor, ignore_index,
                                        reduction, softcap, z_loss, label_smoothing, chunk_rows, needs_hidden,
                                        needs_weight, needs_bias, out_val=None, **kwargs) -> int:
    return _lce(hidden, weight, (needs_hidden, needs_weight), True)


def _zero(*args, out_val=None, **kwargs) -> int:
    return 0


ELEMENTWISE = ("rms_norm", "rms_norm_backward", "rope", "rope_backward", "swiglu", "swiglu_backward",
               "cross_entropy", "cross_entropy_backward", "linear_cross_entropy_scale_grads")
FORMULAS = {"varlen_attention": attention_flops, "varlen_attention_backward": attention_backward_flops,
            "lora_linear": lora_flops, "lora_linear_backward": lora_backward_flops,
            "lora_linear_ex": lora_ex_flops, "lora_linear_ex_backward": lora_ex_backward_flops,
            "linear_cross_entropy": linear_cross_entropy_flops,
            "linear_cross_entropy_backward": linear_cross_entropy_backward_flops,
            **{name: _zero for name in ELEMENTWISE}}


def register() -> list:
    """Register the formulas with torch.utils.flop_counter (once); returns the operators covered."""
    global _REGISTERED
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for module in ("attention", "lora", "lora_dora", "norm", "rope", "swiglu", "cross_entropy"):
        try:  # importing a kernel module registers its operators
            importlib.import_module(f"fastsft_kernels.{module}")
        except ImportError:
            pass
    ops = getattr(torch.ops, "fastsft")
    covered = []
    for name, formula in FORMULAS.items():
        if not hasattr(ops, name):
            continue
        packet = getattr(ops, name)
        if not _REGISTERED and packet not in flop_registry:
            register_flop_formula(packet, get_raw=True)(formula)
        covered.append(f"fastsft.{name}")
    _REGISTERED = True
    return covered


__all__ = ["register", "document_lengths", "FORMULAS"]
