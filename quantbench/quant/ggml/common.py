"""Float helpers that reproduce ggml's C arithmetic bit for bit in vectorized torch.

ggml-base is compiled without FMA or fast-math, so every C expression is plain IEEE float32
in source order. Torch elementwise float32 ops are exact too; what must be copied with care
is (a) rounding rules, (b) the order of sums, which we keep sequential along the block while
vectorizing across blocks, and (c) fp16 round trips of stored scales.
"""

from __future__ import annotations

import torch

GROUP_MAX_EPS = 1e-15


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: the 1.5*2^23 magic-number trick, i.e. round half to even."""
    return torch.round(x).to(torch.int32)


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: half away from zero, exact for every float32 (no ``floor(x+0.5)`` error)."""
    t = torch.trunc(x)
    frac = x - t
    return t + torch.where(frac.abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def c_int_cast(x: torch.Tensor) -> torch.Tensor:
    """C's ``(int)x`` truncation toward zero."""
    return torch.trunc(x).to(torch.int32)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``: round to nearest-even half and back."""
    return x.to(torch.float16).to(torch.float32)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes of ``x`` ([..., n] float → [..., 2n] uint8)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fp16_bytes`: [..., 2n] uint8 → [..., n] float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def f32_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.uint8)


def f32_from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def cdiv(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """C's correctly rounded float division ``a / b`` where one side may be a constant.

    Torch may evaluate ``tensor / scalar`` (on CUDA) or ``scalar / tensor`` as a multiply by a
    reciprocal, rounding twice; dividing two full tensors is always one IEEE division.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``, correctly rounded. torch's vectorized float32 sqrt on CPU is off by one ulp
    in roughly one result in six; the double square root rounded to float32 is exact."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def seq_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in C loop order (``s += x[j]`` from j=0), float32."""
    acc = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    for j in range(x.shape[-1]):
        acc = acc + x[..., j]
    return acc


def pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Byte ``lo | hi << 4`` from two uint8-valued int tensors of equal shape."""
    return (lo.to(torch.uint8) & 0x0F) | ((hi.to(torch.uint8) & 0x0F) << 4)


def bits_to_u32_le(bits: torch.Tensor) -> torch.Tensor:
    """[..., 32] of 0/1 → [..., 4] uint8, bit j of a little-endian uint32 = bits[..., j]."""
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    b = bits.to(torch.int32).reshape(*bits.shape[:-1], 4, 8)
    return (b * weights).sum(-1).to(torch.uint8)


def u32_le_to_bits(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] uint8 → [..., 32] int32 of 0/1 (inverse of :func:`bits_to_u32_le`)."""
    shifts = torch.arange(8, device=b.device, dtype=torch.int32)
    return ((b.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*b.shape[:-1], 32)


def row_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[rows, n] → [rows * n/block_size, block_size] view."""
    return x.reshape(-1, block_size)


def block_weights(qw: torch.Tensor | None, rows: int, block_size: int) -> torch.Tensor | None:
    """Per-column importance [n] → per-block [rows * n/block_size, block_size] (same for every row)."""
    if qw is None:
        return None
    return qw.reshape(1, -1, block_size).expand(rows, -1, -1).reshape(-1, block_size)
