"""F8Q8: mistral.rs's Q8_0 variant with an FP8 block scale (UQFF serde type 5).

Why its own module: the block is 33 bytes, not GGML's 34, and the scale is an e4m3 number
pre-multiplied by 416 (mistral.rs's ``F8E4M3::MAX``), so neither GGML Q8_0 nor the FP8
schemes describe it.

Layout (mistral.rs ``BlockF8Q8``, ``#[repr(C)]``, 33 bytes): byte 0 = ``d`` as F8E4M3 bits,
bytes 1..32 = 32 ``i8`` codes. The *whole* tensor is flattened row-major and zero-padded to a
multiple of 32 before blocking (``F8Q8Linear::from_weight``), so a block may span rows and no
divisibility is required.

Per block (``from_float``)::

    amax = max|x|;  d = amax / 127;  id = d != 0 ? 1/d : 0
    byte0 = F8E4M3(d * 416)             # 416: the float8 crate's F8E4M3::MAX; round-to-nearest-even
    q_j   = (i8) round_half_away(x_j * id)   # Rust's f32::round then saturating cast

Dequantization uses the *rounded* scale: ``x_j = q_j * (fp8(byte0) / 416)``. Consequences of the
format that we keep rather than fix: a 3-bit-mantissa scale (up to ~6% relative scale error per
block), blocks with ``amax`` above about 137 saturate the scale (448 / 416 * 127), and blocks
with ``amax`` below about 3e-4 get scale 0 and decode to zeros.

QTensor tensors: ``weight`` uint8 ``[num_blocks * 33]`` (UQFF ``{prefix}.weight`` raw bytes).
``params``: ``num_blocks`` (UQFF ``{prefix}.weight.num_blocks``); the logical shape is the
QTensor's (UQFF ``{prefix}.weight.shape``).
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import roundf
from quantbench.quant.fp8 import MISTRALRS_E4M3_MAX, to_e4m3
from quantbench.quant.qtensor import QTensor

QK = 32
BLOCK_BYTES = 33


def quantize(w: torch.Tensor, *, name: str = "tensor") -> QTensor:
    """F8Q8 blocks of the flattened tensor, on the tensor's device."""
    x = w.to(torch.float32).reshape(-1)
    n = x.numel()
    nb = -(-n // QK)
    if nb * QK != n:
        x = torch.cat([x, x.new_zeros(nb * QK - n)])
    xb = x.reshape(nb, QK)
    amax = xb.abs().amax(dim=1, keepdim=True)
    d = amax / 127.0
    nz = d != 0
    inv = torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))
    dbyte = to_e4m3(d * MISTRALRS_E4M3_MAX).view(torch.uint8)
    qs = roundf(xb * inv).clamp(-128, 127).to(torch.int8).view(torch.uint8)  # Rust f32::round = C roundf
    data = torch.cat([dbyte, qs], dim=1).reshape(-1)
    return QTensor("", tuple(w.shape), {"weight": data}, {"num_blocks": nb})


def dequantize(q: QTensor) -> torch.Tensor:
    """``q * fp8(d) / 416`` per block, padding dropped, float32 in the logical shape."""
    blocks = q.tensors["weight"].reshape(-1, BLOCK_BYTES)
    d = blocks[:, :1].contiguous().view(torch.float8_e4m3fn).to(torch.float32) / MISTRALRS_E4M3_MAX
    qs = blocks[:, 1:].contiguous().view(torch.int8).to(torch.float32)
    return (qs * d).reshape(-1)[: q.numel].reshape(q.shape)


def bits_per_weight(shape: tuple[int, ...]) -> float:
    numel = 1
    for s in shape:
        numel *= s
    return 8.0 * BLOCK_BYTES * (-(-numel // QK)) / numel
