"""bitsandbytes 4-bit (NF4 / FP4) weights in Triton.

Layout (bitsandbytes' ``quantize_4bit``): the weight W (out, in) is flattened row
major; element i sits in byte i // 2 of the packed uint8 data, in the HIGH nibble
when i is even and the LOW nibble when i is odd. Its value is
``code[nibble] * absmax[i // blocksize]`` computed in fp32, where ``code`` is the
16-entry NF4 or FP4 table. With double quantization ("nested"), absmax itself is
stored as uint8 codes decoded blockwise: ``absmax[j] = code2[q[j]] * absmax2[j //
blocksize2] + offset``.

This module holds:
- ``QuantInfo``: a validated view of a ``QuantState`` (what the kernels need);
- ``load_weight_tile``: a ``@triton.jit`` helper the matmul kernels call to load a
  tile of W, dense or 4-bit (dequantized in registers, never written out);
- ``dequantize_4bit``: a standalone Triton dequantization (a test helper and a
  building block), bit-for-bit with ``bitsandbytes.functional.dequantize_4bit``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._triton_utils import FLOAT_DTYPES, empty, is_interpreter

SUPPORTED_QUANT_TYPES = ("nf4", "fp4")


@dataclass
class QuantInfo:
    """What the kernels need from a bitsandbytes QuantState, validated."""

    packed: torch.Tensor      # flat uint8, (numel + 1) // 2 bytes
    shape: tuple              # (out, in)
    blocksize: int
    quant_type: str
    dtype: torch.dtype        # dtype bitsandbytes dequantizes to
    code: torch.Tensor        # (16,) fp32 table
    absmax: torch.Tensor      # fp32 absmax, or the uint8 codes when nested
    nested: bool
    code2: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    blocksize2: int = 0
    offset: Optional[torch.Tensor] = None  # (1,) fp32 on the device: read by the kernel, no host sync
    absmax_decoded: Optional[torch.Tensor] = None  # fp32 absmax of a nested state, decoded once
    _pairs: Optional[torch.Tensor] = None

    @property
    def pairs(self) -> torch.Tensor:
        """The 256-entry code-pair table (built once): see ``code_pair_table``."""
        if self._pairs is None:
            self._pairs = code_pair_table(self.code)
        return self._pairs

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[0] * self.shape[1] // self.blocksize)


# ---------------------------------------------------------------- per-weight cache
# Validating a QuantState costs several .to() calls and, when nested, a decode
# kernel and an absmax-sized allocation; both are constant per weight. The result
# is kept on the QuantState itself and reused while the key below still holds:
# the packed storage (pointer, size, dtype) and every statistics tensor (object,
# pointer, in-place version). Moving the state (QuantState.to) replaces those
# tensors; editing them in place bumps their version: either misses the cache.
_CACHE_ATTR = "_fastsft_quant_info"


def _tensor_key(t) -> tuple:
    if not isinstance(t, torch.Tensor):
        return (type(t).__name__, t if isinstance(t, (int, float)) else id(t))
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        version = -1
    return (id(t), t.data_ptr(), version, t.dtype, t.device, tuple(t.shape))


def _state_key(packed: torch.Tensor, quant_state) -> tuple:
    state2 = getattr(quant_state, "state2", None)
    stats = [getattr(quant_state, "absmax", None), getattr(quant_state, "code", None),
             getattr(quant_state, "offset", None)]
    if state2 is not None:
        stats += [state2.absmax, state2.code]
    return (packed.data_ptr(), packed.numel(), packed.dtype, packed.device, tuple(quant_state.shape),
            int(quant_state.blocksize), quant_state.quant_type, quant_state.dtype,
            bool(getattr(quant_state, "nested", False)), *(_tensor_key(t) for t in stats))


def cached_quant_info(packed: torch.Tensor, quant_state) -> QuantInfo:
    """quant_info(packed, quant_state), validated once per weight and reused until it changes."""
    if not isinstance(packed, torch.Tensor):
        return quant_info(packed, quant_state)
    try:
        key = _state_key(packed, quant_state)
    except (AttributeError, TypeError, ValueError):
        return quant_info(packed, quant_state)  # not a QuantState: let quant_info say why
    hit = getattr(quant_state, _CACHE_ATTR, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    info = quant_info(packed, quant_state)
    try:
        setattr(quant_state, _CACHE_ATTR, (key, info))
    except AttributeError:  # a state object that refuses attributes: validate per call
        pass
    return info


def quant_info(packed: torch.Tensor, quant_state) -> QuantInfo:
    """Validate ``packed`` + ``quant_state`` and return a QuantInfo (ValueError on bad input)."""
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(packed).__name__}")
    for field in ("absmax", "shape", "blocksize", "quant_type", "dtype"):
        if not hasattr(quant_state, field):
            raise ValueError(f"quant_state has no field {field!r}; expected a bitsandbytes QuantState")
    qtype = quant_state.quant_type
    if qtype not in SUPPORTED_QUANT_TYPES:
        raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {qtype!r}")
    shape = tuple(int(s) for s in quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D (out, in), got {shape}")
    blocksize = int(quant_state.blocksize)
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"quant_state.blocksize must be an even number >= 2, got {blocksize}")
    if packed.dtype != torch.uint8:
        if packed.is_floating_point() or packed.dtype in (torch.int8, torch.int16, torch.int32):
            packed = packed.view(torch.uint8)  # bnb's quant_storage may be another dtype
        else:
            raise ValueError(f"4-bit weight must be uint8 packed data, got {packed.dtype}")
    packed = packed.reshape(-1)
    numel = shape[0] * shape[1]
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed 4-bit weight has {packed.numel()} bytes; quant_state.shape {shape} needs {(numel + 1) // 2}")
    if quant_state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be float32/float16/bfloat16, got {quant_state.dtype}")
    if not packed.is_contiguous():
        packed = packed.contiguous()
    device = packed.device
    code = getattr(quant_state, "code", None)
    if code is None:
        code = standard_code(qtype, device)
    code = code.to(device=device, dtype=torch.float32).contiguous()
    if code.numel() != 16:
        raise ValueError(f"quant_state.code must have 16 entries, got {code.numel()}")
    nested = bool(getattr(quant_state, "nested", False)) and getattr(quant_state, "state2", None) is not None
    n_blocks = -(-numel // blocksize)
    absmax = quant_state.absmax.to(device).reshape(-1).contiguous()
    if absmax.numel() != n_blocks:
        raise ValueError(f"quant_state.absmax has {absmax.numel()} entries; expected {n_blocks}")
    info = QuantInfo(packed=packed, shape=shape, blocksize=blocksize, quant_type=qtype,
                     dtype=quant_state.dtype, code=code, absmax=absmax, nested=nested)
    if nested:
        state2 = quant_state.state2
        if absmax.dtype != torch.uint8:
            raise ValueError(f"nested quant_state.absmax must be uint8 codes, got {absmax.dtype}")
        info.code2 = state2.code.to(device=device, dtype=torch.float32).contiguous()
        info.absmax2 = state2.absmax.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
        info.blocksize2 = int(state2.blocksize)
        info.offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device).reshape(1)
    else:
        info.absmax = absmax.to(torch.float32)
    return info


def code_pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the fp32 bits of code[b >> 4] (low word) and code[b & 15] (high word).

    One 8-byte lookup decodes both nibbles of a packed byte (instead of two 4-byte
    lookups), with the exact fp32 codes, so the dequantized values stay bit for bit.
    """
    bits = code.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256, device=code.device)
    return (bits[b >> 4] | (bits[b & 15] << 32)).contiguous()


