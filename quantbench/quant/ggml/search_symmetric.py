"""Symmetric scale searches of ggml-quants.c (``make_qx_quants``, ``make_q3_quants``), batched.

Each function works on many independent groups at once: ``x`` is float32 ``[G, n]`` and every
group gets the result that the C function would give for that group alone. Sums that decide
bytes are accumulated sequentially along the group (the C loop order), vectorized across groups;
internally groups sit on the last axis (``[n, G]``) so each sequential step touches contiguous
memory.
"""

from __future__ import annotations

import numpy as np
import torch

from quantbench.quant.ggml.common import GROUP_MAX_EPS

_MAGIC = 12582912.0  # 1.5 * 2**23


def nearest_int_exact(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit trick, reproduced for *every* float (int32 result).

    Inside ``|v| < 2**22`` this is round-half-even; outside (huge ratios, inf, NaN) it returns
    the same garbage the C does, which matters where the result is clamped afterwards.
    """
    bits = (v + _MAGIC).view(torch.int32)
    return (bits & 0x7FFFFF) - 0x400000


def rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """C's ``num / t`` for a constant numerator, correctly rounded.

    Torch evaluates ``python_scalar / tensor`` as ``t.reciprocal() * num`` (two roundings),
    which differs from the C division in ~25% of cases; dividing a filled tensor is exact.
    """
    return torch.full_like(t, num) / t


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``, correctly rounded.

    Torch's float32 CPU sqrt (vectorized, AVX2 build) is off by one ulp for some inputs; the
    float64 sqrt rounded to float32 is exact (53 >= 2*24 + 2 bits, so no double rounding).
    """
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def _f32(v: float) -> float:
    return float(np.float32(v))


def _first_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Signed value of the first element of largest magnitude along ``dim`` (C's strict ``>`` scan)."""
    idx = x.abs().argmax(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """``s = 0; for i: s += t[i]`` over the first axis of ``[n, G]``."""
    acc = torch.zeros_like(t[0])
    for i in range(t.shape[0]):
        acc.add_(t[i])
    return acc


def _rmse_weights(xt: torch.Tensor, rmse_type: int) -> torch.Tensor:
    if rmse_type == 1:
        return xt * xt
    if rmse_type == 2:
        return torch.ones_like(xt)
    if rmse_type == 3:
        return xt.abs()
    return sqrtf(xt.abs())


def make_qx_quants(
    x: torch.Tensor,
    nmax: int,
    rmse_type: int = 1,
    qw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Port of ``make_qx_quants(n, nmax, x, L, rmse_type, qw)`` over ``G`` groups of ``n``.

    Args:
        x: float32 ``[G, n]`` values, one group per row.
        nmax: levels are ``-nmax .. nmax-1`` (e.g. 4 for Q3_K, 32 for Q6_K, 8 for Q4_0, 16 for Q5_0).
        rmse_type: as in C. 0 = plain ``1/iscale``; ``k > 0`` = weighted least-squares refinement
            over 18 extra scales; ``-k`` = one refinement step averaged with ``1/iscale``. The
            implicit weight (when ``qw`` is None) is x², 1, |x|, sqrt|x| for k = 1, 2, 3, >=4.
        qw: optional float32 weights ``[G, n]`` (or broadcastable to it), used instead of the
            implicit ones when given (only where ``rmse_type != 0``, like the C).

    Returns:
        ``(scale [G] float32, L [G, n] int32)`` with ``L`` in ``0 .. 2*nmax-1`` (``l + nmax``), and
        ``(0, all zeros)`` for groups whose max |x| is below ``GROUP_MAX_EPS``.
    """
    G, n = x.shape
    xt = x.t().contiguous()  # [n, G]
    mx = _first_absmax(xt, 0)
    zero = mx.abs() < GROUP_MAX_EPS
    lo, hi = float(-nmax), float(nmax - 1)

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        # |iscale * x| <= nmax + 1 here, so torch.round is the magic trick exactly.
        return torch.round(iscale * xt).clamp_(lo, hi)

    iscale = rdiv(-nmax, mx)
    l = levels(iscale)

    def finish(scale: torch.Tensor, lf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.where(zero, torch.zeros_like(scale), scale)
        L = torch.where(zero.unsqueeze(0), torch.zeros_like(lf), lf + nmax)
        return scale, L.to(torch.int32).t().contiguous()

    if rmse_type == 0:
        return finish(rdiv(1.0, iscale), l)

    return_early = rmse_type < 0
    rmse_type = abs(rmse_type)
    if qw is not None:
        w = qw.to(torch.float32).expand(G, n).t().contiguous()
    else:
        w = _rmse_weights(xt, rmse_type)
    wx = w * xt  # C: w*x[i]*l evaluates (w*x[i]) first

    def sums(lf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _seq_sum(wx * lf), _seq_sum(w * lf * lf)

    sumlx, suml2 = sums(l)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    if return_early:
        inv = rdiv(1.0, iscale)
        early = torch.where(suml2 > 0, 0.5 * (scale + inv), inv)
        return finish(early, l)

    best = scale * sumlx
    best_iscale = iscale
    for k in range(-9, 10):
        if k == 0:
            continue
        c = _f32(np.float32(nmax) + np.float32(0.1) * np.float32(k))
        isc = rdiv(-c, mx)
        slx, sl2 = sums(levels(isc))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / sl2
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * slx, best)
        best_iscale = torch.where(better, isc, best_iscale)
    return finish(scale, levels(best_iscale))


def make_q3_quants(x: torch.Tensor, nmax: int, do_rmse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Port of ``make_q3_quants(n, nmax, x, L, do_rmse)`` over ``G`` groups of ``n``.

    With ``do_rmse`` the levels are refined coordinate by coordinate (up to 5 sweeps, each
    accepting a change only if it improves ``sumlx²/suml2``), with x² as the weights.

    Returns:
        ``(scale [G] float32, L [G, n] int32)``, ``L`` in ``0 .. 2*nmax-1``; all-zero groups
        (max |x| < ``GROUP_MAX_EPS``) give ``(0, zeros)``.
    """
    G, n = x.shape
    xt = x.t().contiguous()  # [n, G]
    mx = _first_absmax(xt, 0)
    zero = mx.abs() < GROUP_MAX_EPS
    lo, hi = float(-nmax), float(nmax - 1)
    iscale = rdiv(-nmax, mx)
    l = torch.round(iscale * xt).clamp_(lo, hi)  # bounded: round == nearest_int

    if do_rmse:
        w = xt * xt
        wx = w * xt
        sumlx = _seq_sum(wx * l)
        suml2 = _seq_sum(w * l * l)
        for _ in range(5):
            n_changed = torch.zeros(G, dtype=torch.int32, device=x.device)
            for i in range(n):
                Li = l[i]
                slx = sumlx - wx[i] * Li
                sl2 = suml2 - w[i] * Li * Li
                # x*sl2/slx may be huge or non-finite when slx is tiny: keep C's bit-trick result.
                new_l = nearest_int_exact(xt[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
                slx2 = slx + wx[i] * new_l
                sl22 = sl2 + w[i] * new_l * new_l
                accept = (
                    (slx > 0)
                    & (new_l != Li)
                    & (sl22 > 0)
                    & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                )
                l[i] = torch.where(accept, new_l, Li)
                sumlx = torch.where(accept, slx2, sumlx)
                suml2 = torch.where(accept, sl22, suml2)
                n_changed += accept
            # A sweep without changes would repeat identically, so stopping all groups together
            # once none changed equals C's per-group early exit.
            if not bool(n_changed.any()):
                break
        scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    else:
        scale = rdiv(1.0, iscale)

    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero.unsqueeze(0), torch.zeros_like(l), l + nmax)
    return scale, L.to(torch.int32).t().contiguous()
