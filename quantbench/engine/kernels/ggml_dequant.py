"""Triton kernels that unpack GGML rows straight to the compute dtype, and a fused decode GEMV.

Why: the torch reference (:func:`quantbench.quant.dequantize`) unpacks a weight in a dozen
full-size passes through int32/float32 temporaries, one launch each, for every layer of every
token. Here one launch reads the packed bytes once and writes the bf16/f16/f32 weight once.

Every kernel computes each value with the reference's float32 operations in the reference's
order (same fp16→f32 scale conversion, same products, no FMA contraction), then rounds once to
the output dtype, so the float32 output equals the reference bit for bit and the bf16/f16 output
equals ``reference.to(dtype)``.

Layout of the work: a weight is ``rows`` rows of ``n_tiles`` tiles; a tile is ``A x B`` values
whose scale varies along ``A`` only. For 256-value super-block types a tile is one super-block
(``A`` = its sub-blocks: 8 x 32 or 16 x 16); for 32-value block types a tile is ``A`` whole blocks
of ``B = 32``. One program handles ``BR`` rows of one tile (dequantize) or ``BR`` rows of a run of
tiles (GEMV). Byte offsets are computed per value; neighbouring values read neighbouring bytes,
so loads coalesce and repeated bytes come from L1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantbench.quant.ggml.iq4 import KVALUES_IQ4NL
from quantbench.quant.ggml.mxfp4 import KVALUES_MXFP4


@dataclass(frozen=True)
class KernelType:
    """How a GGML type's tiles are cut: ``code`` selects the unpacking branch at compile time."""

    code: int
    block_size: int  # values per GGML block
    type_size: int  # bytes per GGML block
    sub_a: int  # tile rows for super-block types (sub-blocks); 0: blocks-per-tile chosen per weight
    sub_b: int  # values per tile row
    table: tuple[int, ...] | None = None  # non-linear level table (IQ4, MXFP4)


TYPES: dict[str, KernelType] = {
    "Q4_0": KernelType(0, 32, 18, 0, 32),
    "Q4_1": KernelType(1, 32, 20, 0, 32),
    "Q5_0": KernelType(2, 32, 22, 0, 32),
    "Q5_1": KernelType(3, 32, 24, 0, 32),
    "Q8_0": KernelType(4, 32, 34, 0, 32),
    "IQ4_NL": KernelType(5, 32, 18, 0, 32, KVALUES_IQ4NL),
    "MXFP4": KernelType(6, 32, 17, 0, 32, KVALUES_MXFP4),
    "Q2_K": KernelType(7, 256, 84, 16, 16),
    "Q3_K": KernelType(8, 256, 110, 16, 16),
    "Q4_K": KernelType(9, 256, 144, 8, 32),
    "Q5_K": KernelType(10, 256, 176, 8, 32),
    "Q6_K": KernelType(11, 256, 210, 16, 16),
    "IQ4_XS": KernelType(12, 256, 136, 8, 32, KVALUES_IQ4NL),
}


# ---- byte helpers --------------------------------------------------------------------------


