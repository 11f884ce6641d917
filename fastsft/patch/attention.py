"""fastsft's packed varlen attention as a transformers attention implementation.

``apply(model)`` registers ``fastsft_varlen`` with transformers' AttentionInterface
(and a matching AttentionMaskInterface entry, so mask creation hands over the 2-D
padding mask, or nothing, instead of building a 4-D mask) and switches the model
*instance* to it through ``set_attn_implementation``; ``revert(model)`` switches back.

Per attention call the backend finds the document boundaries, in this order:
1. ``cu_seq_lens_q`` passed by the caller (transformers' FlashAttentionKwargs, e.g.
   from DataCollatorWithFlattening or fastsft's trainer). With an int32 device tensor
   and an int ``max_length_q`` they go to the kernel as they are: no host read at all
   (the trainer makes them with ``make_cu_seqlens``, whose host view the kernel
   keeps); otherwise one host copy per batch gives the exact maximum;
2. a 2-D padding mask: the valid tokens are gathered (unpad), run as documents
   and scattered back (padded positions get zeros);
3. ``position_ids`` that restart per document: a document starts wherever the
   position is not the previous one + 1;
4. otherwise every batch row is one document.
Otherwise boundaries are computed once per batch (one small device->host copy of the
cu_seq_lens, mask or position ids; the padding mask's in the mask function),
cached on the identity of that tensor, and reused by every later layer, the
recompute and the backward with no host sync. ``remember_packed_positions``
gives transformers' packed-sequence detection its answer from host position ids
(it reads the device tensor back on every forward otherwise).

Cases the kernel does not cover (attention dropout > 0, decoding with a KV cache,
custom 4-D masks) run an exact eager computation instead, logged once per reason.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional

import torch

logger = logging.getLogger("fastsft.patch")

IMPLEMENTATIONS = {"triton": "fastsft_varlen", "flash_attn": "fastsft_varlen_fa2"}
_PREVIOUS_ATTR = "_fastsft_attention_previous"
_logged: set = set()


def _log_once(key: str, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(message, *args)


# =============================================================================== boundaries
class _Boundaries:
    """Document boundaries of one batch: cu_seqlens on the device, the max length,
    and for the unpad path the (row, column) index of every valid token."""

    __slots__ = ("source", "version", "shape", "cu", "total", "max_len", "rows", "cols")

    def __init__(self, source, cu, total, max_len, rows=None, cols=None):
        self.source = source  # strong reference: identity checks stay sound while cached
        self.version = source._version if isinstance(source, torch.Tensor) else None
        self.shape = tuple(source.shape) if isinstance(source, torch.Tensor) else None
        self.cu, self.total, self.max_len, self.rows, self.cols = cu, total, max_len, rows, cols

    def matches(self, source) -> bool:
        return (self.source is source and self.version == source._version
                and self.shape == tuple(source.shape))


_CACHE: List[_Boundaries] = []
_CACHE_SIZE = 4  # e.g. a full-attention and a sliding-window mask of the same batch


def _cached(source) -> Optional[_Boundaries]:
    for entry in _CACHE:
        if entry.matches(source):
            return entry
    return None


def _remember(entry: _Boundaries) -> _Boundaries:
    _CACHE.insert(0, entry)
    del _CACHE[_CACHE_SIZE:]
    return entry


def _make_cu(bounds, device) -> torch.Tensor:
    from fastsft_kernels.attention import make_cu_seqlens

    return make_cu_seqlens(bounds, device)


def boundaries_from_position_ids(position_ids: torch.Tensor, batch: int, seqlen: int, device) -> _Boundaries:
    """Documents of the flattened (batch * seqlen) tokens: a new one starts at each row
    start and wherever a position is not the previous position + 1."""
    entry = _cached(position_ids)
    if entry is not None and entry.rows is None and entry.total == batch * seqlen:
        return entry
    pos = position_ids.detach()
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    pos = pos.expand(batch, seqlen).to("cpu", torch.int64)  # the one sync of this batch
    starts = torch.ones(batch, seqlen, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    bounds = starts.reshape(-1).nonzero().flatten().tolist() + [batch * seqlen]
    max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return _remember(_Boundaries(position_ids, _make_cu(bounds, device), bounds[-1], max_len))


def boundaries_from_padding_mask(mask: torch.Tensor, device) -> _Boundaries:
    """Unpad a (batch, seqlen) mask: each row's valid tokens form one document."""
    entry = _cached(mask)
    if entry is not None and entry.rows is not None:
        return entry
    host = mask.detach().to("cpu", torch.bool)  # the one sync of this batch
    lengths = host.sum(dim=1).tolist()
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + int(n))
    rows, cols = host.nonzero(as_tuple=True)
    return _remember(_Boundaries(mask, _make_cu(bounds, device), bounds[-1], max(lengths) if lengths else 0,
                                 rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)))


