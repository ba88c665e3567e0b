"""Float helpers that reproduce ggml's C arithmetic bit for bit in vectorized torch.

ggml-base is compiled without FMA or fast-math, so every C expression is plain IEEE float32
in source order. Torch elementwise float32 ops are exact too; what must be copied with care
is (a) rounding rules, (b) the order of sums, which we keep sequential along the block while
vectorizing across blocks, and (c) fp16 round trips of stored scales.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
    t = torch.nan_to_num(v.to(torch.float32), nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return t.add_(_MAGIC).view(torch.int32).bitwise_and_(0x7FFFFF).sub_(0x400000)


def clamped_levels_(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """In place: ``MAX(lo, MIN(hi, nearest_int(v)))`` as exact float32 values, for every float.

    Equals ``nearest_int(v).clamp_(lo, hi).float()`` (NaN giving 0 before the clamp) in fewer
    full-size passes, for devices where checking the range of ``v`` first would cost a host
    sync: the clamp works on the mantissa of ``v + 1.5*2^23``, and restoring that float's
    exponent makes it ``1.5*2^23 + level``.
    """
    if not -0x400000 <= lo <= hi < 0x400000:
        raise ValueError(f"level range {lo}..{hi} is outside nearest_int's exact range")
    torch.nan_to_num_(v, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    b = v.add_(_MAGIC).view(torch.int32)
    b.bitwise_and_(0x7FFFFF).clamp_(0x400000 + lo, 0x400000 + hi).bitwise_or_(0x4B000000)
    return v.sub_(_MAGIC)


_FORCE_SYNC_FREE = False


def sync_free(x: torch.Tensor) -> bool:
    """Whether code on ``x``'s device must avoid host syncs and host-to-device copies.

    Off the CPU every quantizer must be capturable in a CUDA graph: no data-dependent early
    exits or compaction (loops run their full count, where the extra passes provably change
    nothing), no reads of device values on the host. On the CPU those exits save real work
    and cost nothing, so they stay (:func:`forced_sync_free` lets tests run the other path).
    """
    return _FORCE_SYNC_FREE or x.device.type != "cpu"


@contextmanager
def forced_sync_free() -> Iterator[None]:
    """Run the sync-free code paths on the CPU too, so CPU tests can check their bytes."""
    global _FORCE_SYNC_FREE
    old, _FORCE_SYNC_FREE = _FORCE_SYNC_FREE, True
    try:
        yield
    finally:
        _FORCE_SYNC_FREE = old


_CONSTS: dict[tuple, torch.Tensor] = {}


def const(values: float | tuple, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.tensor(values, dtype)`` on ``ref``'s device, made once per (device, dtype, values).

    Made per call it would be a host-to-device copy, which CUDA graph capture refuses; the
    first (eager) call fills this cache, so captured calls only look it up.
    """
    key = (ref.device, dtype, repr(values))
    t = _CONSTS.get(key)
    if t is None:
        t = torch.tensor(values, dtype=dtype, device=ref.device)
        _CONSTS[key] = t
    return t


def first_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """C's ``if (fabsf(v) > amax) { amax = fabsf(v); max = v; }`` scan from ``amax = max = 0``.

    The first element of largest magnitude wins, NaN never does (torch's argmax would pick it),
    and an all-zero/NaN slice gives +0.
    """
    a = x.abs().nan_to_num_(nan=-1.0, posinf=float("inf"))
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


def seq_sum(x: torch.Tensor, dim: int = -1, *, from_first: bool = False) -> torch.Tensor:
    """Sum over ``dim`` in C loop order (``s = 0.0f; s += x[j]`` from j=0), float32.

    Vectorized across everything else; the sequential order is what makes the bytes match.
    ``from_first`` is C's ``s = x[0]; s += x[j]`` from j=1, which differs only in giving -0
    when every addend is -0.

    On CUDA this is one ``cumsum`` kernel instead of one launch per position: cumsum over a
    dimension that is not the innermost one runs one thread per column, each adding its column
    sequentially in float32 from 0 (torch's ``tensor_kernel_scan_outer_dim``), which is the C
    loop exactly. Elsewhere cumsum may accumulate in double or in parallel, so other devices
    keep the loop.
    """
    x = x.to(torch.float32)
    if x.is_cuda:
        s = _cuda_seq_sum(x, dim)
        if from_first and x.shape[dim] > 0:
            neg0 = ((x == 0) & torch.signbit(x)).all(dim)
            s = torch.where(neg0, -torch.zeros_like(s), s)
        return s
    parts = x.unbind(dim)
    acc = parts[0].clone() if from_first else torch.zeros_like(parts[0])
    for p in parts[1:] if from_first else parts:
        acc.add_(p)
    return acc


def _cuda_seq_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    dim %= x.dim()
    n = x.shape[dim]
    if dim < x.dim() - 1 and 0 < n < x.numel():
        # Already not innermost (and not a lone column, which would go to cub): scan in place.
        return torch.cumsum(x, dim).select(dim, n - 1).clone()
    xm = x.movedim(dim, 0)
    rest = xm.shape[1:]
    flat = xm.reshape(n, -1)
    m = flat.shape[1]
    if n == 0 or m == 0:
        return x.new_zeros(rest)
    if m == 1:
        # A single column would take cub's parallel scan: give the kernel two.
        flat = torch.cat([flat, flat], dim=1)
    return torch.cumsum(flat.contiguous(), dim=0)[-1, :m].clone().reshape(rest)


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


def quantize_block_chunks(
    x: torch.Tensor,
    qw: torch.Tensor | None,
    block: int,
    fn,
    cpu_chunk: int,
    accel_chunk: int,
) -> torch.Tensor:
    """Run ``fn(blocks [b, block], weights [b, block] | None) -> uint8 [b, type_size]`` over chunks.

    Chunks bound the search temporaries: cache-sized on CPU, large on accelerators where launch
    count dominates. Block k of the flattened tensor takes importance block ``k % blocks_per_row``.
    """
    rows, n = x.shape
    xb = x.reshape(-1, block)
    nb_row = n // block
    qwb = None if qw is None else qw.to(torch.float32).reshape(nb_row, block)
    step = cpu_chunk if xb.device.type == "cpu" else accel_chunk
    out = []
    for s in range(0, xb.shape[0], step):
        chunk = xb[s : s + step]
        w = None if qwb is None else qwb[torch.arange(s, s + chunk.shape[0], device=x.device) % nb_row]
        out.append(fn(chunk, w))
    return torch.cat(out).reshape(rows, -1)
