"""LoRA with DoRA, dropout and a LoRA bias, around the kernels of ``fastsft_kernels.lora``.

Each projection i of x (one, or several sharing x: q/k/v, gate/up) computes what
peft 0.21's LoRA layer computes, with x_d = x * mask / (1 - p) when dropout is on
(mask drawn once per call, from the torch RNG of x's device) and x_d = x otherwise:

  plain LoRA:  y = x W^T + s (x_d A^T) B^T + bias + s * lora_bias
  DoRA:        c = m / ||W + s B A||_row   (the norm detached, as peft does)
               no dropout:  y = c * (x W^T + s (x A^T) B^T) + bias
               dropout:     y = x W^T + bias + (c - 1) * (x_d W^T) + c * s (x_d A^T) B^T
               (peft's DoraLinearVariant recomputes the base product on x_d when
               dropout is active; lora_bias is refused with DoRA, as peft refuses it.)

The row norm never builds W + s B A: ||W_j||^2 + 2 s B_j . (W A^T)_j + s^2 B_j (A A^T) B_j^T,
from one pass over the dense W the base GEMM then reads (a 4-bit W is dequantized
once into the shared workspace for both: a DoRA projection takes the dequantize +
cuBLAS strategy). Without dropout or bias (the common case) c rides on the operands:
y = x (c W)^T + s (x A^T) (c B)^T, c W formed in the workspace in place (4-bit) or as
a transient copy (dense), and the backward reads y itself for dm = sum_t g y / m
(z = y / c), so DoRA keeps nothing full-width beyond its outputs; dx, dA, dB are
the LoRA backward with c W and c B (m exactly 0 would make z unrecoverable from y; peft
initialises m to the row norms, and an in-place edit of a saved y raises autograd's
version error, never a silent wrong gradient). With a bias or dropout, z (the product before
c) is kept and dm = sum_t g z / ||.||, the backward running on g * c. With dropout,
x (shared by the group) and each projection's bool mask are saved, never x_d:
backward rebuilds it. ``DROPOUT_MASK_HOOK`` (tests) can force the masks.

Both public functions run the ``torch.library`` operator ``fastsft::lora_linear_ex`` (its backward
``fastsft::lora_linear_ex_backward``, registered with ``register_autograd``), on CUDA, on the CPU
tier's Triton path and on the reference path alike, so FakeTensor tracing and torch.compile see one
opaque node. The masks are drawn before the operator (from the torch RNG, or the hook) and passed
in as bool tensors: the operator is deterministic. Its extra outputs, marked non-differentiable,
are what the backward reads (xa, z, the row norm; a DoRA y read back is the output itself).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from . import reference
from ._library import NAMESPACE, nothing, reference_vjp
from ._triton_utils import check_float, empty, use_triton
from .lora import (_LIB, _QUANT_SCHEMA, _Weight, _as_2d, _check_lora, _checked_weight, _cublas_lora, _dense_w,
                   _matmul, _present, _quant_infos, _rank_project, _rank_reduce, _reference_states, _state_args,
                   lora_grad_fakes, no_grad_for, pick_strategy, picked, resolve_dense_base, resolve_dequant_rows)
from .quant import absmax_fp32

# Test hook: callable(p, shape, device) -> bool mask of that shape, or None to draw one.
DROPOUT_MASK_HOOK: Optional[Callable] = None

_DOT_ROWS = 1 << 24  # elements per fp32 chunk of the magnitude gradient's column dots


def draw_dropout_mask(p: float, shape, device) -> torch.Tensor:
    """Keep-mask (bool, True = kept with probability 1 - p) from the torch RNG of ``device``."""
    if DROPOUT_MASK_HOOK is not None:
        mask = DROPOUT_MASK_HOOK(p, tuple(shape), device)
        if mask is not None:
            return mask
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


def _dropped(x2: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """x_d = x * mask / (1 - p), in x's dtype (as torch.nn.Dropout computes it)."""
    return x2.mul(mask).mul_(1.0 / (1.0 - p))


