"""K-quant blocks exactly as mistral.rs 0.9.5 writes them during ISQ (candle's ``k_quants.rs``).

mistral.rs quantizes through its candle fork (EricLBuehler/candle, rev 66a8cf1), whose
``BlockQ*K::from_float`` is a Rust port of an *older* llama.cpp search than the one in
:mod:`quantbench.quant.ggml.q4_k` and friends (which are byte-exact with current llama.cpp):

* Q2_K/Q4_K/Q5_K use ``make_qkx1_quants`` (5 alternating min/scale refits) instead of the
  ``make_qkx2_quants`` grid search;
* Q3_K/Q6_K use the same ``make_q3_quants``/``make_qx_quants`` idea but round with Rust's
  ``f32::round`` (half away from zero) where ggml rounds half to even, and Q6_K has no
  "all-zero block" shortcut;
* Q8_K scales by -128 (not -127) and rounds half away from zero;
* levels of sub-blocks whose stored scale is zero stay 0 (except in Q6_K, whose level buffer
  is shared across blocks and keeps the search's levels, as in C).

The byte layouts are the standard GGML ones, so the registry's dequantizers read these blocks.
Everything here is float32 in source order (Rust neither contracts to FMA nor reorders), with
sums accumulated sequentially along the block and vectorized across blocks.

With an importance vector ``qw`` mistral.rs calls ``from_float_imatrix`` instead; that path is
implemented in :mod:`quantbench.quant.ggml.candle_kquants_imatrix` when present, otherwise
:func:`quantize_rows_candle` refuses ``qw`` with a clear error.
"""

from __future__ import annotations

import torch

from quantbench.errors import InputValueError, ShapeError, UnknownTypeError
from quantbench.quant.ggml.common import (
    cdiv,
    f32_bytes,
    first_absmax,
    fp16_bytes,
    fp16_round,
    roundf,
    seq_sum,
    sync_free,
)
from quantbench.quant.ggml.q4_k import pack_scale_min_k4, unpack_scale_min_k4

QK_K = 256
_CHUNK = 8192  # super-blocks per pass on CPU: bounds the temporaries
_CHUNK_ACCEL = 1 << 16  # on accelerators launch count dominates: few, large passes

_I32_LO = -2147483648.0
_I32_HI = 2147483520.0  # largest float32 below 2^31


def rust_round(v: torch.Tensor) -> torch.Tensor:
    """``(v.round() as i32)`` as an exact float32: half away from zero, NaN -> 0, saturating."""
    return roundf(v).nan_to_num_(nan=0.0, posinf=_I32_HI, neginf=_I32_LO).clamp_(_I32_LO, _I32_HI)


