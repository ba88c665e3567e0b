"""Symmetric scale searches of ggml-quants.c (``make_qx_quants``, ``make_q3_quants``), batched.

Each function works on many independent groups at once: ``x`` is float32 ``[G, n]`` and every
group gets the result that the C function would give for that group alone. Sums that decide
bytes are accumulated sequentially along the group (the C loop order), vectorized across groups;
internally groups sit on the last axis (``[n, G]``) so each sequential step touches contiguous
memory.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from quantbench.quant.ggml.common import (
    GROUP_MAX_EPS,
    cdiv,
    clamped_levels_,
    const,
    first_absmax,
    nearest_int,
    seq_sum,
    sqrtf,
    sync_free,
)


def _f32(v: float) -> float:
    return float(np.float32(v))


def _rmse_weights(xt: torch.Tensor, rmse_type: int) -> torch.Tensor:
    if rmse_type == 1:
        return xt * xt
    if rmse_type == 2:
        return torch.ones_like(xt)
    if rmse_type == 3:
        return xt.abs()
    return sqrtf(xt.abs())


_CHUNK_GROUPS = 8192  # groups per pass on CPU: keeps the [n, 19, groups] candidate tensors cache-sized
_CHUNK_GROUPS_ACCEL = 1 << 19  # on accelerators launch count dominates: few, large passes


@lru_cache(maxsize=None)
def _cand_constants(nmax: int) -> tuple[float, ...]:
    """``nmax + 0.1f*is`` for is = -9..9 (skipping 0), in float32 as the C computes it."""
    return tuple(_f32(np.float32(nmax) + np.float32(0.1) * np.float32(k)) for k in range(-9, 10) if k != 0)


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
    x = x.to(torch.float32)
    if G == 0:
        return x.new_zeros(0), torch.zeros(0, n, dtype=torch.int32, device=x.device)
    if qw is not None:
        qw = qw.to(torch.float32).expand(G, n)
    step = _CHUNK_GROUPS if x.device.type == "cpu" else _CHUNK_GROUPS_ACCEL
    bufs = _Buffers(n, 19, min(G, step), x.device) if rmse_type > 0 else None
    scales, Ls = [], []
    for s in range(0, G, step):
        sc, L = _make_qx_quants_chunk(
            x[s : s + step], nmax, rmse_type, None if qw is None else qw[s : s + step], bufs
        )
        scales.append(sc)
        Ls.append(L)
    if len(scales) == 1:
        return scales[0], Ls[0]
    return torch.cat(scales), torch.cat(Ls)


class _Buffers:
    """Scratch tensors reused across chunks: fresh multi-MB allocations cost page faults."""

    def __init__(self, n: int, k: int, g: int, device: torch.device) -> None:
        self.l = torch.empty(n, k, g, dtype=torch.float32, device=device)
        self.t = torch.empty(n, k, g, dtype=torch.float32, device=device)

    def views(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.l[:, :, :g], self.t[:, :, :g]


def _make_qx_quants_chunk(
    x: torch.Tensor, nmax: int, rmse_type: int, qw: torch.Tensor | None, bufs: _Buffers | None
) -> tuple[torch.Tensor, torch.Tensor]:
    G, n = x.shape
    mx = first_absmax(x, 1)
    xt = x.t().contiguous()  # [n, G]
    zero = mx.abs() < GROUP_MAX_EPS
    lo, hi = float(-nmax), float(nmax - 1)

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        # |iscale * x| <= nmax + 1 here, so torch.round is the magic trick exactly.
        return torch.round(iscale * xt).clamp_(lo, hi)

    def finish(scale: torch.Tensor, lf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.where(zero, torch.zeros_like(scale), scale)
        L = torch.where(zero.unsqueeze(0), torch.zeros_like(lf), lf + nmax)
        return scale, L.to(torch.int32).t().contiguous()

    if rmse_type <= 0:
        iscale = cdiv(-nmax, mx)
        l = levels(iscale)
        if rmse_type == 0:
            return finish(cdiv(1.0, iscale), l)

    rtype = abs(rmse_type)
    w = qw.t().contiguous() if qw is not None else _rmse_weights(xt, rtype)
    wx = w * xt  # C: w*x[i]*l evaluates (w*x[i]) first

    if rmse_type < 0:
        sumlx, suml2 = seq_sum(wx * l, dim=0), seq_sum(w * l * l, dim=0)
        scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
        inv = cdiv(1.0, iscale)
        return finish(torch.where(suml2 > 0, 0.5 * (scale + inv), inv), l)

    # Candidate 0 is the initial -nmax/max, 1..18 the -(nmax + 0.1*is)/max tries; all are
    # evaluated at once ([n, 19, G]), then chosen in C order (a later one wins only if strictly
    # better than the best so far).
    assert bufs is not None
    c = const((float(nmax),) + _cand_constants(nmax), x)
    isc = (-c).unsqueeze(1) / mx.unsqueeze(0)  # [19, G], true division
    l, t = bufs.views(G)
    torch.mul(isc.unsqueeze(0), xt.unsqueeze(1), out=l)
    l.round_().clamp_(lo, hi)  # |.| <= nmax + 1: round is the bit trick exactly
    torch.mul(wx.unsqueeze(1), l, out=t)
    sumlx = seq_sum(t, dim=0)  # [19, G]
    torch.mul(w.unsqueeze(1), l, out=t)
    t.mul_(l)
    suml2 = seq_sum(t, dim=0)

    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(mx))
    best = scale * sumlx[0]
    best_k = torch.zeros(G, dtype=torch.int64, device=x.device)
    new_scale = sumlx / suml2
    new_best = new_scale * sumlx
    ok = suml2 > 0
    lhs = sumlx * sumlx
    for k in range(1, c.numel()):
        better = ok[k] & (lhs[k] > best * suml2[k])
        scale = torch.where(better, new_scale[k], scale)
        best = torch.where(better, new_best[k], best)
        best_k = torch.where(better, k, best_k)
    return finish(scale, levels(isc.gather(0, best_k.unsqueeze(0)).squeeze(0)))


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
    mx = first_absmax(x, 1)
    zero = mx.abs() < GROUP_MAX_EPS
    lo, hi = float(-nmax), float(nmax - 1)
    iscale = cdiv(-nmax, mx)
    l = torch.round(iscale * xt).clamp_(lo, hi)  # bounded: round == nearest_int

    if do_rmse:
        w = xt * xt
        wx = w * xt
        sumlx = seq_sum(wx * l, dim=0)
        suml2 = seq_sum(w * l * l, dim=0)
        if sync_free(x):
            _q3_sweeps_masked(xt, w, wx, l, sumlx, suml2, nmax)
            scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
            return _q3_finish(scale, l, zero, nmax)
        # Sweeps only revisit groups that changed in the previous one: a sweep without changes
        # would repeat identically, which is exactly C's per-group early exit.
        idx = torch.arange(G, device=x.device)
        xa, wa, wxa, la, slxa, sl2a = xt, w, wx, l.clone(), sumlx.clone(), suml2.clone()
        for _ in range(5):
            changed = torch.zeros(idx.numel(), dtype=torch.bool, device=x.device)
            for i in range(n):
                Li = la[i]
                slx = slxa - wxa[i] * Li
                sl2 = sl2a - wa[i] * Li * Li
                # x*sl2/slx may be huge or non-finite when slx is tiny: keep C's bit-trick result.
                new_l = nearest_int(xa[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
                slx2 = slx + wxa[i] * new_l
                sl22 = sl2 + wa[i] * new_l * new_l
                accept = (
                    (slx > 0)
                    & (new_l != Li)
                    & (sl22 > 0)
                    & (slx2 * slx2 * sl2a > slxa * slxa * sl22)
                )
                la[i] = torch.where(accept, new_l, Li)
                slxa = torch.where(accept, slx2, slxa)
                sl2a = torch.where(accept, sl22, sl2a)
                changed |= accept
            l[:, idx] = la
            sumlx[idx] = slxa
            suml2[idx] = sl2a
            if not bool(changed.any()):
                break
            idx = idx[changed]
            xa, wa, wxa, la = xa[:, changed], wa[:, changed], wxa[:, changed], la[:, changed]
            slxa, sl2a = slxa[changed], sl2a[changed]
        scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    else:
        scale = cdiv(1.0, iscale)
    return _q3_finish(scale, l, zero, nmax)


def _q3_finish(
    scale: torch.Tensor, l: torch.Tensor, zero: torch.Tensor, nmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero.unsqueeze(0), torch.zeros_like(l), l + nmax)
    return scale, L.to(torch.int32).t().contiguous()


def _q3_sweeps_masked(
    xt: torch.Tensor,
    w: torch.Tensor,
    wx: torch.Tensor,
    l: torch.Tensor,
    sumlx: torch.Tensor,
    suml2: torch.Tensor,
    nmax: int,
) -> None:
    """In place on ``l``/``sumlx``/``suml2``: the five refinement sweeps without host syncs.

    A group leaves after a sweep without changes (C's early exit); here it stays but is masked
    from accepting anything, which leaves it exactly as C does.
    """
    active = torch.ones(xt.shape[1], dtype=torch.bool, device=xt.device)
    for _ in range(5):
        active &= _q3_sweep(xt, w, wx, l, sumlx, suml2, nmax, active)


def _q3_sweep(
    xt: torch.Tensor,
    w: torch.Tensor,
    wx: torch.Tensor,
    l: torch.Tensor,
    sumlx: torch.Tensor,
    suml2: torch.Tensor,
    nmax: int,
    active: torch.Tensor,
) -> torch.Tensor:
    """One sweep over the positions of every group, only ``active`` groups accepting changes;
    returns which groups changed."""
    changed = torch.zeros_like(active)
    for i in range(xt.shape[0]):
        Li = l[i]
        slx = sumlx - wx[i] * Li
        sl2 = suml2 - w[i] * Li * Li
        new_l = clamped_levels_(xt[i] * sl2 / slx, -nmax, nmax - 1)
        slx2 = slx + wx[i] * new_l
        sl22 = sl2 + w[i] * new_l * new_l
        accept = (slx > 0) & (new_l != Li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
        accept &= active
        torch.where(accept, new_l, Li, out=Li)
        torch.where(accept, slx2, sumlx, out=sumlx)
        torch.where(accept, sl22, suml2, out=suml2)
        changed |= accept
    return changed
