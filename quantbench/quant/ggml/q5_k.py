"""Q5_K: Q4_K's super-block layout with 5-bit levels; the fifth bits live in a 32-byte plane.

Block (176 bytes): fp16 d, fp16 dmin, 12 bytes of packed 6-bit (scale, min) pairs, 32 bytes
``qh`` (bit s of byte j is the high bit of level 32*s + j), 128 bytes of low nibbles laid out
as in Q4_K.
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import fp16_bytes
from quantbench.quant.ggml.q4_k import QK_K, quantize_k_affine_32, scales_mins_k4
from quantbench.quant.registry import GGMLType, register


def _quantize_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    d, dmin, packed, L = quantize_k_affine_32(x, qw, 31, (-0.5, 0.1, 15), clamp_impl_levels=True)
    L = L.reshape(-1, 8, 32)
    shifts = torch.arange(8, device=x.device, dtype=torch.int32).reshape(1, 8, 1)
    qh = (((L >> 4) & 1) << shifts).sum(dim=1).to(torch.uint8)  # [B, 32]
    lo = (L & 0xF).reshape(-1, 4, 2, 32)
    qs = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).to(torch.uint8).reshape(-1, QK_K // 2)
    out = torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1)), packed, qh, qs], dim=1)
    return out.reshape(rows, -1)


def _dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
    s, m = scales_mins_k4(b)
    qh = b[:, 16:48].to(torch.int32).unsqueeze(1)  # [B, 1, 32]
    shifts = torch.arange(8, device=b.device, dtype=torch.int32).reshape(1, 8, 1)
    hi = (qh >> shifts) & 1  # [B, 8, 32]
    qs = b[:, 48:176].to(torch.int32).reshape(-1, 4, 1, 32)
    lo = (qs >> torch.tensor([0, 4], dtype=torch.int32, device=b.device).reshape(1, 1, 2, 1)) & 0xF
    q = (lo.reshape(-1, 8, 32) | (hi << 4)).to(torch.float32)
    return (s.unsqueeze(-1) * q - m.unsqueeze(-1)).reshape(-1, QK_K)


register(GGMLType("Q5_K", 13, QK_K, 176, _quantize_rows, _dequantize_blocks, uses_imatrix=True))
