"""Unquantized GGML types F32, F16, BF16 (block size 1), stored as raw little-endian values."""

from __future__ import annotations

import torch

from quantbench.quant.registry import GGMLType, register


def _rows_as(dtype: torch.dtype):
    def quantize_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        return x.to(dtype).contiguous().view(torch.uint8).reshape(x.shape[0], -1)

    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return b.contiguous().view(dtype).to(torch.float32).reshape(-1, 1)

    return quantize_rows, dequantize_blocks


for _name, _id, _dtype, _size in (("F32", 0, torch.float32, 4), ("F16", 1, torch.float16, 2), ("BF16", 30, torch.bfloat16, 2)):
    _q, _d = _rows_as(_dtype)
    register(GGMLType(_name, _id, 1, _size, _q, _d))
