"""K-quant blocks exactly as mistral.rs 0.9.5 writes them during ISQ (candle's ``k_quants.rs``).

mistral.rs quantizes through its candle fork (EricLBuehler/candle, rev 66a8cf1), whose
``BlockQ*K::from_float`` is a Rust port of an *older* llama.cpp search than the one in
:mod:`quantbench.quant.ggml.q4_k` and friends (which are byte-exact with current llama.cpp):

* Q2_K/Q4_K/Q5_K use ``make_qkx1_quants`` (5 alternating min/scale refits) instead of the
  ``make_qkx2_quants`` grid search;
* Q3_K/Q6_K use the older ``make_q3_quants``/``make_qx_quants`` (no ``rmse_type`` sweep), and
  Q6_K has no "all-zero block" shortcut (such a block stores ``d = -0``);
* every ``nearest_int`` is Rust's ``f32::round`` (half away from zero; ggml rounds half to even);
* levels of sub-blocks whose stored scale is zero stay 0 (except in Q6_K and in the imatrix
  Q3_K path, whose level buffer keeps the search's levels);
* Q8_K is ggml's (-127 scale) but rounds half away from zero, and ignores an imatrix.

With an importance vector mistral.rs calls ``from_float_imatrix``: Q2_K/Q4_K/Q5_K run a
``make_qkx3_quants`` search with ``qw*sqrt(sigma2 + x^2)`` weights and quantize the sub-block
scales with ``make_qp_quants``; Q3_K runs weighted ``make_qx_quants`` twice; Q6_K passes the raw
importance to ``make_qx_quants``. These differ from llama.cpp's ``*_impl`` in rounding, in
``w*(l*l)`` versus ``(w*l)*l`` products and in sigma2 for Q2_K.

The byte layouts are the standard GGML ones, so the registry's dequantizers read these blocks.
Everything is float32 in Rust's source order (Rust neither contracts to FMA nor reorders), sums
accumulated sequentially along the block and vectorized across blocks. Checked byte for byte
against the mistralrs 0.9.5 wheel (``tests/quant/ggml/test_candle_kquants.py``).
"""
from __future__ import annotations

import numpy as np
import torch

