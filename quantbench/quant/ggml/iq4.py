"""GGML's 4-bit non-linear types IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks).

Both go through llama.cpp's ``quantize_row_iq4_nl_impl`` with ``ntry = 7`` whether or not an
importance matrix is given (``ggml_quantize_chunk`` never takes the ``ntry = -1`` reference path):
each 32-element block gets a weighted least-squares scale, refined by trying 15 more starting
scales ``(itry - 127) / max``. IQ4_NL stores that scale as fp16; IQ4_XS stores a 6-bit scale per
block relative to an fp16 super-block scale and re-picks every level with the quantized scale.

The 16 levels ``kvalues_iq4nl`` are integers, so the nearest-level search of ``best_index_int8``
is a table lookup on ``floor(x)`` followed by the C tie rule (``x - lo < hi - x`` → lo).
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import (
    const,
    first_absmax,
    fp16_bytes,
    fp16_from_bytes,
    pack_nibbles,
    seq_sum,
    sqrtf,
)
from quantbench.quant.registry import GGMLType, register

KVALUES_IQ4NL: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
QK4_NL = 32
QK_K = 256
NTRY = 7
_GROUP_MAX_EPS = 1e-15  # GROUP_MAX_EPS is the float literal 1e-15f; compared as float32 below
_CHUNK_BLOCKS_CPU = 2048      # blocks per chunk of the scale search: [chunk, 16] slices stay in cache
_CHUNK_BLOCKS_OTHER = 1 << 17  # on accelerators fewer, larger kernels win


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``f = floor(x)`` clamped to [-127, 112]: ``mu`` (count of levels <= f) and levels mu-1, mu.

    Index is ``f + 127``. For any x in (v0, v15) the binary search of ``best_index_int8`` ends on
    ``v[mu-1] <= x < v[mu]``; for integer levels ``v <= x`` iff ``v <= floor(x)``. Clamping makes
    x <= v0 and x >= v15 fall out of the same tie rule (lo resp. hi always wins there).
    """
    vals = torch.tensor(KVALUES_IQ4NL, dtype=torch.int64)
    f = torch.arange(-127, 113, dtype=torch.int64)
    mu = (vals.unsqueeze(0) <= f.unsqueeze(1)).sum(1)
    lo = vals[mu - 1].to(torch.float32)
    hi = vals[mu].to(torch.float32)
    return mu.to(device), lo.to(device), hi.to(device)


_TABLE_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _get_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if device not in _TABLE_CACHE:
        _TABLE_CACHE[device] = _tables(device)
    return _TABLE_CACHE[device]


def _slot(x: torch.Tensor) -> torch.Tensor:
    """Table index of ``x``; NaN goes to the top slot, where the C binary search also ends."""
    f = torch.nan_to_num(torch.floor(x).clamp_(-127.0, 112.0), nan=112.0)
    return f.to(torch.int64) + 127


def best_index(x: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, x)`` as int64, NaN and infinities included."""
    mu, lo, hi = _get_tables(x.device)
    s = _slot(x)
    m = mu[s]
    return torch.where((x - lo[s]) < (hi[s] - x), m - 1, m)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C ``d ? 1/d : 0`` (``-0.0`` counts as zero)."""
    nz = d != 0
    return torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))