def standard_code(quant_type: str, device) -> torch.Tensor:
    """The 16-entry table bitsandbytes uses for ``quant_type`` (fp32)."""
    # one table for the oracle and the kernels; parity tests against bitsandbytes check it
    return torch.tensor(reference.FOUR_BIT_CODES[quant_type], dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _decode_nested_absmax_kernel(q_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n, blocksize2,
                                 BLOCK: tl.constexpr):
    offset = tl.load(offset_ptr)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    val = tl.load(code2_ptr + q, mask=mask, other=0.0)
    scale = tl.load(absmax2_ptr + offs // blocksize2, mask=mask, other=0.0)
    tl.store(out_ptr + offs, val * scale + offset, mask=mask)


def absmax_fp32(info: QuantInfo) -> torch.Tensor:
    """The per-block fp32 absmax (the 8-bit nested codes decoded once per QuantInfo)."""
    if not info.nested:
        return info.absmax
    if info.absmax_decoded is None:
        info.absmax_decoded = _decode_nested_absmax(info)
    return info.absmax_decoded


def _decode_nested_absmax(info: QuantInfo) -> torch.Tensor:
    n = info.absmax.numel()
    out = empty(n, dtype=torch.float32, device=info.absmax.device)
    block = 1024
    _decode_nested_absmax_kernel[(triton.cdiv(n, block),)](
        info.absmax, info.code2, info.absmax2, info.offset, out, n, info.blocksize2, BLOCK=block,
        enable_fp_fusion=False)  # bitsandbytes rounds the product before adding the offset
    return out


@triton.jit
def load_weight_tile(w_ptr, absmax_ptr, code_ptr, offs_row, col_start, n_rows, n_cols,
                     stride_row, stride_col, blocksize,
                     IS_4BIT: tl.constexpr, PAIRED: tl.constexpr, BLOCK_ROW: tl.constexpr,
                     BLOCK_COL: tl.constexpr, OUT_DTYPE: tl.constexpr, ROW_SCALE: tl.constexpr = False,
                     EVEN_ROWS: tl.constexpr = False, EVEN_COLS: tl.constexpr = False):
    """Tile W[offs_row, col_start : col_start + BLOCK_COL] of a (n_rows, n_cols) weight
    as OUT_DTYPE (0 outside the weight). col_start is a multiple of BLOCK_COL.

    Dense: a masked load. 4-bit: unpack nibbles, look the code up (the table stays
    in L1), scale by the block's absmax in fp32, then cast -- in registers only.
    PAIRED (n_cols even, so every row starts on a byte boundary) loads each byte
    once, decodes both its nibbles with one lookup in the 256-entry pair table
    (``code_ptr`` is ``code_pair_table``'s int64 table then) and interleaves them
    with tl.join; otherwise (odd n_cols) every element gathers its own byte and
    ``code_ptr`` is the 16-entry fp32 table. ROW_SCALE (n_cols a multiple
    of blocksize, blocksize a multiple of BLOCK_COL) means one quantization block
    covers each row of the tile: one absmax load per row instead of per element.
    EVEN_ROWS / EVEN_COLS: the tile never passes that edge of the weight (no mask
    on it, so the loop body carries no per-step bounds checks there).
    """
    offs_col = col_start + tl.arange(0, BLOCK_COL)
    row_ok = offs_row[:, None] < n_rows
    if IS_4BIT:
        if PAIRED:
            # byte b of the row holds columns 2b (high nibble) and 2b + 1 (low nibble)
            offs_pair = col_start // 2 + tl.arange(0, BLOCK_COL // 2)
            if EVEN_ROWS and EVEN_COLS:
                mask = None
            elif EVEN_COLS:
                mask = row_ok
            elif EVEN_ROWS:
                mask = offs_pair[None, :] < n_cols // 2
            else:
                mask = row_ok & (offs_pair[None, :] < n_cols // 2)
            # a row's bytes start at row * n_cols / 2 (n_cols even): no per-element 64-bit division
            row_bytes = offs_row.to(tl.int64) * (n_cols // 2)
            byte = tl.load(w_ptr + row_bytes[:, None] + offs_pair[None, :], mask=mask, other=0).to(tl.int32)
            if ROW_SCALE:
                first = offs_row.to(tl.int64) * n_cols + col_start
                scale = tl.load(absmax_ptr + first // blocksize, mask=offs_row < n_rows, other=0.0)[:, None]
            else:
                flat = 2 * row_bytes[:, None] + 2 * offs_pair[None, :]
                scale = tl.load(absmax_ptr + flat // blocksize, mask=mask, other=0.0)
            # code_ptr is the 256-entry pair table here: both codes of the byte in one load
            pair = tl.load(code_ptr + byte)
            hi = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True) * scale
            lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True) * scale
            w = tl.reshape(tl.join(hi, lo), (BLOCK_ROW, BLOCK_COL))
        else:
            mask = (offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols)
            flat = offs_row[:, None].to(tl.int64) * n_cols + offs_col[None, :]
            byte = tl.load(w_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
            nibble = (byte >> (((flat & 1) ^ 1) * 4).to(tl.int32)) & 15
            scale = tl.load(absmax_ptr + flat // blocksize, mask=mask, other=0.0)
            w = tl.load(code_ptr + nibble) * scale
        return w.to(OUT_DTYPE)
    else:
        mask = (offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols)
        ptrs = w_ptr + offs_row[:, None].to(tl.int64) * stride_row + offs_col[None, :].to(tl.int64) * stride_col
        return tl.load(ptrs, mask=mask, other=0.0).to(OUT_DTYPE)


@triton.jit
def _dequantize_4bit_kernel(w_ptr, absmax_ptr, code_ptr, out_ptr, n_rows, n_cols, blocksize,
                            PAIRED: tl.constexpr, BLOCK_ROW: tl.constexpr, BLOCK_COL: tl.constexpr):
    offs_row = tl.program_id(0) * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    col_start = tl.program_id(1) * BLOCK_COL
    offs_col = col_start + tl.arange(0, BLOCK_COL)
    w = load_weight_tile(w_ptr, absmax_ptr, code_ptr, offs_row, col_start, n_rows, n_cols, 0, 0, blocksize,
                         IS_4BIT=True, PAIRED=PAIRED, BLOCK_ROW=BLOCK_ROW, BLOCK_COL=BLOCK_COL,
                         OUT_DTYPE=out_ptr.dtype.element_ty)
    mask = (offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols)
    tl.store(out_ptr + offs_row[:, None].to(tl.int64) * n_cols + offs_col[None, :], w, mask=mask)


def dequantize_into(info: QuantInfo, out: torch.Tensor) -> torch.Tensor:
    """Write the dense (out, in) W of ``info`` into ``out`` (contiguous, that shape, a float dtype)."""
    n_rows, n_cols = info.shape
    if tuple(out.shape) != (n_rows, n_cols) or not out.is_contiguous() or out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"out must be a contiguous float ({n_rows}, {n_cols}) tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    block_row, block_col = (32, 64) if is_interpreter() else (32, 128)
    grid = (triton.cdiv(n_rows, block_row), triton.cdiv(n_cols, block_col))
    paired = n_cols % 2 == 0
    _dequantize_4bit_kernel[grid](info.packed, absmax_fp32(info), info.pairs if paired else info.code, out, n_rows,
                                  n_cols, info.blocksize, PAIRED=paired, BLOCK_ROW=block_row, BLOCK_COL=block_col)
    return out


def dequantize_4bit(packed: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize bitsandbytes 4-bit data to a dense (out, in) tensor with Triton.

    Matches ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)`` (the
    fp32 product code * absmax, cast to ``dtype``, default ``quant_state.dtype``).
    """
    info = cached_quant_info(packed, quant_state)
    dtype = dtype or info.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    out = empty(*info.shape, dtype=dtype, device=info.packed.device)
    return dequantize_into(info, out)