from quantbench.errors import ImatrixError, InputValueError, ShapeError, UnknownTypeError
from quantbench.quant.ggml.common import (
    cdiv,
    f32_bytes,
    first_absmax,
    fp16_bytes,
    fp16_round,
    quantize_block_chunks,
    roundf,
    seq_sum,
    sqrtf,
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


def _f32(v: float) -> float:
    """A Python float holding exactly the float32 value Rust computes for ``v``."""
    return float(np.float32(v))


def make_qkx3_quants(
    xt: torch.Tensor, wt: torch.Tensor, nmax: int, rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36
) -> tuple[torch.Tensor, torch.Tensor]:
    """candle ``make_qkx3_quants(nmax, x, Some(w), rmin, rdelta, nstep, false)`` over ``xt`` [n, G].

    Returns (scale, -min) [G]. Candidates are tried in order and a winner's min shifts the
    next candidates' grid, so the 37 candidates run one after another (vectorized over groups).
    """
    sum_w = seq_sum(wt, 0, from_first=True)
    sum_x = seq_sum(wt * xt, 0, from_first=True)
    mn = torch.clamp(xt.amin(0), max=0.0)
    mx = xt.amax(0)
    flat = mx <= mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = cdiv(float(nmax), span)
    scale = cdiv(1.0, iscale)

    def wsq_err(s: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = (s * L + m) - xt
        return seq_sum(wt * (diff * diff), 0)

    best = wsq_err(scale, mn, levels(iscale * (xt - mn), 0, nmax))
    nmax_f = np.float32(nmax)
    for k in range(nstep + 1):
        c = _f32(np.float32(rmin) + np.float32(rdelta) * np.float32(k) + nmax_f)
        isc = cdiv(c, mx - mn)
        la = levels(isc * (xt - mn), 0, nmax)
        wl = wt * la
        sum_l = seq_sum(wl, 0)
        sum_l2 = seq_sum(wt * (la * la), 0)
        sum_xl = seq_sum(wl * xt, 0)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        ts = (sum_w * sum_xl - sum_x * sum_l) / Ds
        tm = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = tm > 0
        tm = torch.where(pos, torch.zeros_like(tm), tm)
        ts = torch.where(pos, sum_xl / sum_l2, ts)
        mad = wsq_err(ts, tm, la)
        take = ok & (mad < best) & ~flat
        best = torch.where(take, mad, best)
        scale = torch.where(take, ts, scale)
        mn = torch.where(take, tm, mn)
    return torch.where(flat, torch.zeros_like(scale), scale), -mn


def make_qp_quants(xt: torch.Tensor, wt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """candle ``make_qp_quants(n, nmax, x, L, w)`` over ``xt`` [n, G] -> (scale [G], L [n, G] int32).

    Quantizes non-negative sub-block scales/mins to 0..nmax against one float scale. The first
    guess wraps like ``i32 as u8``; the final levels saturate like ``f32 as u8``.
    """
    mx = fold_max0(xt, 0)
    zero = mx == 0
    msafe = torch.where(zero, torch.ones_like(mx), mx)
    iscale = cdiv(float(nmax), msafe)

    def wsq_err(s: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = xt - s * L
        return seq_sum((wt * diff) * diff, 0)

    best = wsq_err(cdiv(1.0, iscale), low_byte(rust_round(iscale * xt)).float())
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        c = _f32(np.float32(0.1) * np.float32(k) + np.float32(nmax))
        isc = cdiv(c, msafe)
        li = low_byte(rust_round(isc * xt)).clamp_(max=nmax).float()
        mse = wsq_err(cdiv(1.0, isc), li)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, isc, iscale)
    L = roundf(iscale * xt).nan_to_num_(nan=0.0).clamp_(0.0, 255.0).clamp_(max=float(nmax))
    wx = wt * xt
    sumlx = seq_sum(wx * L, 0)
    suml2 = seq_sum(wt * (L * L), 0)
    free = sync_free(xt)
    for _ in range(5):
        any_change = torch.zeros_like(zero)
        for i in range(xt.shape[0]):
            l = L[i]
            slx = sumlx - wx[i] * l
            sl2 = suml2 - wt[i] * (l * l)
            ok = (slx > 0) & (sl2 > 0)
            q = cdiv(xt[i] * sl2, torch.where(ok, slx, torch.ones_like(slx)))
            new_l = low_byte(rust_round(q)).clamp_(max=nmax).float()
            slx2 = slx + wx[i] * new_l
            sl22 = sl2 + wt[i] * (new_l * new_l)
            take = ok & (new_l != l) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(take, new_l, l)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            any_change |= take
        if not free and not bool(any_change.any()):
            break
    scale = torch.where(zero, torch.zeros_like(mx), sumlx / suml2)
    return scale, torch.where(zero.unsqueeze(0), torch.zeros_like(L), L).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Block writers: x [B, 256] float32 (and importance [B, 256] or None) -> uint8 [B, type_size]
# ---------------------------------------------------------------------------------------------


def _groups_t(xb: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 256] -> [size, B*256/size]: sub-blocks of ``size`` as columns."""
    return xb.reshape(-1, size).t().contiguous()


def _imatrix_weights(xb: torch.Tensor, wb: torch.Tensor, size: int, sigma_mult: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = qw * sqrt(sigma2 + x^2)`` per element and each sub-block's ``sum(w)``.

    ``sigma2 = sigma_mult * sum(x^2) / 256`` (Q2_K uses 1, Q4_K/Q5_K 2).
    Returns (w [size, B*256/size], sw [256/size, B]).
    """
    B = xb.shape[0]
    sum_x2 = seq_sum(xb * xb, 1)
    sigma2 = cdiv(sum_x2 * sigma_mult, float(QK_K))  # Rust: `m * sum_x2 / 256` (x1 is exact)
    w = wb * sqrtf(sigma2.unsqueeze(1) + xb * xb)
    wt = _groups_t(w, size)
    sw = seq_sum(wt, 0).reshape(B, QK_K // size).t().contiguous()
    return wt, sw


def _affine_requant(xb: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, size: int, nmax: int) -> torch.Tensor:
    """``nearest_int((x + dm)/d).clamp(0, nmax)`` per sub-block; 0 where ``d == 0`` (fresh buffer)."""
    B = xb.shape[0]
    g = xb.reshape(B, -1, size)
    dz = d == 0
    dsafe = torch.where(dz, torch.ones_like(d), d)
    l = levels((g + dm.unsqueeze(-1)) / dsafe.unsqueeze(-1), 0, nmax)
    return torch.where(dz.unsqueeze(-1), torch.zeros_like(l), l).to(torch.int32).reshape(B, QK_K)


def _q2_k(xb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
    B = xb.shape[0]
    if wb is None:
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
        d = torch.where(has_s, cdiv(max_scale, 15.0), zero)
        dmin = torch.where(has_m, cdiv(max_min, 15.0), zero)
    else:
        wt, sw = _imatrix_weights(xb, wb, 16, 1.0)
        scales, mins = make_qkx3_quants(_groups_t(xb, 16), wt, 3)
        d, ls = make_qp_quants(scales.reshape(B, 16).t().contiguous(), sw, 15)
        dmin, lm = make_qp_quants(mins.reshape(B, 16).t().contiguous(), sw, 15)
        ls, lm = ls.t(), lm.t()
    sc = (ls | (lm << 4)) & 0xFF
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


def _q3_k(xb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
    B = xb.shape[0]
    if wb is None:
        scales = make_q3_quants(_groups_t(xb, 16), 4).reshape(B, 16)
        max_scale = first_absmax(scales, 1)
        has = max_scale != 0
        iscale = cdiv(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
        ls = levels(iscale.unsqueeze(1) * scales, -32, 31).to(torch.int32) + 32
        ls = torch.where(has.unsqueeze(1), ls, torch.zeros_like(ls))
        d = torch.where(has, cdiv(1.0, iscale), torch.zeros_like(iscale))
        keep = torch.zeros(B, 16, 16, dtype=torch.float32, device=xb.device)  # fresh level buffer
    else:
        x2 = xb * xb
        sigma2 = cdiv(2 * seq_sum(x2, 1), float(QK_K))
        w = wb * sqrtf(sigma2.unsqueeze(1) + x2)
        wt = _groups_t(w, 16)
        sw = seq_sum(wt, 0).reshape(B, 16).t().contiguous()
        scales, Ls = make_qx_quants(_groups_t(xb, 16), 4, wt)
        keep = Ls.t().reshape(B, 16, 16)  # the search's levels stay where d == 0
        d, ls = make_qx_quants(scales.reshape(B, 16).t().contiguous(), 32, sw)
        ls = ls.t().to(torch.int32)
    dq = fp16_round(d).unsqueeze(1) * (ls - 32).to(torch.float32)  # [B, 16]
    g = xb.reshape(B, 16, 16)
    nz = dq != 0
    lq = levels(g / torch.where(nz, dq, torch.ones_like(dq)).unsqueeze(2), -4, 3) + 4
    L = torch.where(nz.unsqueeze(2), lq, keep).to(torch.int32).reshape(B, QK_K)
    hbit = (L > 3).to(torch.int32)
    L = L - 4 * hbit
    bitw = (1 << torch.arange(8, device=xb.device, dtype=torch.int32)).view(1, 8, 1)
    hmask = (hbit.reshape(B, 8, 32) * bitw).sum(1)  # distinct bits: the sum is an OR
    q = L.reshape(B, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(B, 64)
    return torch.cat(
        [hmask.to(torch.uint8), qs.to(torch.uint8), _pack_q3_scales(ls), fp16_bytes(d.unsqueeze(1))], dim=1
    )


def _k4_head(xb: torch.Tensor, wb: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, ...]:
    """Q4_K/Q5_K: (d, dmin) float32 [B], packed scale bytes [B, 12], levels int32 [B, 256]."""
    B = xb.shape[0]
    if wb is None:
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
        d = cdiv(max_scale, 63.0)
        dmin = cdiv(max_min, 63.0)
    else:
        wt, sw = _imatrix_weights(xb, wb, 32, 2.0)
        scales, mins = make_qkx3_quants(_groups_t(xb, 32), wt, nmax)
        d, ls = make_qp_quants(scales.reshape(B, 8).t().contiguous(), sw, 63)
        dmin, lm = make_qp_quants(mins.reshape(B, 8).t().contiguous(), sw, 63)
        ls, lm = ls.t().clamp(max=63), lm.t().clamp(max=63)  # levels are <= 63 already
    packed = pack_scale_min_k4(ls, lm)
    sc, m = unpack_scale_min_k4(packed)
    dd = fp16_round(d).unsqueeze(1) * sc.to(torch.float32)
    dm = fp16_round(dmin).unsqueeze(1) * m.to(torch.float32)
    return d, dmin, packed, _affine_requant(xb, dd, dm, 32, nmax)


def _q4_k(xb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
    B = xb.shape[0]
    d, dmin, packed, L = _k4_head(xb, wb, 15)
    L = L.reshape(B, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).to(torch.uint8).reshape(B, 128)
    return torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1)), packed, qs], dim=1)


def _q5_k(xb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
    B = xb.shape[0]
    d, dmin, packed, L = _k4_head(xb, wb, 31)
    L = L.reshape(B, 8, 32)
    shifts = torch.arange(8, device=xb.device, dtype=torch.int32).reshape(1, 8, 1)
    qh = (((L >> 4) & 1) << shifts).sum(dim=1).to(torch.uint8)  # distinct bits: sum is OR
    lo = (L & 0xF).reshape(B, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).to(torch.uint8).reshape(B, 128)
    return torch.cat([fp16_bytes(d.unsqueeze(1)), fp16_bytes(dmin.unsqueeze(1)), packed, qh, qs], dim=1)


def _q6_k(xb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
    B = xb.shape[0]
    scales, Ls = make_qx_quants(_groups_t(xb, 16), 32, None if wb is None else _groups_t(wb, 16))
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


def _q8_k(xb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
    """ggml's Q8_K scale (-127/max) with Rust rounding; mistral.rs ignores an imatrix here."""
    B = xb.shape[0]
    mx = first_absmax(xb, 1)
    empty = mx == 0
    iscale = cdiv(-127.0, torch.where(empty, torch.ones_like(mx), mx))
    # ``v.min(127.) as i8``: Rust's float->int cast saturates (NaN -> 0).
    v = roundf(iscale.unsqueeze(1) * xb).clamp_(max=127.0).nan_to_num_(nan=0.0).clamp_(min=-128.0)
    qs = torch.where(empty.unsqueeze(1), torch.zeros_like(v), v).to(torch.int32)
    bsums = qs.reshape(B, 16, 16).sum(2) & 0xFFFF  # ``sum as i16``: the low 16 bits
    bsums = torch.where(bsums > 32767, bsums - 65536, bsums).to(torch.int16)
    d = torch.where(empty, torch.zeros_like(mx), cdiv(1.0, iscale))
    return torch.cat(
        [f32_bytes(d.unsqueeze(1)), qs.to(torch.int8).view(torch.uint8), bsums.contiguous().view(torch.uint8)], dim=1
    )


_BLOCKS = {
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q8_K": _q8_k,
}

CANDLE_TYPES = tuple(_BLOCKS)


# Byte offsets of the fp16 super-block scales (d, and dmin where there is one) in each block.
_SCALE_BYTES = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}


def quantize_rows_candle(
    ggml_name: str, x: torch.Tensor, qw: torch.Tensor | None = None, *, allow_nonfinite: bool = False
) -> torch.Tensor:
    """Quantize ``x`` [rows, n] (n a multiple of 256) to ``ggml_name`` blocks exactly as mistral.rs
    0.9.5's ISQ does; returns uint8 [rows, n/256 * type_size] in the standard GGML layout.

    ``qw`` is the per-column importance [n] (what mistral.rs reads from an imatrix for this
    tensor); with it the ``from_float_imatrix`` search runs (Q8_K ignores it, as mistral.rs
    does). Runs on ``x``'s device; values must be finite.

    candle's imatrix searches divide by the summed importance of a sub-block, so importance
    that is zero over a whole 16/32-column group (Q3_K), or a whole 256-column block (Q2_K,
    Q4_K, Q5_K), gives NaN block scales, in mistral.rs too. Such a result raises
    :class:`ImatrixError` unless ``allow_nonfinite`` asks for mistral.rs's bytes regardless.
    """
    name = ggml_name.upper()
    fn = _BLOCKS.get(name)
    if fn is None:
        raise UnknownTypeError(f"candle k-quant type {ggml_name!r} is not one of {', '.join(CANDLE_TYPES)}")
    if x.dim() != 2 or x.shape[1] % QK_K != 0:
        raise ShapeError(f"{name} (candle) needs a 2-D tensor whose rows are a multiple of {QK_K}; got shape {tuple(x.shape)}")
    rows, n = x.shape
    x = x.to(torch.float32).contiguous()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputValueError(f"{name} (candle): tensor of shape {tuple(x.shape)} holds NaN or inf values")
    qwb = None
    if qw is not None and name != "Q8_K":
        if qw.numel() != n:
            raise ImatrixError(f"{name} (candle): importance has {qw.numel()} values, the tensor has {n} columns")
        qwb = qw.reshape(n // QK_K, QK_K).to(device=x.device, dtype=torch.float32)
        if not bool(torch.isfinite(qwb).all()):
            raise ImatrixError(f"{name} (candle): importance vector holds NaN or inf values")
    if x.numel() == 0:
        return torch.empty(rows, 0, dtype=torch.uint8, device=x.device)
    # block k of the tensor takes importance block k % (n/256), as candle's ``imatrix_row``
    out = quantize_block_chunks(x, qwb, QK_K, fn, _CHUNK, _CHUNK_ACCEL)
    blocks = out.reshape(-1, out.shape[1] // (n // QK_K))
    if qwb is not None and not allow_nonfinite:
        lo, hi = _SCALE_BYTES[name]
        bad = int((~torch.isfinite(blocks[:, lo:hi].contiguous().view(torch.float16))).any(1).sum())
        if bad:
            raise ImatrixError(
                f"{name} (candle): {bad} of {blocks.shape[0]} blocks get NaN/inf scales from this importance "
                f"(all-zero importance over whole sub-blocks; mistral.rs 0.9.5 writes the same broken blocks)"
            )
    return out
