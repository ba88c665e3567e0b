"""Q6_K: 256-value super-blocks of 16 groups, 6-bit levels, int8 group scales, fp16 super-scale.

Block layout (210 bytes): ql[128] (level bits 0-3), qh[64] (level bits 4-5), scales[16] (int8),
d (fp16).
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import (
    quantize_block_chunks,
    cdiv,
    first_absmax,
    fp16_bytes,
    fp16_from_bytes,
    fp16_round,
    GROUP_MAX_EPS,
    nearest_int,
)
from quantbench.quant.ggml.search_symmetric import make_qx_quants
from quantbench.quant.registry import GGMLType, register

QK_K = 256
TYPE_SIZE = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2
_CHUNK = 16384  # super-blocks per pass on CPU: bounds temporary memory
_CHUNK_ACCEL = 1 << 17  # on accelerators few, large passes (launch count dominates)


def _quantize_blocks(xb: torch.Tensor, qwb: torch.Tensor | None) -> torch.Tensor:
    """``quantize_row_q6_K_ref`` (qwb None) / ``_impl`` (qwb = raw importance, no sigma2 term)."""
    B = xb.shape[0]
    g = xb.reshape(B * 16, 16)
    scales, L = make_qx_quants(g, 32, 1, None if qwb is None else qwb.reshape(B * 16, 16))
    scales = scales.reshape(B, 16)
    max_scale = first_absmax(scales, 1)
    empty = max_scale.abs() < GROUP_MAX_EPS  # C zeroes the whole block

    iscale = cdiv(-128.0, max_scale)
    d = cdiv(1.0, iscale)
    # C stores MIN(127, v) into int8 (|v| <= 128 in practice; the cast wraps like C's would)
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp_(max=127).to(torch.int8)
    dq = fp16_round(d).unsqueeze(1) * sc.to(torch.float32)  # [B, 16]
    lq = nearest_int(xb.reshape(B, 16, 16) / dq.unsqueeze(2)).clamp_(-32, 31) + 32
    L = torch.where((dq != 0).unsqueeze(2), lq, L.reshape(B, 16, 16)).reshape(B, 2, 4, 32)

    lo = L & 0xF
    hi = L >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)  # [B, 2, 64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [B, 2, 32]
    out = torch.cat(
        [
            ql.reshape(B, 128).to(torch.uint8),
            qh.reshape(B, 64).to(torch.uint8),
            sc.view(torch.uint8),
            fp16_bytes(d.unsqueeze(1)),
        ],
        dim=1,
    )
    return torch.where(empty.unsqueeze(1), torch.zeros_like(out), out)


def quantize_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    return quantize_block_chunks(x, qw, QK_K, _quantize_blocks, _CHUNK, _CHUNK_ACCEL)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    B = b.shape[0]
    ql = b[:, :128].to(torch.int32).reshape(B, 2, 2, 32)  # [B, half, 0|1 (l or l+32), l]
    qh = b[:, 128:192].to(torch.int32).reshape(B, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = fp16_from_bytes(b[:, 208:210]).reshape(B, 1)
    lo = torch.cat([ql & 0xF, ql >> 4], dim=2)  # k = 0,1 from low nibbles, 2,3 from high
    hi = (qh >> torch.arange(0, 8, 2, device=b.device, dtype=torch.int32).view(1, 1, 4, 1)) & 3
    q = ((lo | (hi << 4)) - 32).to(torch.float32).reshape(B, 16, 16)
    return ((d * sc).unsqueeze(2) * q).reshape(B, QK_K)


register(GGMLType("Q6_K", 14, QK_K, TYPE_SIZE, quantize_rows, dequantize_blocks, uses_imatrix=True))
