"""GGML's MXFP4 (OCP microscaling FP4): 32 E2M1 values sharing one E8M0 power-of-two scale.

llama.cpp ignores the importance matrix here (``quantize_mxfp4`` → ``quantize_row_mxfp4_ref``):
the exponent is ``floorf(log2f(amax)) - 2 + 127`` and every element takes the first nearest
of the doubled E2M1 levels ``kvalues_mxfp4`` times half the E8M0 scale.
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import pack_nibbles
from quantbench.quant.registry import GGMLType, register

QK_MXFP4 = 32
KVALUES_MXFP4: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
_CHUNK_BLOCKS_CPU = 4096  # on CPU, cache-sized temporaries are much faster than fresh large ones


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """``ggml_e8m0_to_fp32_half``: 2^(e-128) built from bits, subnormal patterns for e < 2."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _log2f(a: torch.Tensor) -> torch.Tensor:
    """glibc ``log2f``: the float32 rounding of log2, computed in double then rounded once.

    Only ``floor`` of it matters; what decides bytes is whether floats just below 2^k round up to
    k. glibc's log2f is correctly rounded there, and so is the double computation (checked
    exhaustively near every power of two against the oracle in the tests).
    """
    return torch.log2(a.to(torch.float64)).to(torch.float32)


def shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 byte ``amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0`` as int32.

    The float→uint8 cast of a negative value (amax < 2^-125) is done by x86 as a truncation to
    int32 and keeping the low byte, which is what the oracle build does, e.g. 2^-149 → 232.
    """
    pos = amax > 0
    safe = torch.where(pos, amax, torch.ones_like(amax))
    v = torch.floor(_log2f(safe)) - 2 + 127
    e = torch.trunc(v).to(torch.int32) & 0xFF
    return torch.where(pos, e, torch.zeros_like(e))


def _best_index(xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``best_index_mxfp4``: first index of the smallest ``fabsf(kv*d - x)``, per element.

    Levels 8..15 mirror 0..7 and ``fabsf(-k*d - x) == fabsf(k*d - |x|)`` bit for bit when x < 0,
    so the search runs on ``|x|`` over the non-negative levels 0..7. For x < 0 the mirrored index
    is taken, except level 0, which ties with index 8 and wins by coming first (levels 1..7 cost
    ``k*d + |x|``, more than level 0's ``|x|``).

    Over the sorted levels ``fabsf(k*d - |x|)`` falls then rises (float rounding is monotone), so
    the first minimum is the largest level ``<= |x|`` or the next one, the lower on a tie. With
    d a power of two, ``k*d <= |x|`` iff ``k <= |x|/d``: the quotient is exact unless it is
    subnormal, and then it is far below level 1 anyway.
    """
    out = torch.empty(xb.shape, dtype=torch.uint8, device=xb.device)
    chunk = _CHUNK_BLOCKS_CPU if xb.device.type == "cpu" else xb.shape[0]
    for s in range(0, xb.shape[0], chunk):
        e = min(xb.shape[0], s + chunk)
        out[s:e] = _best_index_chunk(xb[s:e], d[s:e])
    return out


def _best_index_chunk(xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    lo_idx, lo_lvl, hi_lvl = _get_tables(xb.device)
    ax = xb.abs()
    dd = d.unsqueeze(1)
    slot = torch.floor(torch.clamp(ax / dd, max=12.0)).to(torch.int32).view(-1)
    lo_v = lo_lvl.index_select(0, slot).view_as(ax)
    hi_v = hi_lvl.index_select(0, slot).view_as(ax)
    take_hi = (lo_v * dd - ax).abs_() > (hi_v * dd - ax).abs_()
    i = lo_idx.index_select(0, slot).view_as(ax) + take_hi.to(torch.uint8)
    return torch.where((xb < 0) & (i > 0), i + 8, i)


_TABLE_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _get_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``slot = floor(min(|x|/d, 12))``: index and value of the largest level <= slot, and the
    next level's value (the same level at the top, so a tie keeps it)."""
    if device not in _TABLE_CACHE:
        pos = KVALUES_MXFP4[:8]
        lo = [max(i for i, v in enumerate(pos) if v <= s) for s in range(13)]
        hi = [min(i + 1, 7) for i in lo]
        _TABLE_CACHE[device] = (
            torch.tensor(lo, dtype=torch.uint8, device=device),
            torch.tensor([pos[i] for i in lo], dtype=torch.float32, device=device),
            torch.tensor([pos[i] for i in hi], dtype=torch.float32, device=device),
        )
    return _TABLE_CACHE[device]


def _mxfp4_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    xb = x.reshape(-1, QK_MXFP4)
    e = shared_exponent(xb.abs().amax(dim=1))
    d = e8m0_to_fp32_half(e)
    idx = _best_index(xb, d)
    qs = pack_nibbles(idx[:, :16], idx[:, 16:])
    out = torch.cat([e.to(torch.uint8).unsqueeze(1), qs], dim=1)
    return out.reshape(rows, -1)


def _mxfp4_dequant(b: torch.Tensor) -> torch.Tensor:
    d = e8m0_to_fp32_half(b[:, :1])
    q = b[:, 1:].to(torch.int64)
    idx = torch.cat([q & 0x0F, q >> 4], dim=1)
    kv = torch.tensor(KVALUES_MXFP4, dtype=torch.float32, device=b.device)
    return d * kv[idx]


register(GGMLType("MXFP4", 39, QK_MXFP4, 1 + QK_MXFP4 // 2, _mxfp4_rows, _mxfp4_dequant))