def boundaries_from_cu_seqlens(cu_seqlens: torch.Tensor, device) -> _Boundaries:
    """Caller-provided cu_seq_lens (any int dtype/device): validated and copied to an
    int32 device tensor once per batch, so each layer's kernel call skips the sync."""
    entry = _cached(cu_seqlens)
    if entry is not None and entry.rows is None:
        return entry
    bounds = [int(b) for b in cu_seqlens.detach().to("cpu").tolist()]  # the one sync of this batch
    max_len = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    return _remember(_Boundaries(cu_seqlens, _make_cu(bounds, device), bounds[-1] if bounds else 0, max_len))


_ROW_CACHE: dict = {}


def boundaries_one_per_row(batch: int, seqlen: int, device) -> _Boundaries:
    key = (batch, seqlen, str(device))
    entry = _ROW_CACHE.get(key)
    if entry is None:
        if len(_ROW_CACHE) > 16:
            _ROW_CACHE.clear()
        entry = _Boundaries(None, _make_cu([i * seqlen for i in range(batch + 1)], device), batch * seqlen, seqlen)
        _ROW_CACHE[key] = entry
    return entry


def traced_boundaries(cu_seqlens, position_ids, batch: int, seqlen: int, device):
    """(cu_seqlens, max length bound) from tensor ops of fixed shape: what torch.compile traces.

    A host read (or nonzero) inside a compiled graph would break it, so the boundaries stay on
    the device: position ids give one start flag per token, and cu_seqlens has batch * seqlen + 1
    entries -- the real starts, sorted, then the total repeated (empty documents, which the kernel
    skips). The kernel reads it on the host inside the operator, once per tensor. Documents never
    cross a row, so seqlen bounds their length; caller cu_seq_lens without a host maximum are
    bounded by the whole batch."""
    total = batch * seqlen
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int32), max(total, 1)
    if position_ids is None:
        return torch.arange(0, total + 1, seqlen, dtype=torch.int32, device=device), max(seqlen, 1)
    pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    pos = pos.to(device).expand(batch, seqlen)
    first = torch.ones(batch, 1, dtype=torch.bool, device=device)
    starts = torch.cat([first, pos[:, 1:] != pos[:, :-1] + 1], dim=1).reshape(-1)
    index = torch.arange(total, device=device)
    starts_then_total = torch.where(starts, index, torch.full_like(index, total)).sort().values
    end = torch.full((1,), total, dtype=starts_then_total.dtype, device=device)
    return torch.cat([starts_then_total, end]).to(torch.int32), max(seqlen, 1)


# =============================================================================== attention functions
def _run_kernel(backend, q, k, v, cu, max_len, scale, causal, window, softcap, dropout):
    """q (T, H, D), k/v (T, H_kv, D) -> (T, H, D) with the chosen backend."""
    if backend == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_varlen_func

        left = window - 1 if window is not None else -1
        right = (0 if causal else left) if window is not None else -1
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale,
                                      causal=causal, window_size=(left, right), softcap=softcap or 0.0)
    if backend == "flash_attn":
        _log_once("fa-dtype", "attention: flash-attn needs fp16/bf16 CUDA tensors (got %s on %s); "
                  "using fastsft's Triton kernel for these calls", q.dtype, q.device)
    import fastsft_kernels

    return fastsft_kernels.varlen_attention(q, k, v, cu, max_len, causal=causal, softmax_scale=scale,
                                            window=window, softcap=softcap)


def eager_attention(query, key, value, attention_mask, scale, causal, window, softcap, dropout, training):
    """Exact reference computation for the cases the kernel does not take.

    query (B, H, S, D), key/value (B, H_kv, L, D); queries are the last S of the L
    positions (bottom-right aligned, as with a KV cache). Returns (B, S, H, D).
    """
    batch, n_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    group = n_heads // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    v = value.repeat_interleave(group, dim=1) if group > 1 else value
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(q_len, device=query.device).unsqueeze(1) + (kv_len - q_len)
    j = torch.arange(kv_len, device=query.device).unsqueeze(0)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j < window) if causal else ((i - j).abs() < window)
    allowed = allowed.expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        elif attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask[..., -kv_len:]
        else:  # additive float mask
            scores = scores + attention_mask[..., -kv_len:].float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing to attend -> 0
    if dropout and training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous()


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The one dtype attention runs in: autocast's when it is on for these tensors'
    device (the stock RoPE promotes q and k to fp32 under autocast while v stays in
    the autocast dtype), else the common dtype of the inputs."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _to_compute_dtype(query, key, value):
    dtype = compute_dtype(query, key, value)
    return query.to(dtype), key.to(dtype), value.to(dtype)  # no-ops when already there