def _search_sums(xb: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sumqx = Σ w*q*x`` and ``sumq2 = Σ w*q*q`` for every block and inverse scale, C loop order.

    xb, w: [nb, 32]; ids: [nb, T]. Returns two [nb, T] tensors. The loop runs over the element
    position j (the order of the C sums) and handles all blocks and tries of one j at once;
    callers keep nb small on CPU so those [nb, T] slices stay in cache.
    """
    _, lo, hi = _get_tables(xb.device)
    xt = xb.t().contiguous()
    wt = w.t().contiguous()
    sumqx = torch.zeros_like(ids)
    sumq2 = torch.zeros_like(ids)
    for j in range(xb.shape[1]):
        xj = xt[j].unsqueeze(1)
        al = xj * ids
        # x + 127 may round up to the next integer only when x is within half an ulp below it;
        # that integer is then either no level (same slot contents) or the level x is nearest to.
        s = al.clamp(-127.0, 112.0).add_(127.0).to(torch.int32).view(-1)
        lo_v = lo.index_select(0, s).view_as(al)
        hi_v = hi.index_select(0, s).view_as(al)
        q = torch.where((al - lo_v) < (hi_v - al), lo_v, hi_v)
        wq = wt[j].unsqueeze(1) * q
        sumqx.add_(wq * xj)
        sumq2.add_(wq * q)
    return sumqx, sumq2


def _block_scales(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-block float scale ``scales[ib]`` of ``quantize_row_iq4_nl_impl`` (ntry = 7)."""
    nb = xb.shape[0]
    amax = xb.abs().amax(dim=1)
    mx = xb.gather(1, xb.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    valid = ~(amax < const(_GROUP_MAX_EPS, xb))
    # Blocks below the threshold are skipped in C; give them a harmless max so no inf/NaN appears.
    mx = torch.where(valid, mx, torch.ones_like(mx))

    # -max/values[0] = (-max)/(-127.f). The divisor is a tensor on purpose: CUDA torch turns
    # division by a Python scalar into multiplication by its reciprocal, which is not exact.
    d0 = (-mx) / torch.full_like(mx, float(KVALUES_IQ4NL[0]))
    tries = torch.arange(-NTRY, NTRY + 1, device=xb.device, dtype=torch.int32) + KVALUES_IQ4NL[0]
    ids = torch.cat([(1.0 / d0).unsqueeze(1), tries.to(torch.float32).unsqueeze(0) / mx.unsqueeze(1)], dim=1)

    sumqx = torch.empty(nb, 2 * NTRY + 2, dtype=torch.float32, device=xb.device)
    sumq2 = torch.empty_like(sumqx)
    chunk = _CHUNK_BLOCKS_CPU if xb.device.type == "cpu" else _CHUNK_BLOCKS_OTHER
    for s in range(0, nb, chunk):
        e = min(nb, s + chunk)
        sumqx[s:e], sumq2[s:e] = _search_sums(xb[s:e], w[s:e], ids[s:e])

    zero = torch.zeros(nb, dtype=torch.float32, device=xb.device)
    pos = sumq2[:, 0] > 0
    d = torch.where(pos, sumqx[:, 0] / torch.where(pos, sumq2[:, 0], torch.ones_like(zero)), zero)
    best = d * sumqx[:, 0]
    for t in range(1, 2 * NTRY + 2):
        sx, s2 = sumqx[:, t], sumq2[:, t]
        take = (s2 > 0) & (sx * sx > best * s2)
        d = torch.where(take, sx / torch.where(take, s2, torch.ones_like(s2)), d)
        best = torch.where(take, d * sx, best)
    return torch.where(valid, d, zero)


def _weights(xs: torch.Tensor, qw: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Per-element weights for super-blocks ``xs`` [nsb, S]: ``qw*sqrtf(sigma2 + x^2)`` or ``x^2``."""
    if qw is None:
        return xs * xs
    s = xs.shape[1]
    sigma2 = seq_sum(xs * xs) * (2.0 / s)        # 2.f/super_block_size is exact for S = 32, 256
    qwb = qw.reshape(1, -1, s).expand(rows, -1, -1).reshape(-1, s)
    return qwb * sqrtf(sigma2.unsqueeze(1) + xs * xs)


def _pack_levels(levels: torch.Tensor) -> torch.Tensor:
    """[nb, 32] level indices → [nb, 16] bytes: element j low nibble, j+16 high nibble."""
    return pack_nibbles(levels[:, :16], levels[:, 16:])


def _iq4_nl_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    xb = x.reshape(-1, QK4_NL)
    scale = _block_scales(xb, _weights(xb, qw, rows))
    levels = best_index(_inverse(scale).unsqueeze(1) * xb)
    out = torch.cat([fp16_bytes(scale.unsqueeze(1)), _pack_levels(levels)], dim=1)
    return out.reshape(rows, -1)


def _iq4_xs_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    xs = x.reshape(-1, QK_K)
    nsb = xs.shape[0]
    nsub = QK_K // 32
    xb = xs.reshape(-1, 32)
    w = _weights(xs, qw, rows).reshape(-1, 32)
    scales = _block_scales(xb, w).reshape(nsb, nsub)

    d = -first_absmax(scales, 1) / 32
    idd = _inverse(d).unsqueeze(1)
    prod = idd * scales
    # nearest_int's magic-number trick maps NaN (only from inf*0) to 0.
    l = torch.where(torch.isnan(prod), torch.zeros_like(prod), torch.round(prod)).to(torch.int32)
    l = l.clamp(-32, 31)
    dl = d.unsqueeze(1) * l.to(torch.float32)
    levels = best_index(_inverse(dl).reshape(-1, 1) * xb)

    u = (l + 32).to(torch.int32)
    lo = u & 0xF
    scales_l = pack_nibbles(lo[:, 0::2], lo[:, 1::2])                              # [nsb, 4]
    shifts = 2 * torch.arange(nsub, device=x.device, dtype=torch.int32)
    sh = ((u >> 4) << shifts).sum(1)                                               # uint16 value
    scales_h = torch.stack([sh & 0xFF, sh >> 8], dim=1).to(torch.uint8)
    qs = _pack_levels(levels).reshape(nsb, -1)
    out = torch.cat([fp16_bytes(d.unsqueeze(1)), scales_h, scales_l, qs], dim=1)
    return out.reshape(rows, -1)


def _kvalues(device: torch.device) -> torch.Tensor:
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes → [n, 32] indices, low nibbles first (gguf-py's order)."""
    q = qs.to(torch.int64)
    return torch.cat([q & 0x0F, q >> 4], dim=1)


def _iq4_nl_dequant(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, :2])
    return d * _kvalues(b.device)[_nibbles(b[:, 2:])]


def _iq4_xs_dequant(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    nsub = QK_K // 32
    d = fp16_from_bytes(b[:, :2])                                                  # [n, 1]
    sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    sl = b[:, 4:8].to(torch.int32)
    lo = torch.stack([sl & 0x0F, sl >> 4], dim=2).reshape(n, nsub)
    hi = (sh.unsqueeze(1) >> (2 * torch.arange(nsub, device=b.device, dtype=torch.int32))) & 3
    ls = (lo | (hi << 4)) - 32
    dl = (d * ls.to(torch.float32)).reshape(n * nsub, 1)
    q = _kvalues(b.device)[_nibbles(b[:, 8:].reshape(n * nsub, 16))]
    return (dl * q).reshape(n, QK_K)


register(GGMLType("IQ4_NL", 20, QK4_NL, 2 + QK4_NL // 2, _iq4_nl_rows, _iq4_nl_dequant, uses_imatrix=True))
register(GGMLType("IQ4_XS", 23, QK_K, 2 + 2 + QK_K // 64 + QK_K // 2, _iq4_xs_rows, _iq4_xs_dequant, uses_imatrix=True))
