"""Q2_K: 256-value super-blocks of sixteen 16-value sub-blocks, x ~ d*sc*q - dmin*m with 2-bit q
and 4-bit sub-block scale/min pairs.

Block (84 bytes): 16 bytes ``scale | min << 4``, 64 bytes of 2-bit levels (byte l of half h
holds levels h*128 + 32k + l at bits 2k), fp16 d, fp16 dmin.
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
    sqrtf,
)
from quantbench.quant.ggml.q4_k import QK_K, requantize_affine, running_max_from_zero, seq_sum
from quantbench.quant.ggml.search_affine import make_qkx2_quants, make_qkx3_quants, make_qp_quants
from quantbench.quant.registry import GGMLType, register

_NSUB = QK_K // 16


def _quantize_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    xb = x.reshape(-1, _NSUB, 16)  # [B, 16, 16]
    B = xb.shape[0]
    groups = xb.reshape(-1, 16)
    if qw is None:
        # quantize_row_q2_K_ref: |x| weights, MAD search, scales/mins by their maxima.
        scales, mins, L = make_qkx2_quants(groups, groups.abs(), 3, -0.5, 0.1, 15, True)
        scales = scales.reshape(B, _NSUB)
        mins = mins.reshape(B, _NSUB)
        max_scale = running_max_from_zero(scales)
        max_min = running_max_from_zero(mins)
        zero = torch.zeros_like(max_scale)
        has_s = max_scale > 0
        has_m = max_min > 0
        one = torch.ones_like(max_scale)
        ls = nearest_int(cdiv(15.0, torch.where(has_s, max_scale, one)).unsqueeze(1) * scales)
        lm = nearest_int(cdiv(15.0, torch.where(has_m, max_min, one)).unsqueeze(1) * mins)
        ls = torch.where(has_s.unsqueeze(1), ls & 0xFF, torch.zeros_like(ls))
        lm = torch.where(has_m.unsqueeze(1), lm, torch.zeros_like(lm))
        sc = (ls | (lm << 4)) & 0xFF
        d = torch.where(has_s, cdiv(max_scale, 15.0), zero)
        dmin = torch.where(has_m, cdiv(max_min, 15.0), zero)
    else:
        # quantize_row_q2_K_impl: sigma2-weighted qkx3 search, scales/mins by make_qp_quants.
        flat = xb.reshape(B, QK_K)
        sigma2 = cdiv(seq_sum(flat * flat), float(QK_K))
        qwb = block_weights(qw, rows, QK_K).reshape(B, _NSUB, 16)
        weights = qwb * sqrtf(sigma2.reshape(B, 1, 1) + xb * xb)
        sw = seq_sum(weights)  # [B, 16]
        scales, mins, L = make_qkx3_quants(groups, weights.reshape(-1, 16), 3, -0.9, 0.05, 36, False)
        d, Ls = make_qp_quants(scales.reshape(B, _NSUB), sw, 15)
        dmin, Lm = make_qp_quants(mins.reshape(B, _NSUB), sw, 15)
        sc = (Ls | (Lm << 4)) & 0xFF
    dd = fp16_round(d).unsqueeze(1) * (sc & 0xF).to(torch.float32)
    dm = fp16_round(dmin).unsqueeze(1) * (sc >> 4).to(torch.float32)
    L = requantize_affine(xb, L.reshape(B, _NSUB, 16), dd, dm, 3).reshape(B, 2, 4, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).to(torch.uint8)
    out = torch.cat(
        [sc.to(torch.uint8), qs.reshape(B, QK_K // 4), fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1))],
        dim=1,
    )
    return out.reshape(rows, -1)


def _dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    sc = b[:, :16].to(torch.int32)
    d = fp16_from_bytes(b[:, 80:82])
    dmin = fp16_from_bytes(b[:, 82:84])
    dl = d * (sc & 0xF).to(torch.float32)  # [B, 16]
    ml = dmin * (sc >> 4).to(torch.float32)
    qs = b[:, 16:80].to(torch.int32).reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(-1, 16, 16).to(torch.float32)
    return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(-1, QK_K)


register(GGMLType("Q2_K", 10, QK_K, 84, _quantize_rows, _dequantize_blocks, uses_imatrix=True))