def _packed_boundaries(kwargs, batch: int, seqlen: int, device):
    """(cu_seqlens on the device, max length) of the documents in a (batch, seqlen) batch with no padding."""
    cu_q = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    max_q = kwargs.get("max_length_q")
    if (cu_q is not None and isinstance(max_q, int) and not isinstance(max_q, bool)
            and cu_q.dtype == torch.int32 and cu_q.device == device):
        # the collator's boundaries with their host maximum: handed to the kernel as they are
        # (the kernel validates them against its host view, made once per batch)
        return cu_q, max(max_q, 1)
    if torch.compiler.is_compiling():
        return traced_boundaries(cu_q, position_ids, batch, seqlen, device)
    if cu_q is not None:
        # no host maximum: one host copy of the cu_seq_lens per batch, cached for every later layer
        bnd = boundaries_from_cu_seqlens(cu_q, device)
    elif position_ids is not None:
        bnd = boundaries_from_position_ids(position_ids, batch, seqlen, device)
    else:
        bnd = boundaries_one_per_row(batch, seqlen, device)
    return bnd.cu, max(bnd.max_len, 1)


def _traced_padded(backend, q, k, v, mask, scale, causal, window, softcap):
    """Padded (B, S, H, D) batch under torch.compile: fixed shapes, no unpad (its size is data).

    Each row's tokens are stably reordered valid-first (a per-row permutation of fixed size), so
    the valid tokens form one document of the row and its padding another (computed, then
    zeroed); cu_seqlens has 2 * batch + 1 entries and seqlen bounds every document."""
    batch, seqlen, n_heads, _ = q.shape
    valid = mask.to(torch.bool)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid first, in order
    rows = torch.arange(batch, device=q.device).unsqueeze(1)
    lengths = valid.sum(dim=1, dtype=torch.int32)
    starts = torch.arange(batch, device=q.device, dtype=torch.int32) * seqlen
    bounds = torch.stack([starts, starts + lengths], dim=1).reshape(-1)
    end = torch.full((1,), batch * seqlen, dtype=torch.int32, device=q.device)
    cu = torch.cat([bounds, end])

    def gathered(t):
        return t[rows, order].reshape(batch * seqlen, t.shape[2], t.shape[3])

    out = _run_kernel(backend, gathered(q), gathered(k), gathered(v), cu, max(seqlen, 1), scale, causal, window,
                      softcap, 0.0).view(batch, seqlen, n_heads, -1)
    back = torch.empty_like(out).index_put((rows.expand(batch, seqlen), order), out)  # the inverse permutation
    return back * valid[:, :, None, None].to(back.dtype)  # padded positions: zeros, as the unpad path gives


