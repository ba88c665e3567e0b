"""Float helpers that reproduce ggml's C arithmetic bit for bit in vectorized torch.

ggml-base is compiled without FMA or fast-math, so every C expression is plain IEEE float32
in source order. Torch elementwise float32 ops are exact too; what must be copied with care
is (a) rounding rules, (b) the order of sums, which we keep sequential along the block while
vectorizing across blocks, and (c) fp16 round trips of stored scales.
"""

from __future__ import annotations

import torch

GROUP_MAX_EPS = 1e-15


_MAGIC = 12582912.0  # 1.5 * 2^23


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit trick for *every* float (int32 result).

    Inside ``|v| < 2^22`` it is round-half-even; outside (huge ratios, inf) it returns the same
    low mantissa bits the C does, which matters where the result is clamped or wrapped after.
    NaN gives 0: the C's NaNs are x86's default NaN (mantissa 0x400000) while a CUDA NaN has
    another mantissa, so NaN is mapped explicitly.
    """
    bits = (v.to(torch.float32) + _MAGIC).view(torch.int32)
    r = (bits & 0x7FFFFF) - 0x400000
    return torch.where(torch.isnan(v), torch.zeros_like(r), r)


def first_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """C's ``if (fabsf(v) > amax) { amax = fabsf(v); max = v; }`` scan from ``amax = max = 0``.

    The first element of largest magnitude wins, NaN never does (torch's argmax would pick it),
    and an all-zero/NaN slice gives +0.
    """
    a = x.abs()
    a = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a)
    idx = a.argmax(dim=dim, keepdim=True)
    v = x.gather(dim, idx)
    return torch.where(a.gather(dim, idx) > 0, v, torch.zeros_like(v)).squeeze(dim)


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
    """``GGML_FP32_TO_FP16`` little-endian bytes ([..., n] float → [..., 2n] uint8).

    ggml writes ``sign | 0x7E00`` for NaN and the C's NaNs are x86's default NaN (sign set), so
    NaN becomes 0xFE00 on every device (CUDA would give 0x7FFF).
    """
    h = x.to(torch.float16).contiguous().view(torch.int16)
    h = torch.where(torch.isnan(x), torch.full_like(h, -512), h)  # 0xFE00 as int16
    return h.view(torch.uint8)


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


def sqrtf(s: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``: the correctly rounded float32 square root, on any device.

    torch's float32 ``sqrt`` on CPU (AVX2 kernels) is one ulp off for about one input in six.
    A float64 root rounded to float32 is at most one ulp off whatever the backend; an exact test
    against the neighbouring midpoints (their squares are exact in float64) settles it.
    """
    s = s.to(torch.float32)
    s64 = s.double()
    y = torch.sqrt(s64).float()
    y64 = y.double()
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    dn = torch.nextafter(y, torch.zeros_like(y))
    hm = up.double().add_(y64).mul_(0.5)
    lm = dn.double().add_(y64).mul_(0.5)
    # Zeros (with their sign), inf and NaN pass through unchanged.
    return torch.where(hm.mul_(hm) < s64, up, torch.where(lm.mul_(lm) > s64, dn, y))


def seq_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` in C loop order (``s = 0.0f; s += x[j]`` from j=0), float32.

    Vectorized across everything else; the sequential order is what makes the bytes match.
    """
    parts = x.to(torch.float32).unbind(dim)
    acc = torch.zeros_like(parts[0])
    for p in parts:
        acc.add_(p)
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