def levels(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``nearest_int(v).clamp(lo, hi)`` as float32 (candle's ``nearest_int`` is ``round() as i32``)."""
    return rust_round(v).clamp_(lo, hi)


def low_byte(v: torch.Tensor) -> torch.Tensor:
    """Rust's ``i32 as u8``/``as i8`` truncation of a rounded float: the low 8 bits as int32."""
    return v.to(torch.int64).bitwise_and_(0xFF).to(torch.int32)


def fold_max0(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v.iter().fold(0.0, |m, &x| x.max(m))``: NaN-ignoring running max from +0.

    Only the sign of a zero result could depend on how ``f32::max`` orders zeros; the result
    is +0 whenever no element is positive, which is what the oracle's bytes show.
    """
    m = v.nan_to_num(nan=float("-inf")).amax(dim)
    return torch.where(m > 0, m, torch.zeros_like(m))


# ---------------------------------------------------------------------------------------------
# Searches. Groups sit on the last axis ([n, G]) so each sequential step reads contiguous memory.
# ---------------------------------------------------------------------------------------------


def make_qkx1_quants(xt: torch.Tensor, nmax: int, ntry: int) -> tuple[torch.Tensor, torch.Tensor]:
    """candle ``make_qkx1_quants(nmax, ntry, x)`` over groups ``xt`` [n, G] -> (scale, min) [G].

    Alternates a least-squares scale for fixed levels with ``min = mean(x - scale*l)``; a group
    stops after the first pass whose levels did not change (that pass still refits).
    """
    n = xt.shape[0]
    xmin = xt.amin(0)
    xmax = xt.amax(0)
    flat = xmax == xmin
    mn = torch.clamp(xmin, max=0.0)
    iscale = cdiv(float(nmax), xmax - mn)
    scale = cdiv(1.0, iscale)
    L = torch.zeros_like(xt)
    active = ~flat
    free = sync_free(xt)
    for _ in range(ntry):
        xs = xt - mn
        li = levels(iscale * xs, 0, nmax)
        changed = (li != L).any(0)
        sumlx = seq_sum(xs * li, 0)
        suml2 = (li * li).sum(0)  # integers: exact in any order
        new_scale = sumlx / suml2
        s = seq_sum(xt - new_scale * li, 0)
        new_min = cdiv(s, float(n))
        new_min = torch.where(new_min > 0, torch.zeros_like(new_min), new_min)
        new_iscale = cdiv(1.0, new_scale)
        L = torch.where(active, li, L)
        scale = torch.where(active, new_scale, scale)
        mn = torch.where(active, new_min, mn)
        iscale = torch.where(active, new_iscale, iscale)
        active = active & changed
        if not free and not bool(active.any()):
            break
    zero = torch.zeros_like(scale)
    return torch.where(flat, zero, scale), torch.where(flat, zero, -mn)


def _refine_passes(
    xt: torch.Tensor,
    wt: torch.Tensor,
    L: torch.Tensor,
    sumlx: torch.Tensor,
    suml2: torch.Tensor,
    lo: int,
    hi: int,
    w_times_l2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to 5 coordinate passes moving one level at a time while ``slx^2/sl2`` grows.

    ``w_times_l2``: the level-square term is ``w * (l*l)`` (make_q3_quants) rather than
    ``(w*l)*l`` (make_qx_quants). A pass that changes nothing in a group is a fixed point, so
    groups that stopped early are unaffected by the later passes the batch still runs.
    """
    n = xt.shape[0]
    free = sync_free(xt)

    def l2term(w: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return w * (l * l) if w_times_l2 else (w * l) * l

    for _ in range(5):
        any_change = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(n):
            x = xt[i]
            w = wt[i]
            l = L[i]
            wx = w * x
            slx = sumlx - wx * l
            sl2 = suml2 - l2term(w, l)
            pos = slx > 0
            new_l = levels(cdiv(x * sl2, torch.where(pos, slx, torch.ones_like(slx))), lo, hi)
            slx2 = slx + wx * new_l
            sl22 = sl2 + l2term(w, new_l)
            take = pos & (new_l != l) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(take, new_l, l)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            any_change |= take
        if not free and not bool(any_change.any()):
            break
    return L, sumlx, suml2


def make_q3_quants(xt: torch.Tensor, nmax: int) -> torch.Tensor:
    """candle ``make_q3_quants(x, nmax, do_rmse=true)`` over ``xt`` [n, G] -> scale [G]."""
    mx = first_absmax(xt, 0)
    empty = mx == 0
    iscale = cdiv(-float(nmax), torch.where(empty, torch.ones_like(mx), mx))
    L = levels(iscale * xt, -nmax, nmax - 1)
    w = xt * xt
    wx = w * xt
    sumlx = seq_sum(wx * L, 0)
    suml2 = seq_sum(w * (L * L), 0)
    L, sumlx, suml2 = _refine_passes(xt, w, L, sumlx, suml2, -nmax, nmax - 1, True)
    return torch.where(empty, torch.zeros_like(mx), sumlx / suml2)


def make_qx_quants(xt: torch.Tensor, nmax: int, wt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """candle ``make_qx_quants(n, nmax, x, ls, rmse_type=1, qw)`` over ``xt`` [n, G].

    Returns (scale [G], stored levels ``nmax + l`` [n, G] as float32). Weights are ``x*x``
    without ``wt``. All-zero groups give scale 0 and levels 0.
    """
    mx = first_absmax(xt, 0)
    empty = mx == 0
    w = xt * xt if wt is None else wt
    iscale = cdiv(-float(nmax), torch.where(empty, torch.ones_like(mx), mx))
    L = levels(iscale * xt, -nmax, nmax - 1)
    wx = w * xt
    sumlx = seq_sum(wx * L, 0)
    suml2 = seq_sum((w * L) * L, 0)
    scale = sumlx / suml2
    best = scale * sumlx
    active = torch.ones_like(empty)
    free = sync_free(xt)
    for _ in range(3):
        isc = cdiv(1.0, scale)
        li = levels(isc * xt, -nmax, nmax - 1)
        changed = (li != L).any(0)
        slx = seq_sum(wx * li, 0)
        sl2 = seq_sum((w * li) * li, 0)
        stop = ~changed | (sl2 == 0) | ((slx * slx) <= best * sl2)
        take = active & ~stop
        L = torch.where(take, li, L)
        sumlx = torch.where(take, slx, sumlx)
        suml2 = torch.where(take, sl2, suml2)
        scale = torch.where(take, sumlx / suml2, scale)
        best = torch.where(take, scale * sumlx, best)
        active = take
        if not free and not bool(active.any()):
            break
    L, sumlx, suml2 = _refine_passes(xt, w, L, sumlx, suml2, -nmax, nmax - 1, False)
    # candle keeps ``scale = sumlx / suml2`` in step with every accepted change.
    zero = torch.zeros_like(mx)
    scale = torch.where(empty, zero, sumlx / suml2)
    stored = torch.where(empty.unsqueeze(0), torch.zeros_like(L), L + nmax)
    return scale, stored


# ---------------------------------------------------------------------------------------------
# Block writers: x [B, 256] float32 -> uint8 [B, type_size]
# ---------------------------------------------------------------------------------------------


def _groups_t(xb: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 256] -> [size, B*256/size]: sub-blocks of ``size`` as columns."""
    return xb.reshape(-1, size).t().contiguous()


def _affine_requant(xb: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, size: int, nmax: int) -> torch.Tensor:
    """``nearest_int((x + dm)/d).clamp(0, nmax)`` per sub-block; 0 where ``d == 0`` (fresh buffer)."""
    B = xb.shape[0]
    g = xb.reshape(B, -1, size)
    dz = d == 0
    dsafe = torch.where(dz, torch.ones_like(d), d)
    l = levels((g + dm.unsqueeze(-1)) / dsafe.unsqueeze(-1), 0, nmax)
    return torch.where(dz.unsqueeze(-1), torch.zeros_like(l), l).to(torch.int32).reshape(B, QK_K)


def _q2_k(xb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    scales, mins = make_qkx1_quants(_groups_t(xb, 16), 3, 5)
    scales = scales.reshape(B, 16)
    mins = mins.reshape(B, 16)
    max_scale = fold_max0(scales, 1)
    max_min = fold_max0(mins, 1)
    has_s = max_scale > 0
    has_m = max_min > 0
    one = torch.ones_like(max_scale)
    zero = torch.zeros_like(max_scale)
    ls = low_byte(rust_round(cdiv(15.0, torch.where(has_s, max_scale, one)).unsqueeze(1) * scales))
    lm = low_byte(rust_round(cdiv(15.0, torch.where(has_m, max_min, one)).unsqueeze(1) * mins))
    ls = torch.where(has_s.unsqueeze(1), ls, torch.zeros_like(ls))
    lm = torch.where(has_m.unsqueeze(1), lm, torch.zeros_like(lm))
    sc = (ls | (lm << 4)) & 0xFF
    d = torch.where(has_s, cdiv(max_scale, 15.0), zero)
    dmin = torch.where(has_m, cdiv(max_min, 15.0), zero)
    dd = fp16_round(d).unsqueeze(1) * (sc & 0xF).to(torch.float32)
    dm = fp16_round(dmin).unsqueeze(1) * (sc >> 4).to(torch.float32)
    L = _affine_requant(xb, dd, dm, 16, 3).reshape(B, 2, 4, 32)
    qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return torch.cat(
        [sc.to(torch.uint8), qs.reshape(B, 64).to(torch.uint8), fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1))],
        dim=1,
    )


def _pack_q3_scales(ls: torch.Tensor) -> torch.Tensor:
    """[B, 16] six-bit values -> Q3_K's 12 scale bytes (low nibbles, then 2-bit high parts)."""
    lo = ls & 0xF
    hi = (ls >> 4) & 3
    h = hi.reshape(-1, 4, 4)  # [B, j//4, j%4]
    tail = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return torch.cat([lo[:, :8] | (lo[:, 8:] << 4), tail], dim=1).to(torch.uint8)


def _q3_k(xb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    scales = make_q3_quants(_groups_t(xb, 16), 4).reshape(B, 16)
    max_scale = first_absmax(scales, 1)
    has = max_scale != 0
    iscale = cdiv(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    ls = levels(iscale.unsqueeze(1) * scales, -32, 31).to(torch.int32) + 32
    ls = torch.where(has.unsqueeze(1), ls, torch.zeros_like(ls))
    d = torch.where(has, cdiv(1.0, iscale), torch.zeros_like(iscale))
    dq = fp16_round(d).unsqueeze(1) * (ls - 32).to(torch.float32)  # [B, 16]
    g = xb.reshape(B, 16, 16)
    nz = dq != 0
    lq = levels(g / torch.where(nz, dq, torch.ones_like(dq)).unsqueeze(2), -4, 3) + 4
    L = torch.where(nz.unsqueeze(2), lq, torch.zeros_like(lq)).to(torch.int32).reshape(B, QK_K)
    hbit = (L > 3).to(torch.int32)
    L = L - 4 * hbit
    bitw = (1 << torch.arange(8, device=xb.device, dtype=torch.int32)).view(1, 8, 1)
    hmask = (hbit.reshape(B, 8, 32) * bitw).sum(1)  # distinct bits: the sum is an OR
    q = L.reshape(B, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(B, 64)
    return torch.cat(
        [hmask.to(torch.uint8), qs.to(torch.uint8), _pack_q3_scales(ls), fp16_bytes(d.unsqueeze(1))], dim=1
    )


def _k4_scales(xb: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K head: (d, dmin) float32 [B], packed scale bytes [B, 12], levels int32 [B, 256]."""
    B = xb.shape[0]
    scales, mins = make_qkx1_quants(_groups_t(xb, 32), nmax, 5)
    scales = scales.reshape(B, 8)
    mins = mins.reshape(B, 8)
    max_scale = fold_max0(scales, 1)
    max_min = fold_max0(mins, 1)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, cdiv(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, cdiv(63.0, max_min), zero)
    ls = low_byte(rust_round(inv_scale.unsqueeze(1) * scales).clamp_(max=63))
    lm = low_byte(rust_round(inv_min.unsqueeze(1) * mins).clamp_(max=63))
    packed = pack_scale_min_k4(ls, lm)
    d = cdiv(max_scale, 63.0)
    dmin = cdiv(max_min, 63.0)
    sc, m = unpack_scale_min_k4(packed)
    dd = fp16_round(d).unsqueeze(1) * sc.to(torch.float32)
    dm = fp16_round(dmin).unsqueeze(1) * m.to(torch.float32)
    return d, dmin, packed, _affine_requant(xb, dd, dm, 32, nmax)


def _q4_k(xb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    d, dmin, packed, L = _k4_scales(xb, 15)
    L = L.reshape(B, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).to(torch.uint8).reshape(B, 128)
    return torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1)), packed, qs], dim=1)


def _q5_k(xb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    d, dmin, packed, L = _k4_scales(xb, 31)
    L = L.reshape(B, 8, 32)
    shifts = torch.arange(8, device=xb.device, dtype=torch.int32).reshape(1, 8, 1)
    qh = (((L >> 4) & 1) << shifts).sum(dim=1).to(torch.uint8)  # distinct bits: sum is OR
    lo = (L & 0xF).reshape(B, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).to(torch.uint8).reshape(B, 128)
    return torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1)), packed, qh, qs], dim=1)


def _q6_k(xb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    scales, Ls = make_qx_quants(_groups_t(xb, 16), 32)
    scales = scales.reshape(B, 16)
    Ls = Ls.t().reshape(B, 16, 16)
    max_scale = first_absmax(scales, 1)
    # No zero check: -128/0 is -inf and d = 1/-inf is -0 (bytes 00 80), every scale byte 0.
    iscale = cdiv(-128.0, max_scale)
    d = cdiv(1.0, iscale)
    sc = low_byte(rust_round(iscale.unsqueeze(1) * scales).clamp_(max=127))  # i8 bits
    sc_val = torch.where(sc > 127, sc - 256, sc).to(torch.float32)
    dq = fp16_round(d).unsqueeze(1) * sc_val  # [B, 16]
    nz = dq != 0
    lq = levels(xb.reshape(B, 16, 16) / torch.where(nz, dq, torch.ones_like(dq)).unsqueeze(2), -32, 31) + 32
    # The level buffer is shared across blocks: where d == 0 the search's levels remain.
    L = torch.where(nz.unsqueeze(2), lq, Ls).to(torch.int32).reshape(B, 2, 4, 32)
    lo = L & 0xF
    hi = L >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)  # [B, 2, 64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [B, 2, 32]
    return torch.cat(
        [ql.reshape(B, 128).to(torch.uint8), qh.reshape(B, 64).to(torch.uint8), sc.to(torch.uint8), fp16_bytes(d.unsqueeze(1))],
        dim=1,
    )


def _q8_k(xb: torch.Tensor) -> torch.Tensor:
    B = xb.shape[0]
    mx = first_absmax(xb, 1)
    empty = mx == 0
    iscale = cdiv(-128.0, torch.where(empty, torch.ones_like(mx), mx))
    # ``v.min(127.) as i8``: Rust's float->int cast saturates (NaN -> 0).
    v = roundf(iscale.unsqueeze(1) * xb).clamp_(max=127.0).nan_to_num_(nan=0.0).clamp_(min=-128.0)
    qs = torch.where(empty.unsqueeze(1), torch.zeros_like(v), v).to(torch.int32)
    bsums = qs.reshape(B, 16, 16).sum(2)
    bsums = (bsums & 0xFFFF).to(torch.int32)  # ``sum as i16``: low 16 bits
    bsums = torch.where(bsums > 32767, bsums - 65536, bsums).to(torch.int16)
    d = torch.where(empty, torch.zeros_like(mx), cdiv(1.0, iscale))
    return torch.cat(
        [f32_bytes(d.unsqueeze(1)), qs.to(torch.int8).view(torch.uint8), bsums.contiguous().view(torch.uint8)], dim=1
    )


_BLOCKS = {
    "Q2_K": (_q2_k, 84),
    "Q3_K": (_q3_k, 110),
    "Q4_K": (_q4_k, 144),
    "Q5_K": (_q5_k, 176),
    "Q6_K": (_q6_k, 210),
    "Q8_K": (_q8_k, 292),
}

CANDLE_TYPES = tuple(_BLOCKS)


def quantize_rows_candle(ggml_name: str, x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize ``x`` [rows, n] (n a multiple of 256) to ``ggml_name`` blocks the way mistral.rs
    0.9.5's ISQ does; returns uint8 [rows, n/256 * type_size] in the standard GGML layout.

    ``qw`` (per-column importance [n]) selects candle's ``from_float_imatrix``; see the module
    docstring for its status. Runs on ``x``'s device; input must be finite.
    """
    name = ggml_name.upper()
    if name not in _BLOCKS:
        raise UnknownTypeError(f"candle k-quant type {ggml_name!r} is not one of {', '.join(CANDLE_TYPES)}")
    if x.dim() != 2 or x.shape[1] % QK_K != 0:
        raise ShapeError(f"{name} (candle) needs a 2-D tensor whose rows are a multiple of {QK_K}; got shape {tuple(x.shape)}")
    if qw is not None:
        return _imatrix_rows(name, x, qw)
    x = x.to(torch.float32).contiguous()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputValueError(f"{name} (candle): tensor of shape {tuple(x.shape)} holds NaN or inf values")
    fn, size = _BLOCKS[name]
    rows = x.shape[0]
    xb = x.reshape(-1, QK_K)
    if xb.shape[0] == 0:
        return torch.empty(rows, 0, dtype=torch.uint8, device=x.device)
    step = _CHUNK if x.device.type == "cpu" else _CHUNK_ACCEL
    out = torch.cat([fn(xb[s : s + step]) for s in range(0, xb.shape[0], step)])
    return out.reshape(rows, -1)


def _imatrix_rows(name: str, x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    raise UnknownTypeError(
        f"{name} (candle): importance-weighted quantization (from_float_imatrix) is not implemented in candle mode"
    )