def _document_mask(cu: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(batch, 1, seqlen, seqlen) bool: True where query and key are in the same packed document."""
    tokens = torch.arange(batch * seqlen, device=cu.device)
    doc = torch.searchsorted(cu[1:].to(torch.int64), tokens, right=True).view(batch, 1, seqlen)
    return doc.unsqueeze(-1) == doc.unsqueeze(-2)


def _varlen_forward(backend, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, softcap=None, is_causal=None, **kwargs):
    from fastsft.distributed import ulysses

    if ulysses.active() is not None:  # sequence parallel: all tokens x local heads around the kernel
        return ulysses.exchange(_varlen_forward, backend, module, query, key, value, attention_mask,
                                scaling=scaling, dropout=dropout, sliding_window=sliding_window, softcap=softcap,
                                is_causal=is_causal, **kwargs)
    batch, n_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    window = int(sliding_window) if sliding_window is not None else None
    if window is not None and window >= max(q_len, kv_len) and causal:
        window = None  # covers every key: skip the window arithmetic
    training = module.training
    query, key, value = _to_compute_dtype(query, key, value)

    reason = None
    if dropout and training:
        reason = "attention dropout > 0 (the kernel has no dropout)"
    elif q_len != kv_len:
        reason = "query and key lengths differ (KV cache)"
    elif attention_mask is not None and attention_mask.dim() != 2:
        reason = f"a {attention_mask.dim()}-D attention mask was passed"
    if reason is not None:
        _log_once(reason, "attention: %s; using an eager attention fallback for these calls", reason)
        if attention_mask is None and q_len == kv_len:  # a packed batch keeps its documents apart here too
            cu, _ = _packed_boundaries(kwargs, batch, q_len, query.device)
            attention_mask = _document_mask(cu, batch, q_len)
        return eager_attention(query, key, value, attention_mask, scale, causal, window, softcap, dropout,
                               training), None

    q = query.transpose(1, 2)  # (B, S, H, D) views
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            attention_mask = attention_mask[:, -kv_len:]
        if torch.compiler.is_compiling():
            return _traced_padded(backend, q, k, v, attention_mask, scale, causal, window, softcap), None
        # the mask function already derived the indices (once per batch); this finds them cached
        bnd = boundaries_from_padding_mask(attention_mask, query.device)
        out = _run_kernel(backend, q[bnd.rows, bnd.cols], k[bnd.rows, bnd.cols], v[bnd.rows, bnd.cols],
                          bnd.cu, max(bnd.max_len, 1), scale, causal, window, softcap, 0.0)
        padded = out.new_zeros(batch, q_len, n_heads, out.shape[-1])
        return padded.index_put((bnd.rows, bnd.cols), out), None

    cu, max_len = _packed_boundaries(kwargs, batch, q_len, query.device)
    out = _run_kernel(backend, q.reshape(batch * q_len, n_heads, head_dim),
                      k.reshape(batch * kv_len, k.shape[2], head_dim),
                      v.reshape(batch * kv_len, v.shape[2], v.shape[3]),
                      cu, max_len, scale, causal, window, softcap, 0.0)
    return out.view(batch, q_len, n_heads, out.shape[-1]), None


def fastsft_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, softcap=None, **kwargs):
    """transformers attention function backed by fastsft_kernels.varlen_attention."""
    return _varlen_forward("triton", module, query, key, value, attention_mask, scaling=scaling,
                           dropout=dropout, sliding_window=sliding_window, softcap=softcap, **kwargs)


def fastsft_varlen_fa2(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       sliding_window=None, softcap=None, **kwargs):
    """Same plumbing, with flash-attn's flash_attn_varlen_func as the kernel."""
    return _varlen_forward("flash_attn", module, query, key, value, attention_mask, scaling=scaling,
                           dropout=dropout, sliding_window=sliding_window, softcap=softcap, **kwargs)


def padding_only_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """Mask builder for the varlen backends: the 2-D padding mask when some token is
    padding (or the lengths differ), else None -- never a 4-D mask."""
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != kv_length:
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] != kv_length:
            return attention_mask
    if torch.compiler.is_compiling():  # no host read in a graph: the attention treats the mask as data
        return attention_mask
    # the one host copy of this batch's mask: it decides "no padding" and gives the unpad
    # indices, cached on the returned mask for every layer (and the recompute)
    bnd = boundaries_from_padding_mask(attention_mask, attention_mask.device)
    if bnd.total == attention_mask.numel():
        return None
    return attention_mask


_FUNCTIONS = {"fastsft_varlen": fastsft_varlen, "fastsft_varlen_fa2": fastsft_varlen_fa2}


# =============================================================================== packed positions
class _PackedPositions:
    __slots__ = ("device_ids", "version", "sequence_index")

    def __init__(self, device_ids, sequence_index):
        self.device_ids, self.version, self.sequence_index = device_ids, device_ids._version, sequence_index


_PACKED: List[_PackedPositions] = []