@triton.jit
def _u8(src, off, mask):
    return tl.load(src + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(src, off, mask):
    """Little-endian fp16 at byte ``off``, as float32 (exact, as ``view(float16).float()``)."""
    h = _u8(src, off, mask) | (_u8(src, off + 1, mask) << 8)
    return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(src, off, b, mask):
    """Value ``b`` (0..31) of a 16-byte run at ``off``: low nibbles are values 0..15, high 16..31."""
    return (_u8(src, off + (b % 16), mask) >> (4 * (b // 16))) & 15


# ---- one tile: float32 [BR, A, B] ----------------------------------------------------------


@triton.jit
def _tile(src, kv, row_off, t, mask, CODE: tl.constexpr, TS: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
    """Tile ``t`` of the rows starting at byte ``row_off`` ([BR, 1, 1] int64), as float32.

    Each branch repeats its type's reference dequantizer (``quantbench/quant/ggml/*.py``)
    operation for operation; the comments give the value index ``i`` inside a block.
    """
    a = tl.arange(0, A)[None, :, None]
    b = tl.arange(0, B)[None, None, :]
    if CODE <= 6:
        # 32-value blocks; tile row a is block t*A + a, b its value index.
        blk = row_off + (t * A + a) * TS  # < row_bytes: int32 is enough
        if CODE == 0:  # Q4_0: d, 16 nibble bytes
            q = _nibble(src, blk + 2, b, mask)
            v = (q - 8).to(tl.float32) * _f16(src, blk, mask)
        elif CODE == 1:  # Q4_1: d, m, 16 nibble bytes
            q = _nibble(src, blk + 4, b, mask)
            v = q.to(tl.float32) * _f16(src, blk, mask) + _f16(src, blk + 2, mask)
        elif CODE == 2:  # Q5_0: d, 32 fifth bits (u32 LE), nibbles
            hb = (_u8(src, blk + 2 + b // 8, mask) >> (b % 8)) & 1
            q = _nibble(src, blk + 6, b, mask) | (hb << 4)
            v = (q - 16).to(tl.float32) * _f16(src, blk, mask)
        elif CODE == 3:  # Q5_1: d, m, fifth bits, nibbles
            hb = (_u8(src, blk + 4 + b // 8, mask) >> (b % 8)) & 1
            q = _nibble(src, blk + 8, b, mask) | (hb << 4)
            v = q.to(tl.float32) * _f16(src, blk, mask) + _f16(src, blk + 2, mask)
        elif CODE == 4:  # Q8_0: d, 32 int8
            q = _u8(src, blk + 2 + b, mask)
            q = q - ((q & 128) << 1)
            v = q.to(tl.float32) * _f16(src, blk, mask)
        elif CODE == 5:  # IQ4_NL: d, 16 bytes of indices into kvalues_iq4nl
            v = _f16(src, blk, mask) * tl.load(kv + _nibble(src, blk + 2, b, mask))
        else:  # MXFP4: E8M0 byte, 16 bytes of E2M1 indices; d = ggml_e8m0_to_fp32_half
            e = _u8(src, blk, mask)
            bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
            v = bits.to(tl.float32, bitcast=True) * tl.load(kv + _nibble(src, blk + 1, b, mask))
    else:
        sb = row_off + t * TS  # super-block start
        if CODE == 7:  # Q2_K: scales[16], qs[64], d, dmin; i = 16a + b = 128h + 32k + l
            sc = _u8(src, sb + a, mask)
            dl = _f16(src, sb + 80, mask) * (sc & 15).to(tl.float32)
            ml = _f16(src, sb + 82, mask) * (sc >> 4).to(tl.float32)
            h = a // 8
            k = (a % 8) // 2
            l = (a % 2) * 16 + b
            q = (_u8(src, sb + 16 + h * 32 + l, mask) >> (2 * k)) & 3
            v = dl * q.to(tl.float32) - ml
        elif CODE == 8:  # Q3_K: hmask[32], qs[64], scales[12], d; i = 16a + b
            h = a // 8
            k = (a % 8) // 2
            l = (a % 2) * 16 + b
            low = (_u8(src, sb + 32 + h * 32 + l, mask) >> (2 * k)) & 3
            hb = (_u8(src, sb + l, mask) >> (a // 2)) & 1
            q = low - 4 * (1 - hb)
            lo = (_u8(src, sb + 96 + a % 8, mask) >> (4 * (a // 8))) & 15
            hi = (_u8(src, sb + 104 + a % 4, mask) >> (2 * (a // 4))) & 3
            dl = _f16(src, sb + 108, mask) * ((lo | (hi << 4)) - 32).to(tl.float32)
            v = dl * q.to(tl.float32)
        elif CODE == 9 or CODE == 10 or CODE == 12:  # eight 32-value sub-blocks a
            if CODE == 12:  # IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]
                sh = _u8(src, sb + 2, mask) | (_u8(src, sb + 3, mask) << 8)
                lo = (_u8(src, sb + 4 + a // 2, mask) >> (4 * (a % 2))) & 15
                hi = (sh >> (2 * a)) & 3
                dl = _f16(src, sb, mask) * ((lo | (hi << 4)) - 32).to(tl.float32)
                v = dl * tl.load(kv + _nibble(src, sb + 8 + 16 * a, b, mask))
            else:  # Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit (scale, min), ...
                x0 = _u8(src, sb + 4 + a, mask)  # byte a
                x1 = _u8(src, sb + 8 + a, mask)  # byte a + 4
                x2 = _u8(src, sb + 4 + (a + 4) % 8, mask)  # byte a - 4 where a >= 4
                sc = tl.where(a < 4, x0 & 63, (x1 & 15) | ((x2 >> 6) << 4))
                mn = tl.where(a < 4, x1 & 63, (x1 >> 4) | ((x0 >> 6) << 4))
                s = _f16(src, sb, mask) * sc.to(tl.float32)
                m = _f16(src, sb + 2, mask) * mn.to(tl.float32)
                if CODE == 9:  # Q4_K: qs[128]; byte 32c + l holds i = 64c + l low, 64c + 32 + l high
                    q = (_u8(src, sb + 16 + 32 * (a // 2) + b, mask) >> (4 * (a % 2))) & 15
                else:  # Q5_K: qh[32] (bit a of byte l), then qs[128] as Q4_K
                    lo4 = (_u8(src, sb + 48 + 32 * (a // 2) + b, mask) >> (4 * (a % 2))) & 15
                    q = lo4 | (((_u8(src, sb + 16 + b, mask) >> a) & 1) << 4)
                v = s * q.to(tl.float32) - m
        else:  # Q6_K: ql[128], qh[64], scales[16] int8, d; i = 16a + b = 128h + 32k + l
            h = a // 8
            k = (a % 8) // 2
            l = (a % 2) * 16 + b
            lo = (_u8(src, sb + h * 64 + (k % 2) * 32 + l, mask) >> (4 * (k // 2))) & 15
            hi = (_u8(src, sb + 128 + h * 32 + l, mask) >> (2 * k)) & 3
            q = (lo | (hi << 4)) - 32
            sc = _u8(src, sb + 192 + a, mask)
            sc = sc - ((sc & 128) << 1)
            v = (_f16(src, sb + 208, mask) * sc.to(tl.float32)) * q.to(tl.float32)
    return v


@triton.jit
def _dequant_kernel(src, out, kv, rows, row_bytes, K, CODE: tl.constexpr, TS: tl.constexpr,
                    A: tl.constexpr, B: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None, None]
    t = tl.program_id(1)
    mask = r < rows
    r64 = r.to(tl.int64)
    v = _tile(src, kv, r64 * row_bytes, t, mask, CODE, TS, A, B)
    col = t * (A * B) + tl.arange(0, A)[None, :, None] * B + tl.arange(0, B)[None, None, :]
    tl.store(out + r64 * K + col, v.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(src, x, y, bias, kv, rows, row_bytes, n_tiles, CODE: tl.constexpr, TS: tl.constexpr,
                 A: tl.constexpr, B: tl.constexpr, BR: tl.constexpr, SPLIT: tl.constexpr,
                 UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y[r] = sum_k W[r, k] x[k]`` (+ bias) for one input vector, float32 accumulation.

    Program ``(i, s)`` sums tiles ``s, s + SPLIT, ...``; with ``SPLIT > 1`` it writes float32
    partials ``y[s, r]`` that the caller adds up. ``UNROLL`` tiles are issued per loop step so that
    their loads are in flight together (a decode GEMV is bound by memory latency, not arithmetic).
    """
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None, None]
    s = tl.program_id(1)
    mask = r < rows
    row_off = r.to(tl.int64) * row_bytes
    col = tl.arange(0, A)[None, :, None] * B + tl.arange(0, B)[None, None, :]
    acc = tl.zeros((BR, A, B), dtype=tl.float32)
    for t0 in range(s, n_tiles, SPLIT * UNROLL):
        for u in tl.static_range(UNROLL):
            t = t0 + u * SPLIT
            ok = (tl.zeros((1, 1, 1), dtype=tl.int32) + t) < n_tiles  # a tensor also when interpreted
            w = _tile(src, kv, row_off, t, mask & ok, CODE, TS, A, B)
            xv = tl.load(x + t * (A * B) + col, mask=ok, other=0).to(tl.float32)
            acc += w * xv
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    if HAS_BIAS:
        out += tl.load(bias + rr, mask=rr < rows, other=0).to(tl.float32)
    tl.store(y + s.to(tl.int64) * rows + rr, out.to(y.dtype.element_ty), mask=rr < rows)


# ---- launchers ----------------------------------------------------------------------------

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, kt: KernelType, device: torch.device) -> torch.Tensor:
    """The level table as float32 on ``device`` (a 1-element dummy for linear types), made once."""
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        t = torch.tensor(kt.table if kt.table is not None else (0,), dtype=torch.float32, device=device)
        _TABLES[key] = t
    return t


def _blocks_per_tile(n_blocks: int) -> int:
    """Largest of 8, 4, 2, 1 dividing a row's block count (tiles must not straddle rows)."""
    for nb in (8, 4, 2):
        if n_blocks % nb == 0:
            return nb
    return 1


def tile_shape(kt: KernelType, k: int) -> tuple[int, int]:
    if kt.sub_a:
        return kt.sub_a, kt.sub_b
    return _blocks_per_tile(k // kt.block_size), kt.sub_b


@dataclass(frozen=True)
class Plan:
    """What a launch needs to know about one packed weight, worked out once per weight."""

    name: str
    kt: KernelType
    rows: int
    row_bytes: int
    k: int
    a: int
    b: int
    n_tiles: int


def plan(name: str, rows: int, k: int) -> Plan:
    kt = TYPES[name]
    a, b = tile_shape(kt, k)
    return Plan(name, kt, rows, k // kt.block_size * kt.type_size, k, a, b, k // (a * b) if k else 0)


def run_dequant(p: Plan, data: torch.Tensor, table: torch.Tensor, dtype: torch.dtype, rows_per_program: int = 16,
                num_warps: int = 4) -> torch.Tensor:
    """[rows, k] ``dtype`` from contiguous packed ``data`` laid out as ``p`` says."""
    out = torch.empty((p.rows, p.k), dtype=dtype, device=data.device)
    if p.rows == 0 or p.k == 0:
        return out
    kt = p.kt
    grid = (triton.cdiv(p.rows, rows_per_program), p.n_tiles)
    _dequant_kernel[grid](data, out, table, p.rows, p.row_bytes, p.k, CODE=kt.code, TS=kt.type_size, A=p.a,
                          B=p.b, BR=rows_per_program, num_warps=num_warps, enable_fp_fusion=False)
    return out


def run_gemv(p: Plan, data: torch.Tensor, table: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
             rows_per_program: int, split: int, num_warps: int = 4, unroll: int = 1) -> torch.Tensor:
    """``W @ x`` (+ bias) for packed ``W`` and contiguous ``x`` [k]: [rows] in ``x``'s dtype.

    float32 accumulation; FMA contraction is allowed here (a matrix product, not a bit-exact
    dequantization). With ``split > 1`` the K-slices' float32 partials are added up by torch.
    """
    kt = p.kt
    split = max(1, min(split, p.n_tiles))
    grid = (triton.cdiv(p.rows, rows_per_program), split)
    if split == 1:
        y = torch.empty(p.rows, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((split, p.rows), dtype=torch.float32, device=x.device)
    has_bias = bias is not None and split == 1
    _gemv_kernel[grid](data, x, y, bias if has_bias else y, table, p.rows, p.row_bytes, p.n_tiles, CODE=kt.code,
                       TS=kt.type_size, A=p.a, B=p.b, BR=rows_per_program, SPLIT=split, UNROLL=unroll,
                       HAS_BIAS=has_bias, num_warps=num_warps)
    if split == 1:
        return y
    out = y.sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def dequantize_rows(name: str, data: torch.Tensor, k: int, dtype: torch.dtype, rows_per_program: int = 16,
                    num_warps: int = 4) -> torch.Tensor:
    """``data`` uint8 [rows, row_bytes] (contiguous) of GGML type ``name`` → [rows, k] in ``dtype``."""
    return run_dequant(plan(name, data.shape[0], k), data, _table(name, TYPES[name], data.device), dtype,
                       rows_per_program, num_warps)


def gemv_rows(name: str, data: torch.Tensor, k: int, x: torch.Tensor, bias: torch.Tensor | None,
              rows_per_program: int, split: int, num_warps: int = 4, unroll: int = 1) -> torch.Tensor:
    """:func:`run_gemv` for ``data`` uint8 [rows, row_bytes] (contiguous) of GGML type ``name``."""
    return run_gemv(plan(name, data.shape[0], k), data, _table(name, TYPES[name], data.device), x, bias,
                    rows_per_program, split, num_warps, unroll)
