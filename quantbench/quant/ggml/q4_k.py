"""Q4_K: 256-value super-blocks of eight 32-value sub-blocks, x ~ d*sc*q - dmin*m with 4-bit q
and 6-bit sub-block scales/mins. Also holds the helpers Q5_K shares (same scale packing and
the same two-level affine search).

Block (144 bytes): fp16 d, fp16 dmin, 12 bytes of packed 6-bit (scale, min) pairs, 128 bytes
of nibbles (byte l of chunk c holds q[64c + l] low and q[64c + 32 + l] high).
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import (
    block_weights,
    cdiv,
    fp16_bytes,
    fp16_from_bytes,
    fp16_round,
    nearest_int,
    seq_sum,
    sqrtf,
)
from quantbench.quant.ggml.search_affine import (
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
)
from quantbench.quant.registry import GGMLType, register

QK_K = 256
K_SCALE_SIZE = 12


def running_max_from_zero(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; if (v[j] > m) m = v[j];`` over the last dim."""
    m = torch.zeros(v.shape[:-1], dtype=torch.float32, device=v.device)
    for j in range(v.shape[-1]):
        m = torch.where(v[..., j] > m, v[..., j], m)
    return m


def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight (scale, min) pairs → 12 bytes as the C writer does, including its uint8
    truncations when a value exceeds 6 bits. ``ls``/``lm``: int [B, 8] holding uint8 values."""
    ls = ls.to(torch.int32)
    lm = lm.to(torch.int32)
    lo = torch.cat([ls[:, :4], lm[:, :4]], dim=1)  # bytes 0..7
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)  # bytes 8..11
    lo[:, :4] |= (ls[:, 4:] >> 4) << 6
    lo[:, 4:] |= (lm[:, 4:] >> 4) << 6
    return (torch.cat([lo, hi], dim=1) & 0xFF).to(torch.uint8)


def unpack_scale_min_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for all eight sub-blocks: [B, 12] uint8 → (sc, m) int32 [B, 8]."""
    q = q.to(torch.int32)
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def requantize_affine(
    xb: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, nmax: int
) -> torch.Tensor:
    """Final levels from the stored (fp16-rounded) scales: ``nearest_int((x + dm)/d)`` clamped
    to 0..nmax; sub-blocks whose ``d`` is 0 keep the search's levels (C ``if (!d) continue``).

    ``xb``/``L``: [B, nsub, sub]; ``d``/``dm``: float32 [B, nsub].
    """
    dz = d == 0
    dsafe = torch.where(dz, torch.ones_like(d), d)
    l = nearest_int(cdiv(xb + dm.unsqueeze(-1), dsafe.unsqueeze(-1))).clamp_(0, nmax)
    return torch.where(dz.unsqueeze(-1), L, l)


def quantize_k_affine_32(
    x: torch.Tensor,
    qw: torch.Tensor | None,
    nmax: int,
    ref_search: tuple[float, float, int],
    clamp_impl_levels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K body. Returns (d, dmin) float32 [B], packed scales uint8 [B, 12] and
    levels int32 [B, 256] for the B super-blocks of ``x`` [rows, n_per_row].

    Without ``qw`` this is ``quantize_row_qN_K_ref`` (qkx2 search, scales by max); with it
    ``quantize_row_qN_K_impl`` (qkx3 search with sigma2 weights, scales by ``make_qp_quants``).
    ``clamp_impl_levels``: Q5_K's impl clamps the qp levels to 63, Q4_K's does not.
    """
    rows = x.shape[0]
    xb = x.reshape(-1, QK_K // 32, 32)  # [B, 8, 32]
    B = xb.shape[0]
    groups = xb.reshape(-1, 32)
    if qw is None:
        sum_x2 = seq_sum(groups * groups)
        av_x = sqrtf(cdiv(sum_x2, 32.0))
        weights = av_x.unsqueeze(1) + groups.abs()
        rmin, rdelta, nstep = ref_search
        scales, mins, L = make_qkx2_quants(groups, weights, nmax, rmin, rdelta, nstep, False)
        scales = scales.reshape(B, 8)
        mins = mins.reshape(B, 8)
        max_scale = running_max_from_zero(scales)
        max_min = running_max_from_zero(mins)
        zero = torch.zeros_like(max_scale)
        inv_scale = torch.where(max_scale > 0, cdiv(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, cdiv(63.0, max_min), zero)
        ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp_(max=63)
        lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp_(max=63)
        d = cdiv(max_scale, 63.0)
        dmin = cdiv(max_min, 63.0)
    else:
        flat = xb.reshape(B, QK_K)
        sum_x2 = seq_sum(flat * flat)
        sigma2 = cdiv(2 * sum_x2, float(QK_K))
        qwb = block_weights(qw, rows, QK_K).reshape(B, 8, 32)
        weights = qwb * sqrtf(sigma2.reshape(B, 1, 1) + xb * xb)
        sw = seq_sum(weights)  # [B, 8]
        scales, mins, L = make_qkx3_quants(groups, weights.reshape(-1, 32), nmax, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(scales.reshape(B, 8), sw, 63)
        dmin, lm = make_qp_quants(mins.reshape(B, 8), sw, 63)
        if clamp_impl_levels:
            ls = ls.clamp(max=63)
            lm = lm.clamp(max=63)
    packed = pack_scale_min_k4(ls, lm)
    sc, m = unpack_scale_min_k4(packed)
    dd = fp16_round(d).unsqueeze(1) * sc.to(torch.float32)
    dm = fp16_round(dmin).unsqueeze(1) * m.to(torch.float32)
    L = requantize_affine(xb, L.reshape(B, 8, 32), dd, dm, nmax).reshape(B, QK_K)
    return d, dmin, packed, L


def scales_mins_k4(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block float scale and min [B, 8] of Q4_K/Q5_K blocks (same ops as gguf-py)."""
    d = fp16_from_bytes(blocks[:, 0:2])
    dmin = fp16_from_bytes(blocks[:, 2:4])
    sc, m = unpack_scale_min_k4(blocks[:, 4:16])
    return d * sc.to(torch.float32), dmin * m.to(torch.float32)


def _quantize_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    d, dmin, packed, L = quantize_k_affine_32(x, qw, 15, (-1.0, 0.1, 20), clamp_impl_levels=False)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).to(torch.uint8).reshape(-1, QK_K // 2)
    out = torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1)), packed, qs], dim=1)
    return out.reshape(rows, -1)


def _dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    s, m = scales_mins_k4(b)
    qs = b[:, 16:144].to(torch.int32).reshape(-1, 4, 1, 32)
    q = (qs >> torch.tensor([0, 4], dtype=torch.int32, device=b.device).reshape(1, 1, 2, 1)) & 0xF
    q = q.reshape(-1, 8, 32).to(torch.float32)
    return (s.unsqueeze(-1) * q - m.unsqueeze(-1)).reshape(-1, QK_K)


register(GGMLType("Q4_K", 12, QK_K, 144, _quantize_rows, _dequantize_blocks, uses_imatrix=True))