def packed_sequence_index(host_position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """transformers' find_packed_sequence_indices, on host position ids (no device read):
    per token, the index of its document in the row; None when every row is one document."""
    pos = host_position_ids if host_position_ids.dim() == 2 else host_position_ids.unsqueeze(0)
    diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
    index = (diff != 1).cumsum(-1)
    return None if bool((index[:, -1] == 0).all()) else index


def remember_packed_positions(device_position_ids: torch.Tensor, host_position_ids: torch.Tensor) -> None:
    """Register a batch's device position ids with their host copy (once per batch, before the
    forward): transformers' mask preparation then gets its packed-sequence index from the host
    values instead of reading the device tensor back (one sync per forward otherwise)."""
    index = packed_sequence_index(host_position_ids)
    if index is not None:
        index = index.to(device_position_ids.device, non_blocking=True)
    _PACKED.insert(0, _PackedPositions(device_position_ids, index))
    del _PACKED[_CACHE_SIZE:]
    _install_packed_lookup()


def _known_packed_index(position_ids):
    for entry in _PACKED:
        if entry.device_ids is position_ids and entry.version == position_ids._version:
            return True, entry.sequence_index
    return False, None


def _install_packed_lookup() -> None:
    """Wrap masking_utils.find_packed_sequence_indices once: for registered position ids it
    returns the value computed on the host (the very tensor transformers would compute);
    for every other tensor it is the stock function."""
    try:
        from transformers import masking_utils
    except ImportError:
        return
    stock = getattr(masking_utils, "find_packed_sequence_indices", None)
    if stock is None or getattr(stock, "_fastsft_packed_lookup", False):
        return

    def find_packed_sequence_indices(position_ids):
        if torch.compiler.is_compiling():  # a trace computes it from the tensor (no host read there)
            return stock(position_ids)
        known, index = _known_packed_index(position_ids)
        return index if known else stock(position_ids)

    find_packed_sequence_indices._fastsft_packed_lookup = True
    find_packed_sequence_indices.__wrapped__ = stock
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices


def register() -> bool:
    """Register the fastsft implementations with transformers (idempotent).

    Returns False when this transformers has no AttentionMaskInterface (before 4.53):
    its models then build a plain 4-D causal mask for any custom implementation,
    which does not separate packed documents, so the backend cannot be used."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, padding_only_mask)
    return True


# =============================================================================== apply / revert
def _transformers_model(model):
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            model = get_base()
        except Exception:
            pass
    return model


def _set_implementation(model, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:  # transformers without set_attn_implementation: set every config of the model
        for sub in model.modules():
            config = getattr(sub, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} did not accept attn_implementation={name!r} "
                         f"(it reports {model.config._attn_implementation!r})")


def apply(model, backend: str = "triton") -> List[str]:
    """Make ``model`` use fastsft's varlen attention; returns what was done."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {sorted(IMPLEMENTATIONS)}, got {backend!r}")
    if backend == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise ImportError("backend='flash_attn' needs the flash-attn package "
                              "(pip install -e '.[flash]' on a CUDA machine)") from exc
    base = _transformers_model(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a transformers model (no config._attn_implementation)")
    name = IMPLEMENTATIONS[backend]
    if not getattr(base, "_supports_attention_backend", False):
        line = (f"attention: {type(base).__name__} does not support custom attention implementations; "
                f"left at {config._attn_implementation!r}")
        logger.warning(line)
        return []
    if not register():
        import transformers

        logger.warning("attention: transformers %s has no AttentionMaskInterface (needs >= 4.53); "
                       "left at %r", transformers.__version__, config._attn_implementation)
        return []
    current = config._attn_implementation
    if current == name:
        return [f"already {name}"]
    previous = getattr(base, _PREVIOUS_ATTR, None)
    if previous is None:
        previous = current
    _set_implementation(base, name)
    object.__setattr__(base, _PREVIOUS_ATTR, previous)
    return [f"{current} -> {name} (packed varlen, {_path_that_runs(base, backend)})"]


def _path_that_runs(model, backend: str) -> str:
    """Which code computes attention on the model's device: the log line must not claim a kernel that a
    CPU run never calls."""
    if backend == "flash_attn":
        return "flash-attn kernel"
    param = next(model.parameters(), None)
    if param is not None and param.is_cuda:
        return "Triton kernel"
    from fastsft_kernels._triton_utils import triton_on_cpu

    if triton_on_cpu():
        return "Triton kernel through the interpreter (FASTSFT_TRITON_ON_CPU=1)"
    return "PyTorch reference on CPU; the Triton kernel runs on CUDA"


def revert(model) -> None:
    """Restore the attention implementation the model had before apply (no-op if not applied)."""
    base = _transformers_model(model)
    previous = getattr(base, _PREVIOUS_ATTR, None)
    if previous is None:
        return
    _set_implementation(base, previous)
    object.__delattr__(base, _PREVIOUS_ATTR)
    logger.info("attention: restored %s", previous)


__all__ = ["apply", "revert", "register", "fastsft_varlen", "fastsft_varlen_fa2", "eager_attention",
           "padding_only_mask", "remember_packed_positions", "packed_sequence_index", "IMPLEMENTATIONS"]
