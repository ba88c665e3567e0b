"""GGML's legacy 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.

Without an importance matrix llama.cpp uses the ``quantize_row_*_ref`` rounding (a fixed scale
from the block's extreme value); with one, Q4_0/Q5_0 search a symmetric scale with
``make_qx_quants`` and Q4_1/Q5_1 an affine one with ``make_qkx3_quants``, weighting each
element by ``qw * sqrt(sigma2 + x^2)`` where ``sigma2`` is the mean square of the whole row.
Q8_0 and Q8_1 never use the importance matrix.
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import (
    bits_to_u32_le,
    cdiv,
    c_int_cast,
    fp16_bytes,
    first_absmax,
    fp16_from_bytes,
    pack_nibbles,
    roundf,
    seq_sum,
    sqrtf,
    u32_le_to_bits,
)
from quantbench.quant.ggml.search_affine import make_qkx3_quants
from quantbench.quant.ggml.search_symmetric import make_qx_quants
from quantbench.quant.registry import GGMLType, register

QK = 32


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, QK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    safe = torch.where(d != 0, d, torch.ones_like(d))
    return torch.where(d != 0, cdiv(1.0, safe), torch.zeros_like(d))


def _row_weights(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Per-element weights ``qw[j] * sqrtf(sigma2 + x[j]^2)`` with the row's ``sigma2``, as blocks."""
    rows, n = x.shape
    sigma2 = cdiv(seq_sum(x * x), float(n))
    w = qw.unsqueeze(0) * sqrtf(sigma2.unsqueeze(1) + x * x)
    return _blocks(w)


def _qh_bytes(levels: torch.Tensor) -> torch.Tensor:
    """Fifth bits of 32 levels as a little-endian uint32 (element j → bit j)."""
    return bits_to_u32_le((levels >> 4) & 1)


def _lo_hi_nibbles(levels: torch.Tensor) -> torch.Tensor:
    return pack_nibbles(levels[:, :16] & 0x0F, levels[:, 16:] & 0x0F)


# ---- quantizers -------------------------------------------------------------------------------


def _symmetric(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (nmax 8) / Q5_0 (nmax 16): scale and levels 0..2*nmax-1, by the ref rule or the imatrix search."""
    xb = _blocks(x)
    if qw is None:
        d = cdiv(first_absmax(xb, 1), -float(nmax))
        levels = torch.clamp(c_int_cast(xb * _inverse(d).unsqueeze(1) + (nmax + 0.5)), max=2 * nmax - 1)
        return d, levels
    return make_qx_quants(xb, nmax, rmse_type=1, qw=_row_weights(x, qw))


def _q4_0_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, levels = _symmetric(x, qw, 8)
    out = torch.cat([fp16_bytes(d.unsqueeze(1)), _lo_hi_nibbles(levels)], dim=1)
    return out.reshape(x.shape[0], -1)


def _affine_ref(xb: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mn = xb.amin(dim=1)
    mx = xb.amax(dim=1)
    d = cdiv(mx - mn, float(nmax))
    levels = c_int_cast((xb - mn.unsqueeze(1)) * _inverse(d).unsqueeze(1) + 0.5)
    return d, mn, levels


def _affine_imatrix(x: torch.Tensor, qw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, the_min, levels = make_qkx3_quants(
        _blocks(x), _row_weights(x, qw), nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False
    )
    return d, -the_min, levels


def _q4_1_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    if qw is None:
        d, m, levels = _affine_ref(_blocks(x), 15)
        levels = torch.clamp(levels, max=15)
    else:
        d, m, levels = _affine_imatrix(x, qw, 15)
    out = torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(m.unsqueeze(1)), _lo_hi_nibbles(levels)], dim=1)
    return out.reshape(rows, -1)


def _q5_0_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, levels = _symmetric(x, qw, 16)
    out = torch.cat([fp16_bytes(d.unsqueeze(1)), _qh_bytes(levels), _lo_hi_nibbles(levels)], dim=1)
    return out.reshape(x.shape[0], -1)


def _q5_1_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    if qw is None:
        d, m, levels = _affine_ref(_blocks(x), 31)
    else:
        d, m, levels = _affine_imatrix(x, qw, 31)
    out = torch.cat(
        [fp16_bytes(d.unsqueeze(1)), fp16_bytes(m.unsqueeze(1)), _qh_bytes(levels), _lo_hi_nibbles(levels)], dim=1
    )
    return out.reshape(rows, -1)


def _q8_scale(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = cdiv(xb.abs().amax(dim=1), 127.0)
    q = roundf(xb * _inverse(d).unsqueeze(1)).to(torch.int8)
    return d, q


def _q8_0_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    d, q = _q8_scale(_blocks(x))
    return torch.cat([fp16_bytes(d.unsqueeze(1)), q.view(torch.uint8)], dim=1).reshape(rows, -1)


def _q8_1_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    d, q = _q8_scale(_blocks(x))
    s = q.to(torch.int32).sum(dim=1).to(torch.float32) * d
    return torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(s.unsqueeze(1)), q.view(torch.uint8)], dim=1).reshape(
        rows, -1
    )


# ---- dequantizers -----------------------------------------------------------------------------


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32)
    return torch.cat([q & 0x0F, q >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    return u32_le_to_bits(qh) << 4


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    return (_nibbles(b[:, 2:18]) - 8).to(torch.float32) * d


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = fp16_from_bytes(b[:, 0:2]), fp16_from_bytes(b[:, 2:4])
    return _nibbles(b[:, 4:20]).to(torch.float32) * d + m


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    q = _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6])
    return (q - 16).to(torch.float32) * d


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = fp16_from_bytes(b[:, 0:2]), fp16_from_bytes(b[:, 2:4])
    q = _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8])
    return q.to(torch.float32) * d + m


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    return b[:, 2:34].contiguous().view(torch.int8).to(torch.float32) * d


def _dq_q8_1(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    return b[:, 4:36].contiguous().view(torch.int8).to(torch.float32) * d


register(GGMLType("Q4_0", 2, QK, 18, _q4_0_rows, _dq_q4_0, uses_imatrix=True))
register(GGMLType("Q4_1", 3, QK, 20, _q4_1_rows, _dq_q4_1, uses_imatrix=True))
register(GGMLType("Q5_0", 6, QK, 22, _q5_0_rows, _dq_q5_0, uses_imatrix=True))
register(GGMLType("Q5_1", 7, QK, 24, _q5_1_rows, _dq_q5_1, uses_imatrix=True))
register(GGMLType("Q8_0", 8, QK, 34, _q8_0_rows, _dq_q8_0))
register(GGMLType("Q8_1", 9, QK, 36, _q8_1_rows, _dq_q8_1))
