"""Q8_K: llama.cpp's intermediate 8-bit type for K-quant dot products (``quantize_row_q8_K_ref``).

Block layout (292 bytes): d (f32), qs[256] (int8), bsums[16] (int16 sums of 16 quants each).
It has no importance-weighted path, so ``qw`` is ignored. For an all-zero block C writes d and
qs but leaves bsums untouched; we write zeros there (what a zeroed destination holds).
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import cdiv, f32_bytes, f32_from_bytes, first_absmax

from quantbench.quant.registry import GGMLType, register

QK_K = 256
TYPE_SIZE = 4 + QK_K + 2 * (QK_K // 16)


def quantize_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows, n = x.shape
    xb = x.reshape(-1, QK_K)
    B = xb.shape[0]
    mx = first_absmax(xb, 1).unsqueeze(1)
    empty = (mx == 0).squeeze(1)
    iscale = cdiv(-127.0, mx)
    # |iscale * x| <= 127 wherever iscale is finite, so rounding is nearest_int there. iscale
    # overflows to inf for subnormal maxima (and is -0 for an infinite one): C's nearest_int of
    # the resulting +-inf or NaN, after MIN(127, .) and the int8 store, is 0.
    v = (iscale * xb).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    qs = v.round_().to(torch.int8)
    qs = torch.where(empty.unsqueeze(1), torch.zeros_like(qs), qs)
    bsums = qs.reshape(B, 16, 16).sum(2, dtype=torch.int32).to(torch.int16)  # exact integer sums
    d = torch.where(empty, torch.zeros(B, dtype=torch.float32, device=x.device), cdiv(1.0, iscale).squeeze(1))
    out = torch.cat([f32_bytes(d.unsqueeze(1)), qs.view(torch.uint8), bsums.contiguous().view(torch.uint8)], dim=1)
    return out.reshape(rows, -1)


def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    d = f32_from_bytes(b[:, :4])  # [B, 1]
    qs = b[:, 4 : 4 + QK_K].contiguous().view(torch.int8).to(torch.float32)
    return d * qs


register(GGMLType("Q8_K", 15, QK_K, TYPE_SIZE, quantize_rows, dequantize_blocks))