def weight_row_norm(w_dense: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per output row (fp32), without forming W + s B A: one pass over W for
    ||W_j||^2 and one for W A^T (rank r), the rest is rank-r algebra."""
    r = lora_a.shape[0]
    wa = _rank_project(w_dense, lora_a, (lora_a.stride(0), lora_a.stride(1)), r, 1.0)  # (out, r) fp32
    a32, b32 = lora_a.float(), lora_b.float()
    sq = torch.linalg.vector_norm(w_dense, dim=1, dtype=torch.float32).square()
    cross = (b32 * wa).sum(1)
    lora_sq = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
    return (sq + (2.0 * scaling) * cross + (scaling * scaling) * lora_sq).clamp_min_(0.0).sqrt_()


def _col_dot(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_t g[t, j] * z[t, j], summed in fp32.

    bf16 / fp32: one product pass in the activation dtype and a column sum that accumulates
    in fp32 (on CUDA it reads bf16 directly: 8 bytes of traffic per element); bf16 has fp32's
    range, and a rounded product errs by 2^-9 at most, at random. fp16 (a product could pass
    65504 under loss scaling): fp32 products, in row chunks so no full fp32 copy exists."""
    M, n = g.shape
    if g.dtype != torch.float16:
        return (g * z).sum(0, dtype=torch.float32)
    rows = max(1, _DOT_ROWS // max(1, n))
    acc = None
    for start in range(0, M, rows):
        part = (g[start:start + rows].float() * z[start:start + rows].float()).sum(0)
        acc = part if acc is None else acc.add_(part)
    return acc if acc is not None else torch.zeros(n, dtype=torch.float32, device=g.device)


def _scaled_w(w: _Weight, c: torch.Tensor, dtype) -> torch.Tensor:
    """c[:, None] * W, dense: a 4-bit W is dequantized into the workspace and scaled there in
    place; a dense W (a parameter) is scaled into a new, transient (out, in) tensor."""
    if w.is_4bit:
        return _dense_w(w, dtype).mul_(c[:, None])
    return w.weight * c[:, None]


def _product(a, w: _Weight, w_dense, strategy, lo, p_mat, scale, bias, out, *, forward, accumulate=False):
    """out [+]= a @ W^T (forward) or a @ W + scale * lo @ p_mat (+ bias): cuBLAS on a dense
    (or workspace-dequantized) W, or the Triton GEMM with the rank term in its epilogue."""
    if strategy == "cublas":
        wm = w_dense if w_dense is not None else _dense_w(w, a.dtype)
        return _cublas_lora(a, wm.t() if forward else wm, lo, p_mat, scale, bias, out, accumulate=accumulate)
    absmax = absmax_fp32(w.info) if w.is_4bit else None
    return _matmul(a, w, absmax, lo, p_mat, (p_mat.stride(0), p_mat.stride(1)), scale, bias, out,
                   forward=forward, accumulate=accumulate)


def _ex_forward(x2, metas, weights, lora_as, lora_bs, biases, mags, masks):
    """The Triton-path forward of projections sharing x, each plain LoRA or DoRA, with or without dropout.

    metas[i] = (QuantInfo or None, scaling, strategy, dropout p, is_dora); the other arguments are
    lists of n (None where absent). Returns (outs, xas, zs, norms, kept_ys): the projections and
    what the backward reads (zs / norms / kept_ys None where a member has none)."""
    n = len(metas)
    dt = x2.dtype
    outs, xas, zs, norms, kept_ys = [], [], [], [], []
    # x A^T of every member without dropout in one pass over x; each dropout member on its own x_d
    plain = [i for i in range(n) if masks[i] is None]
    xa_of = {}
    if plain:
        a_cat = torch.cat([lora_as[i].to(lora_as[plain[0]].dtype) for i in plain], 0) if len(plain) > 1 \
            else lora_as[plain[0]]
        xa_cat = _rank_project(x2, a_cat, (a_cat.stride(0), a_cat.stride(1)), a_cat.shape[0], 1.0)
        offset = 0
        for i in plain:
            r = lora_as[i].shape[0]
            xa_of[i] = xa_cat[:, offset:offset + r]
            offset += r
    for i in range(n):
        info, s, strategy, p, dora = metas[i]
        w = _Weight(weights[i], info)
        a, b = lora_as[i], lora_bs[i]
        x_d = None
        if masks[i] is not None:
            # x * mask is exact; 1 / (1 - p) rides on the rank projection's fp32 scale (one pass less),
            # and only DoRA, whose base product reads the dropped x, scales it
            x_m = x2.mul(masks[i])
            xa_of[i] = _rank_project(x_m, a, (a.stride(0), a.stride(1)), a.shape[0], 1.0 / (1.0 - p))
            x_d = x_m.mul_(1.0 / (1.0 - p)) if dora else None
        xa = xa_of[i]
        y = empty(x2.shape[0], w.shape[0], dtype=dt, device=x2.device)
        if not dora:
            _product(x2, w, None, strategy, xa, b.t(), s, biases[i], y, forward=True)  # base on x, LoRA on x_d
            zs.append(None)
            norms.append(None)
            kept_ys.append(None)
        elif x_d is None and biases[i] is None:
            # y = x (c W)^T + s xa (c B)^T straight from the GEMM; backward reads y itself for dm
            # (z = y / c), so nothing full-width is added to what the next op keeps anyway
            norm = weight_row_norm(_dense_w(w, dt), a, b, s)
            c32 = mags[i].float() / norm
            b_c = b.float() * c32[:, None]
            _product(x2, w, _scaled_w(w, c32.to(dt), dt), "cublas", xa, b_c.t(), s, None, y, forward=True)
            zs.append(None)
            norms.append(norm)
            kept_ys.append(y)
        else:
            w_dense = _dense_w(w, dt)  # a 4-bit W: dequantized once, for the norm and the GEMMs
            norm = weight_row_norm(w_dense, a, b, s)
            c = (mags[i].float() / norm).to(dt)
            z = empty(x2.shape[0], w.shape[0], dtype=dt, device=x2.device)
            _product(x2 if x_d is None else x_d, w, w_dense, "cublas", xa, b.t(), s, None, z, forward=True)
            if x_d is None:  # y = c z + bias, one pass
                if biases[i] is not None:
                    torch.addcmul(biases[i].to(dt), z, c, out=y)
                else:
                    torch.mul(z, c, out=y)
            else:  # peft: x W^T + bias + (c - 1) x_d W^T + c s (x_d A^T) B^T = (x - x_d) W^T + bias + c z
                _product(x2 - x_d, w, w_dense, "cublas", xa[:, :0], b.t()[:0], 0.0, biases[i], y,
                         forward=True)
                y.addcmul_(z, c)
            zs.append(z)
            norms.append(norm)
            kept_ys.append(None)
        xas.append(xa)
        outs.append(y)
    return outs, xas, zs, norms, kept_ys


def _ex_backward(grads, x2, metas, xas, weights, lora_as, lora_bs, mags, masks, zs, norms, kept_ys, need_x, need_w,
                 need_a, need_b, need_m, bias_meta):
    """The Triton-path backward: (dx, d_w, d_a, d_b, d_bias, d_m), None where not needed.
    bias_meta[i] = (bias gradient needed, bias dtype)."""
    n = len(metas)
    M, dt = x2.shape[0], x2.dtype
    ws = [_Weight(weights[i], metas[i][0]) for i in range(n)]
    grads = [torch.zeros(M, ws[i].shape[0], dtype=dt, device=x2.device) if g is None else
             (g if g.stride(-1) == 1 else g.contiguous()) for i, g in enumerate(grads)]
    d_a, d_b, d_m, dz_of, gbs_of = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
    for i in range(n):
        info, s, strategy, p, dora = metas[i]
        g, b, r = grads[i], lora_bs[i], lora_as[i].shape[0]
        if kept_ys[i] is not None:  # DoRA from y: dz = c g is never formed, c rides on W and B
            c32 = mags[i].float() / norms[i]
            if need_m[i]:  # dm = sum_t g z / ||.|| = sum_t g y / m
                d_m[i] = (_col_dot(g, kept_ys[i]) / mags[i].float()).to(mags[i].dtype)
            b_c = b.float() * c32[:, None]
            gbs_of[i] = _rank_project(g, b_c, (b_c.stride(1), b_c.stride(0)), r, s)  # s g (c B)
            if need_b[i]:
                d_b[i] = (_rank_reduce(g, xas[i], dt) * (s * c32[:, None])).to(b.dtype)
            if need_a[i]:
                d_a[i] = _rank_reduce(x2, gbs_of[i], dt).t().to(lora_as[i].dtype).contiguous()
            continue
        if dora:
            c = (mags[i].float() / norms[i]).to(dt)
            dz = g * c
            if need_m[i]:
                d_m[i] = (_col_dot(g, zs[i]) / norms[i]).to(mags[i].dtype)
        else:
            dz = g
        dz_of[i] = dz
        gbs_of[i] = _rank_project(dz, b, (b.stride(1), b.stride(0)), r, s)  # s * dz B (M, r) fp32
        if need_b[i]:
            d_b[i] = (_rank_reduce(dz, xas[i], dt) * s).to(b.dtype)
        if need_a[i]:  # dA = (s dz B)^T x_d, x_d = (x * mask) / (1 - p)
            x_in, keep = (x2, 1.0) if masks[i] is None else (x2.mul(masks[i]), 1.0 / (1.0 - p))
            d_a[i] = (_rank_reduce(x_in, gbs_of[i], dt) * keep).t().to(lora_as[i].dtype).contiguous()
    dx = None
    if need_x:
        # dx = sum_i gbase_i W_i + [no dropout] s (dz_i B_i) A_i
        #           + [dropout] mask_i / (1 - p) * ((dz_i - g_i) W_i [DoRA] + s (dz_i B_i) A_i)
        dx = empty(M, x2.shape[1], dtype=dt, device=x2.device)
        for i in range(n):
            info, s, strategy, p, dora = metas[i]
            a = lora_as[i]
            dropout = masks[i] is not None
            if kept_ys[i] is not None:  # dx = g (c W) + s (g c B) A
                c = (mags[i].float() / norms[i]).to(dt)
                _product(grads[i], ws[i], _scaled_w(ws[i], c, dt), "cublas", gbs_of[i], a, 1.0, None, dx,
                         forward=False, accumulate=i > 0)
                continue
            w_dense = _dense_w(ws[i], dt) if (strategy == "cublas" or (dora and dropout)) else None
            gbase = dz_of[i] if (dora and not dropout) else grads[i]
            lo, pm = (gbs_of[i], a) if not dropout else (gbs_of[i][:, :0], a[:0])
            _product(gbase, ws[i], w_dense, strategy, lo, pm, 1.0, None, dx, forward=False, accumulate=i > 0)
            if dropout:
                t = empty(M, x2.shape[1], dtype=dt, device=x2.device)
                if dora:
                    # (dz - g) W with dz - g = g (c - 1), c - 1 formed in fp32 (c is close to 1)
                    c_minus_1 = (mags[i].float() / norms[i] - 1.0).to(dt)
                    _cublas_lora(grads[i] * c_minus_1, w_dense, gbs_of[i], a, 1.0, None, t)
                else:
                    torch.mm(gbs_of[i].to(dt), a.to(dt), out=t)
                t.mul_(masks[i])
                dx.add_(t, alpha=1.0 / (1.0 - p))
    d_w = []
    for i in range(n):
        if metas[i][0] is None and need_w[i]:
            info, s, strategy, p, dora = metas[i]
            dropout = masks[i] is not None
            if kept_ys[i] is not None:
                c = (mags[i].float() / norms[i]).to(dt)
                d_w.append(torch.mm(grads[i].t(), x2).mul_(c[:, None]).to(weights[i].dtype))
                continue
            gbase = dz_of[i] if (dora and not dropout) else grads[i]
            gw = torch.mm(gbase.t(), x2).to(weights[i].dtype)
            if dora and dropout:
                gw += torch.mm((dz_of[i] - grads[i]).t(), _dropped(x2, masks[i], p)).to(gw.dtype)
            d_w.append(gw)
        else:
            d_w.append(None)
    d_bias = [grads[i].sum(0, dtype=torch.float32).to(bdt) if needs else None
              for i, (needs, bdt) in enumerate(bias_meta)]
    return dx, d_w, d_a, d_b, d_bias, d_m


# --------------------------------------------------------------------------- operators
# fastsft::lora_linear_ex is deterministic: the dropout masks are drawn outside it (_run_ex) and
# come in as bool tensors (Tensor?[]: no gradient flows to a mask). Magnitudes, like biases, are a
# Tensor[] with an empty placeholder where a member has none (gradients do not flow through a
# Tensor?[] argument). The quant state travels as lora.py's _QUANT_SCHEMA lists.
# Outputs, 4 runs of n: the projections y_i, then what the backward reads, marked
# non-differentiable: xa_i = x_d A_i^T (fp32), z_i (DoRA with a bias or dropout: the product
# before c), ||W_i + s B_i A_i||_row (DoRA, fp32); an empty placeholder where a member has none.
# The reference path computes the same saved tensors (same shapes), so one fake serves both.
_EX_ARGS = ("Tensor[] weights, Tensor[] lora_as, Tensor[] lora_bs, float[] scalings, Tensor[] biases, "
            "bool[] has_bias, Tensor[] magnitudes, bool[] is_dora, Tensor?[] masks, float[] ps, "
            f"{_QUANT_SCHEMA}, str[] strategies")
_LIB.define(f"lora_linear_ex(Tensor x2, {_EX_ARGS}) -> Tensor[]")
_LIB.define("lora_linear_ex_backward(Tensor[] grads, Tensor x2, Tensor[] xas, Tensor[] zs, Tensor[] norms, "
            f"Tensor[] kept_ys, {_EX_ARGS}, "
            "bool need_x, bool[] need_w, bool[] need_a, bool[] need_b, bool[] need_bias, bool[] need_m) -> Tensor[]")


def _keeps_z(is_dora, has_mask, has_bias):
    """DoRA keeps z (not y) when a bias or dropout stands between z and y."""
    return is_dora and (has_mask or has_bias)


def _reads_y(is_dora, has_mask, has_bias):
    """DoRA without a bias or dropout: the backward reads y itself (z = y / c)."""
    return is_dora and not (has_mask or has_bias)


def _ex_reference_forward(x2, weights, lora_as, lora_bs, scalings, biases, mags, masks, ps, states):
    return [reference.lora_linear_ex(x2, w, a, b, s, bias=bi, quant_state=q, magnitude=m, dropout_p=p,
                                     dropout_mask=mk)
            for w, a, b, s, bi, q, m, p, mk in zip(weights, lora_as, lora_bs, scalings, biases, states, mags, ps,
                                                  masks)]


def _ex_reference_saved(x2, weights, lora_as, lora_bs, scalings, has_bias, mags, masks, ps, states):
    """xa_i, z_i, norm_i as the Triton path keeps them, from the reference formulas."""
    xas, zs, norms = [], [], []
    for i, (w, a, b, s, q, m, mk, p) in enumerate(zip(weights, lora_as, lora_bs, scalings, states, mags, masks, ps)):
        xd = x2.float() if mk is None else x2.float() * mk / (1.0 - p)
        xa = xd @ a.float().t()
        xas.append(xa)
        if m is None:
            zs.append(nothing(x2))
            norms.append(nothing(x2))
            continue
        wd = reference.dequantize_4bit(w, q, dtype=torch.float32) if q is not None else w.float()
        norms.append(torch.linalg.norm(wd + s * (b.float() @ a.float()), dim=1))
        zs.append((xd @ wd.t() + s * (xa @ b.float().t())).to(x2.dtype) if _keeps_z(True, mk is not None,
                                                                                    has_bias[i])
                  else nothing(x2))
    return xas, zs, norms


def _ex_unpack(x2, biases, has_bias, magnitudes, is_dora, absmax, code, absmax2, code2, offset, blocksize,
               blocksize2, shapes, quant_types):
    quant = (absmax, code, absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, x2.dtype)
    return quant, _present(biases, has_bias), _present(magnitudes, is_dora)


def _ex_impl(x2, weights, lora_as, lora_bs, scalings, biases, has_bias, magnitudes, is_dora, masks, ps, absmax, code,
             absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, strategies):
    quant, biases, mags = _ex_unpack(x2, biases, has_bias, magnitudes, is_dora, absmax, code, absmax2, code2, offset,
                                     blocksize, blocksize2, shapes, quant_types)
    masks = list(masks)
    if not use_triton(x2) or x2.shape[0] == 0:  # no tokens: nothing to launch
        states = _reference_states(*quant)
        outs = _ex_reference_forward(x2, weights, lora_as, lora_bs, scalings, biases, mags, masks, ps, states)
        xas, zs, norms = _ex_reference_saved(x2, weights, lora_as, lora_bs, scalings, has_bias, mags, masks, ps,
                                             states)
        return [y.contiguous() for y in outs] + xas + zs + norms
    infos = _quant_infos(weights, *quant)
    metas = list(zip(infos, scalings, strategies, ps, is_dora))
    outs, xas, zs, norms, _ = _ex_forward(x2, metas, weights, lora_as, lora_bs, biases, mags, masks)
    return (outs + [xa.contiguous() for xa in xas] + [nothing(x2) if z is None else z for z in zs]
            + [nothing(x2) if nm is None else nm for nm in norms])


def _ex_fake(x2, weights, lora_as, lora_bs, scalings, biases, has_bias, magnitudes, is_dora, masks, ps, absmax, code,
             absmax2, code2, offset, blocksize, blocksize2, shapes, quant_types, strategies):
    M, n = x2.shape[0], len(weights)
    outs = [x2.new_empty(M, shape[0]) for shape in shapes]
    xas = [x2.new_empty(M, a.shape[0], dtype=torch.float32) for a in lora_as]
    zs = [x2.new_empty(M, shapes[i][0]) if _keeps_z(is_dora[i], masks[i] is not None, has_bias[i]) else nothing(x2)
          for i in range(n)]
    norms = [x2.new_empty(shapes[i][0], dtype=torch.float32) if is_dora[i] else nothing(x2) for i in range(n)]
    return outs + xas + zs + norms


def _ex_backward_impl(grads, x2, xas, zs, norms, kept_ys, weights, lora_as, lora_bs, scalings, biases, has_bias, magnitudes,
                      is_dora, masks, ps, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shapes,
                      quant_types, strategies, need_x, need_w, need_a, need_b, need_bias, need_m):
    """[dx, dW_0.., dA_0.., dB_0.., dbias_0.., dm_0..]; an entry not needed is an empty tensor.
    kept_ys[i] is y_i where DoRA without a bias or dropout reads it (dm from y), else a placeholder."""
    n = len(weights)
    quant, biases, mags = _ex_unpack(x2, biases, has_bias, magnitudes, is_dora, absmax, code, absmax2, code2, offset,
                                     blocksize, blocksize2, shapes, quant_types)
    masks = list(masks)
    if not use_triton(x2) or x2.shape[0] == 0:
        states = _reference_states(*quant)

        def forward(x, *params):
            ws, a_s, b_s, bs, ms = (list(params[i * n:(i + 1) * n]) for i in range(5))
            return tuple(_ex_reference_forward(x, ws, a_s, b_s, scalings, bs, ms, masks, ps, states))

        primals = (x2, *weights, *lora_as, *lora_bs, *biases, *mags)
        needs = (need_x, *[need_w[i] and absmax[i] is None for i in range(n)], *need_a, *need_b,
                 *[need_bias[i] and has_bias[i] for i in range(n)], *[need_m[i] and is_dora[i] for i in range(n)])
        result = reference_vjp(forward, primals, needs, grads)
        result = [r.to(p.dtype).contiguous() if r is not None else None for r, p in zip(result, primals)]
    else:
        infos = _quant_infos(weights, *quant)
        metas = list(zip(infos, scalings, strategies, ps, is_dora))
        kept = [kept_ys[i] if _reads_y(is_dora[i], masks[i] is not None, has_bias[i]) else None for i in range(n)]
        z_list = [zs[i] if _keeps_z(is_dora[i], masks[i] is not None, has_bias[i]) else None for i in range(n)]
        norm_list = [norms[i] if is_dora[i] else None for i in range(n)]
        bias_meta = [(need_bias[i] and b is not None, None if b is None else b.dtype) for i, b in enumerate(biases)]
        dx, d_w, d_a, d_b, d_bias, d_m = _ex_backward(list(grads), x2, metas, list(xas), weights, lora_as,
                                                      lora_bs, mags, masks, z_list, norm_list, kept, need_x,
                                                      list(need_w), list(need_a), list(need_b), list(need_m),
                                                      bias_meta)
        result = [dx, *d_w, *d_a, *d_b, *d_bias, *d_m]
    return [r if r is not None else nothing(x2) for r in result]


def _ex_backward_fake(grads, x2, xas, zs, norms, kept_ys, weights, lora_as, lora_bs, scalings, biases, has_bias,
                      magnitudes, is_dora, masks, ps, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                      shapes, quant_types, strategies, need_x, need_w, need_a, need_b, need_bias, need_m):
    out = lora_grad_fakes(x2, weights, lora_as, lora_bs, biases, has_bias, absmax, need_x, need_w, need_a, need_b,
                          need_bias)
    return out + [m.new_empty(m.shape) if need_m[i] and is_dora[i] else nothing(x2) for i, m in enumerate(magnitudes)]


_MASKS = 9  # index of masks among lora_linear_ex's inputs


def _ex_setup(ctx, inputs, output):
    x2, weights, lora_as, lora_bs = inputs[:4]
    n = ctx.n = len(weights)
    has_bias, is_dora, masks = inputs[6], inputs[8], inputs[_MASKS]
    # scalings, biases, has_bias, magnitudes, is_dora, ps, quant lists, strategies; the masks are saved
    # tensors (saved-tensor hooks, e.g. activation offload, see them), rebuilt in backward
    ctx.statics = inputs[4:_MASKS] + (None,) + inputs[_MASKS + 1:]
    ctx.mask_at = [i for i, mk in enumerate(masks) if mk is not None]
    ys, saved = output[:n], output[n:]
    ctx.mark_non_differentiable(*saved)
    kept_ys = [ys[i] if _reads_y(is_dora[i], masks[i] is not None, has_bias[i]) else nothing(x2) for i in range(n)]
    ctx.save_for_backward(x2, *saved, *kept_ys, *weights, *lora_as, *lora_bs, *[masks[i] for i in ctx.mask_at])


def _ex_autograd_backward(ctx, grads):
    n = ctx.n
    x2, *rest = ctx.saved_tensors
    xas, zs, norms, kept_ys, weights, lora_as, lora_bs = (list(rest[i * n:(i + 1) * n]) for i in range(7))
    masks = [None] * n
    for i, mk in zip(ctx.mask_at, rest[7 * n:]):
        masks[i] = mk
    needs = ctx.needs_input_grad  # (x2, weights, lora_as, lora_bs, scalings, biases, ...): lists as one flag each
    statics = ctx.statics[:_MASKS - 4] + (masks,) + ctx.statics[_MASKS - 3:]
    biases, has_bias, magnitudes, is_dora = statics[1], statics[2], statics[3], statics[4]
    need_bias = [h and b.requires_grad for b, h in zip(biases, has_bias)]
    need_m = [d and m.requires_grad for m, d in zip(magnitudes, is_dora)]
    need_w = [w.requires_grad for w in weights]
    need_a = [a.requires_grad for a in lora_as]
    need_b = [b.requires_grad for b in lora_bs]
    flat = torch.ops.fastsft.lora_linear_ex_backward(list(grads[:n]), x2, xas, zs, norms, kept_ys, weights, lora_as,
                                                     lora_bs, *statics, bool(needs[0]), need_w, need_a, need_b,
                                                     need_bias, need_m)
    dx, d_w, d_a, d_b, d_bias, d_m = flat[0], *(flat[1 + k * n:1 + (k + 1) * n] for k in range(5))
    return (dx if needs[0] else None, picked(d_w, need_w), picked(d_a, need_a), picked(d_b, need_b), None,
            picked(d_bias, need_bias), None, picked(d_m, need_m), *[no_grad_for(arg) for arg in statics[4:]])


_LIB.impl("lora_linear_ex", _ex_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_linear_ex_backward", _ex_backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::lora_linear_ex", _ex_fake, lib=_LIB)
torch.library.register_fake(f"{NAMESPACE}::lora_linear_ex_backward", _ex_backward_fake, lib=_LIB)
torch.library.register_autograd(f"{NAMESPACE}::lora_linear_ex", _ex_autograd_backward, setup_context=_ex_setup,
                                lib=_LIB)


def _check_extras(x, ws, magnitudes, dropout_ps, dropout_masks, lora_biases, n):
    for name, seq in (("magnitudes", magnitudes), ("dropout_ps", dropout_ps), ("dropout_masks", dropout_masks),
                      ("lora_biases", lora_biases)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries; expected one per weight ({n})")
    for i in range(n):
        tag = "" if n == 1 else f"[{i}]"
        out_f = ws[i].shape[0]
        p = dropout_ps[i]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_p{tag} must be a number in [0, 1), got {p!r}")
        m = magnitudes[i]
        if m is not None:
            check_float(f"magnitude{tag}", m)
            if m.shape != (out_f,):
                raise ValueError(f"magnitude{tag} must be ({out_f},), got {tuple(m.shape)}")
            if lora_biases[i] is not None:
                raise ValueError(f"lora_bias{tag} with DoRA (magnitude{tag}) is not supported (peft refuses it too)")
        lb = lora_biases[i]
        if lb is not None:
            check_float(f"lora_bias{tag}", lb)
            if lb.shape != (out_f,):
                raise ValueError(f"lora_bias{tag} must be ({out_f},), got {tuple(lb.shape)}")
        mask = dropout_masks[i]
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape):
                raise ValueError(f"dropout_mask{tag} must be a bool tensor of x's shape {tuple(x.shape)}, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            if p == 0:
                raise ValueError(f"dropout_mask{tag} given but dropout_p{tag} is 0")


def _effective_bias(bias, lora_bias, scaling):
    """bias + s * lora_bias (peft: lora_B's bias is scaled with the LoRA term); autograd reaches both."""
    if lora_bias is None:
        return bias
    term = lora_bias * scaling
    return term if bias is None else bias + term.to(bias.dtype)


def lora_linear_ex_fused(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                         lora_bs: Sequence[torch.Tensor], scalings: Sequence[float], *,
                         biases: Optional[Sequence[Optional[torch.Tensor]]] = None, quant_states=None,
                         magnitudes: Optional[Sequence[Optional[torch.Tensor]]] = None,
                         dropout_ps: Optional[Sequence[float]] = None,
                         dropout_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                         lora_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                         dequant_rows: Optional[int] = None, dense_base: Optional[str] = None) -> List[torch.Tensor]:
    """Projections of one x, each LoRA or DoRA (magnitudes[i] given), with dropout on the LoRA
    input (dropout_ps[i] > 0; a mask is drawn per projection unless dropout_masks[i] is given)
    and a LoRA bias (lora_biases[i]); see the module docstring for the formulas (peft's)."""
    return _run_ex(x, weights, lora_as, lora_bs, scalings, biases, quant_states, magnitudes, dropout_ps,
                   dropout_masks, lora_biases, dequant_rows, dense_base)


def _run_ex(x, weights, lora_as, lora_bs, scalings, biases, quant_states, magnitudes, dropout_ps, dropout_masks,
            lora_biases, dequant_rows, dense_base):
    n = len(weights)
    if n == 0:
        raise ValueError("weights is empty; lora_linear_ex_fused needs at least one projection")
    none = [None] * n
    biases = list(biases) if biases is not None else none
    quant_states = list(quant_states) if quant_states is not None else none
    magnitudes = list(magnitudes) if magnitudes is not None else none
    dropout_ps = [float(p) if not isinstance(p, bool) else p for p in dropout_ps] if dropout_ps is not None \
        else [0.0] * n
    dropout_masks = list(dropout_masks) if dropout_masks is not None else none
    lora_biases = list(lora_biases) if lora_biases is not None else none
    for name, seq in (("lora_as", lora_as), ("lora_bs", lora_bs), ("scalings", scalings), ("biases", biases),
                      ("quant_states", quant_states)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries; expected one per weight ({n})")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (..., in), got shape {tuple(x.shape)}")
    states = [_state_args(w, q) for w, q in zip(weights, quant_states)]
    ws = [_checked_weight(w, q, st) for w, q, st in zip(weights, quant_states, states)]
    for i, w in enumerate(ws):
        _check_lora(x, w, lora_as[i], lora_bs[i], biases[i], name="" if n == 1 else f"[{i}]")
    for s in scalings:
        if not isinstance(s, (int, float)) or s != s:
            raise ValueError(f"scaling must be a finite Python number, got {s!r}")
    _check_extras(x, ws, magnitudes, dropout_ps, dropout_masks, lora_biases, n)
    # drawn here, outside the operator, so that the operator is deterministic
    masks = [dropout_masks[i] if dropout_masks[i] is not None or dropout_ps[i] == 0 else
             draw_dropout_mask(dropout_ps[i], x.shape, x.device) for i in range(n)]
    eff_biases = [_effective_bias(biases[i], lora_biases[i], float(scalings[i])) for i in range(n)]
    rows_threshold = resolve_dequant_rows(dequant_rows)
    base = resolve_dense_base(dense_base)
    lead = x.shape[:-1]
    x2 = _as_2d(x)
    masks2 = [None if m is None else m.reshape(x2.shape) for m in masks]
    strategies = [pick_strategy(x2.shape[0], q is not None, dequant_rows=rows_threshold, dense_base=base)
                  for q in quant_states]
    quant = [list(column) for column in zip(*states)]
    outs = torch.ops.fastsft.lora_linear_ex(
        x2, list(weights), list(lora_as), list(lora_bs), [float(s) for s in scalings],
        [b if b is not None else nothing(x2) for b in eff_biases], [b is not None for b in eff_biases],
        [m if m is not None else nothing(x2) for m in magnitudes], [m is not None for m in magnitudes], masks2,
        [float(p) for p in dropout_ps], *quant, strategies)[:n]
    return [y.reshape(*lead, y.shape[-1]) for y in outs]


def lora_linear_ex(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scaling: float, *, bias: Optional[torch.Tensor] = None, quant_state=None,
                   magnitude: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                   dropout_mask: Optional[torch.Tensor] = None, lora_bias: Optional[torch.Tensor] = None,
                   dequant_rows: Optional[int] = None, dense_base: Optional[str] = None) -> torch.Tensor:
    """One LoRA projection with DoRA (``magnitude``), dropout on the LoRA input and a LoRA bias,
    as peft computes it; ``lora_linear`` is this with none of the three."""
    return _run_ex(x, [weight], [lora_a], [lora_b], [scaling], [bias], [quant_state], [magnitude], [dropout_p],
                   [dropout_mask], [lora_bias], dequant_rows, dense_base)[0]


__all__ = ["lora_linear_ex", "lora_linear_ex_fused", "weight_row_norm", "draw_dropout_mask"]
