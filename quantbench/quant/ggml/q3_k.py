"""Q3_K: 256-value super-blocks of 16 groups, 3-bit levels, 6-bit group scales, fp16 super-scale.

Block layout (110 bytes): hmask[32] (level bit 2), qs[64] (level bits 0-1), scales[12]
(16 six-bit scales, low nibbles then 2-bit high parts), d (fp16).
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
    nearest_int,
    seq_sum,
    sqrtf,
)
from quantbench.quant.ggml.search_symmetric import make_q3_quants, make_qx_quants
from quantbench.quant.registry import GGMLType, register

QK_K = 256
TYPE_SIZE = QK_K // 8 + QK_K // 4 + 12 + 2
_CHUNK = 16384  # super-blocks per pass on CPU: bounds temporary memory
_CHUNK_ACCEL = 1 << 17  # on accelerators few, large passes (launch count dominates)


def _pack_scales(ls: torch.Tensor) -> torch.Tensor:
    """[B, 16] six-bit ints (0..63) → [B, 12] bytes in Q3_K's scale layout."""
    lo = ls & 0xF
    hi = ls >> 4
    out = torch.empty(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    out[:, :8] = lo[:, :8] | (lo[:, 8:] << 4)
    h = hi.reshape(-1, 4, 4)  # [B, j//4, j%4]
    out[:, 8:] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return out.to(torch.uint8)


def _unpack_scales(b: torch.Tensor) -> torch.Tensor:
    """[B, 12] bytes → [B, 16] int32 six-bit values (0..63, before the -32 offset)."""
    b = b.to(torch.int32)
    lo = torch.cat([b[:, :8] & 0xF, b[:, :8] >> 4], dim=1)
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.int32)
    hi = ((b[:, 8:12].unsqueeze(1) >> shifts.view(1, 4, 1)) & 3).reshape(-1, 16)
    return lo | (hi << 4)


def _requantize_and_pack(
    xb: torch.Tensor, L: torch.Tensor, ls: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """Final pass shared by both paths: levels from the stored (fp16) scales, then pack bytes.

    ``L`` are the search's levels, kept for groups whose effective scale is zero (as in C).
    """
    B = xb.shape[0]
    dq = fp16_round(d).unsqueeze(1) * (ls - 32).to(torch.float32)  # [B, 16]
    g = xb.reshape(B, 16, 16)
    lq = nearest_int(g / dq.unsqueeze(2)).clamp_(-4, 3) + 4
    L = torch.where((dq != 0).unsqueeze(2), lq, L.reshape(B, 16, 16)).reshape(B, QK_K)

    hbit = (L > 3).to(torch.int32)
    L = L - 4 * hbit
    hb = hbit.reshape(B, 8, 32)
    bitw = (1 << torch.arange(8, device=xb.device, dtype=torch.int32)).view(1, 8, 1)
    hmask = (hb * bitw).sum(1)  # distinct bits: the sum is an OR
    q = L.reshape(B, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(B, 64)
    return torch.cat(
        [hmask.to(torch.uint8), qs.to(torch.uint8), _pack_scales(ls), fp16_bytes(d.unsqueeze(1))], dim=1
    )


def _quantize_ref(xb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    scales, L = make_q3_quants(xb.reshape(B * 16, 16), 4, True)
    scales = scales.reshape(B, 16)
    max_scale = first_absmax(scales, 1)
    has = max_scale != 0
    iscale = cdiv(-32.0, max_scale)
    # C stores nearest_int into an int8_t before clamping: wrap like the cast does.
    ls = nearest_int(iscale.unsqueeze(1) * scales).to(torch.int8).to(torch.int32).clamp_(-32, 31) + 32
    ls = torch.where(has.unsqueeze(1), ls, torch.zeros_like(ls))
    d = torch.where(has, cdiv(1.0, iscale), torch.zeros_like(iscale))
    return _requantize_and_pack(xb, L, ls, d)


def _quantize_impl(xb: torch.Tensor, qwb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    x2 = xb * xb
    sigma2 = 2 * seq_sum(x2) / QK_K
    weight = qwb * sqrtf(sigma2.unsqueeze(1) + x2)  # [B, 256]
    sw = seq_sum(weight.reshape(B, 16, 16))  # [B, 16]
    scales, L = make_qx_quants(xb.reshape(B * 16, 16), 4, 1, weight.reshape(B * 16, 16))
    d_block, ls = make_qx_quants(scales.reshape(B, 16), 32, 1, sw)
    return _requantize_and_pack(xb, L, ls, d_block)


def quantize_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    def blocks(chunk: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return _quantize_ref(chunk) if w is None else _quantize_impl(chunk, w)

    return quantize_block_chunks(x, qw, QK_K, blocks, _CHUNK, _CHUNK_ACCEL)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    B = b.shape[0]
    hmask = b[:, :32].to(torch.int32)
    qs = b[:, 32:96].to(torch.int32)
    ls = _unpack_scales(b[:, 96:108])
    d = fp16_from_bytes(b[:, 108:110]).reshape(B)
    dl = d.unsqueeze(1) * (ls - 32).to(torch.float32)  # [B, 16]
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.int32).view(1, 1, 4, 1)
    low = (qs.reshape(B, 2, 1, 32) >> shifts) & 3  # [B, half, k, l] → element 128h + 32k + l
    hb = (hmask.reshape(B, 1, 32) >> torch.arange(8, device=b.device, dtype=torch.int32).view(1, 8, 1)) & 1
    q = low.reshape(B, QK_K) - 4 * (1 - hb.reshape(B, QK_K))
    return (dl.reshape(B, 16, 1) * q.reshape(B, 16, 16).to(torch.float32)).reshape(B, QK_K)


register(GGMLType("Q3_K", 11, QK_K, TYPE_SIZE, quantize_rows, dequantize_blocks, uses_imatrix=True))
