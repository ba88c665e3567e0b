"""Batched ports of ggml's affine level searches (``make_qkx2_quants``, ``make_qkx3_quants``,
``make_qp_quants``), bit-identical to the C float32 arithmetic.

Every function works on many groups at once: ``x`` is ``[G, n]`` (one group per row) and the
result is one scale (and min) per group plus the integer levels. Loops in Python run only over
the ``n`` positions of a group (so sums accumulate in C order), over candidate scales where the
C code updates a running best, or over refinement passes.

Two torch division traps break bit-exactness: ``python_scalar / tensor`` is computed as
``reciprocal(tensor) * scalar`` on every device (a quarter of results off by an ulp), and on
CUDA ``tensor / cpu_scalar`` as ``tensor * (1/scalar)``. Divisions here therefore always divide
float32 tensors on the input's device (:func:`quantbench.quant.ggml.common.cdiv`). torch's float32 ``sqrt`` on CPU is not
correctly rounded either (:func:`quantbench.quant.ggml.common.sqrtf`).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from quantbench.quant.ggml.common import (
    GROUP_MAX_EPS,
    cdiv,
    clamped_levels_,
    const,
    nearest_int,
    seq_sum,
    sync_free,
)

# Elements of one [n, groups] working tensor: cache-sized on CPU, large on accelerators.
_CHUNK_ELEMS = 1 << 18
_CHUNK_ELEMS_ACCEL = 1 << 26


def _f32(v: float, ref: torch.Tensor) -> torch.Tensor:
    """A float32 constant on ``ref``'s device, so arithmetic with it stays true float32."""
    return const(v, ref)


def _f32_cpu(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


@lru_cache(maxsize=None)
def _qkx_candidates(rmin: float, rdelta: float, nstep: int, nmax: int) -> tuple[float, ...]:
    """``rmin + rdelta*is + nmax`` for is = 0..nstep, in float32 left to right as C computes it."""
    return tuple(
        float((_f32_cpu(rmin) + _f32_cpu(rdelta) * _f32_cpu(float(i))) + _f32_cpu(float(nmax)))
        for i in range(nstep + 1)
    )


@lru_cache(maxsize=None)
def _qp_candidates(nmax: int) -> tuple[float, ...]:
    """``nmax + 0.1f*is`` for is = -4..4 (skipping 0), in float32 as C computes it."""
    return tuple(
        float(_f32_cpu(0.1) * _f32_cpu(float(k)) + _f32_cpu(float(nmax))) for k in (-4, -3, -2, -1, 1, 2, 3, 4)
    )


def _levels_(v: torch.Tensor, nmax: int, in_range: bool) -> torch.Tensor:
    """In place: ``MAX(0, MIN(nmax, nearest_int(v)))`` as exact float32 values.

    ``in_range`` promises |v| <= 2^22, where ggml's magic-number rounding is round-half-even
    (``torch.round``); otherwise the exact integer emulation is used.
    """
    if in_range:
        return v.round_().clamp_(0, nmax)
    return nearest_int(v).clamp_(0, nmax).to(torch.float32)


def _levels_checked_(v: torch.Tensor, nmax: int) -> torch.Tensor:
    """:func:`_levels_`, choosing the fast path from ``v`` itself (one min/max pass).

    Off the CPU that choice would be a host sync: the exact levels are computed directly.
    """
    if sync_free(v):
        return clamped_levels_(v, 0, nmax)
    lo, hi = torch.aminmax(v)
    return _levels_(v, nmax, bool((lo >= -4194303.0) & (hi <= 4194303.0)))


def _qkx_search_chunk(
    xt: torch.Tensor,
    wt: torch.Tensor,
    hi: torch.Tensor,
    sum_w: torch.Tensor,
    sum_x: torch.Tensor,
    best: torch.Tensor,
    mn: torch.Tensor,
    cand: torch.Tensor,
    nmax: int,
    use_mad: bool,
    active: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C candidate loop for a chunk of groups ([n, G] inputs), one candidate at a time.

    It cannot be evaluated for all candidates at once: an accepted candidate replaces ``min``,
    which both the next candidate's ``iscale = c/(max - min)`` and its levels depend on.
    Returns ``(won, scale, min, lev_iscale, lev_min)``: for groups where some candidate won,
    its scale and min, and the (iscale, min) its levels came from, so that the levels are
    rebuilt once at the end instead of being carried through every candidate.
    ``active`` (or None: all) masks the groups allowed to take a candidate.
    """
    n, G = xt.shape
    scale = torch.zeros_like(hi)
    lev_iscale = torch.zeros_like(hi)
    lev_min = torch.zeros_like(hi)
    won = torch.zeros(G, dtype=torch.bool, device=xt.device)
    # The three per-position products share one buffer so that one sequential sum covers them:
    # [n, 3, G] on the CPU (each position's slice contiguous for the add loop), [3, n, G] on
    # CUDA (each product contiguous for vectorized kernels, summed by one scan over dim 1).
    on_cpu = xt.device.type == "cpu"
    buf = torch.empty((n, 3, G) if on_cpu else (3, n, G), dtype=torch.float32, device=xt.device)
    parts = buf.unbind(1) if on_cpu else buf.unbind(0)
    for c in cand:
        iscale = cdiv(c, hi - mn)
        v = xt - mn
        Laux = _levels_checked_(v.mul_(iscale), nmax)
        wl = torch.mul(wt, Laux, out=parts[0])
        torch.mul(wl, Laux, out=parts[1])
        torch.mul(wl, xt, out=parts[2])
        sum_l, sum_l2, sum_xl = seq_sum(buf, dim=0 if on_cpu else 1).unbind(0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = cdiv(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = cdiv(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min.masked_fill_(pos, 0.0)
        this_scale = torch.where(pos, cdiv(sum_xl, sum_l2), this_scale)
        d = torch.mul(Laux, this_scale, out=parts[0])
        d.add_(this_min).sub_(xt)
        d = d.abs_() if use_mad else d.mul_(d)
        cur = seq_sum(d.mul_(wt), dim=0)
        take = (D > 0) & (cur < best)  # NaN errors never compare smaller, as in C
        if active is not None:
            take &= active
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        lev_iscale = torch.where(take, iscale, lev_iscale)
        lev_min = torch.where(take, mn, lev_min)
        mn = torch.where(take, this_min, mn)
        won |= take
    return won, scale, mn, lev_iscale, lev_min


def make_qkx_quants(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared body of ``make_qkx2_quants`` / ``make_qkx3_quants`` (they differ only in guards
    that are equivalent for finite input and in qkx3 accepting no weights).

    Args: ``x`` float32 ``[G, n]``; ``weights`` ``[G, n]`` or None (then ``w = x*x``); ``nmax``
    the top level; candidate inverse scales ``(rmin + rdelta*is + nmax)/(max - min)`` for
    ``is = 0..nstep`` (``min`` being the best offset so far); ``use_mad`` selects |err| over err^2.
    Returns ``(scale [G], the_min [G], L [G, n] int32)`` where a value is ``scale*L - the_min``
    (``the_min`` is C's ``*the_min``, i.e. minus the fitted offset, >= 0).
    """
    x = x.to(torch.float32)
    w = x * x if weights is None else weights.to(torch.float32)
    G, n = x.shape
    if G == 0:
        z = x.new_zeros(0)
        return z, z, torch.zeros(0, n, dtype=torch.int32, device=x.device)
    xt = x.t().contiguous()  # [n, G]: per-position slices are contiguous
    wt = w.t().contiguous()

    # Group min/max (the sign of a zero extreme never reaches the output), and sum_w/sum_x
    # accumulated as the C loop does, seeded with the first element.
    lo = x.amin(dim=1)
    hi = x.amax(dim=1)
    sum_w = seq_sum(wt, dim=0, from_first=True)
    sum_x = seq_sum(wt * xt, dim=0, from_first=True)
    mn = torch.where(lo > 0, torch.zeros_like(lo), lo)
    degenerate = hi == mn  # C returns early (max == min): scale 0, levels 0, min untouched
    rng = torch.where(degenerate, torch.ones_like(hi), hi - mn)  # keeps them off the slow path

    iscale = cdiv(float(nmax), rng)
    scale = cdiv(1.0, iscale)
    v = xt - mn
    L = _levels_checked_(v.mul_(iscale), nmax)  # [n, G]
    d0 = scale * L
    d0.add_(mn).sub_(xt)
    d0 = d0.abs_() if use_mad else d0.mul_(d0)
    best = seq_sum(d0.mul_(wt), dim=0)

    if nstep >= 1:
        cand = const(_qkx_candidates(rmin, rdelta, nstep, nmax), x)
        if sync_free(x):
            # Search every group (a compaction would need a host sync); degenerate ones may
            # never take a candidate.
            idx, active = None, ~degenerate
        else:
            # Search only non-degenerate groups.
            idx = (~degenerate).nonzero().squeeze(1) if bool(degenerate.any()) else None
            active = None
        sx, sw_, sh, ssw, ssx, sb, sm = (
            (t if idx is None else t.index_select(-1, idx)) for t in (xt, wt, hi, sum_w, sum_x, best, mn)
        )
        budget = _CHUNK_ELEMS if x.device.type == "cpu" else _CHUNK_ELEMS_ACCEL
        gc = max(1, budget // n)
        parts = [
            _qkx_search_chunk(sx[:, s:s + gc], sw_[:, s:s + gc], sh[s:s + gc], ssw[s:s + gc], ssx[s:s + gc],
                              sb[s:s + gc], sm[s:s + gc], cand, nmax, use_mad,
                              None if active is None else active[s:s + gc])
            for s in range(0, sx.shape[1], gc)
        ]
        if parts:
            won, c_scale, c_min, lev_iscale, lev_min = (torch.cat(p) for p in zip(*parts))
            v = sx - lev_min
            c_L = _levels_checked_(v.mul_(lev_iscale), nmax)
            if idx is not None:
                won = torch.zeros(G, dtype=torch.bool, device=x.device).index_copy_(0, idx, won)
                c_scale = torch.zeros_like(scale).index_copy_(0, idx, c_scale)
                c_min = torch.zeros_like(mn).index_copy_(0, idx, c_min)
                c_L = torch.zeros_like(L).index_copy_(1, idx, c_L)
            scale = torch.where(won, c_scale, scale)
            mn = torch.where(won, c_min, mn)
            L = torch.where(won.unsqueeze(0), c_L, L)

    scale = torch.where(degenerate, torch.zeros_like(scale), scale)
    L = torch.where(degenerate.unsqueeze(0), torch.zeros_like(L), L)
    return scale, -mn, L.t().to(torch.int32)


def make_qkx2_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml ``make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad)``
    over ``[G, n]`` groups; returns ``(scale, the_min, L)`` (see :func:`make_qkx_quants`)."""
    return make_qkx_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad)


def make_qkx3_quants(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml ``make_qkx3_quants`` over ``[G, n]`` groups (``weights=None`` means ``x*x``);
    returns ``(scale, the_min, L)`` (see :func:`make_qkx_quants`). Q4_1/Q5_1 with imatrix use
    ``make_qkx3_quants(xb, w, 15 or 31, -0.9, 0.05, 36, False)``."""
    return make_qkx_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad)


def make_qp_quants(x: torch.Tensor, quant_weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_qp_quants(n, nmax, x, L, quant_weights)`` over ``[G, n]`` groups.

    Quantizes non-negative values (sub-block scales or mins) to ``0..nmax`` with one scale per
    group. Returns ``(scale [G], L [G, n] int32)``; ``L`` holds what C's ``uint8_t`` array holds
    (levels of negative inputs wrap modulo 256 exactly as there).
    """
    x = x.to(torch.float32)
    w = quant_weights.to(torch.float32)
    G, n = x.shape
    fmax = float(nmax)
    xt = x.t().contiguous()  # per-position rows, contiguous for the loops below

    mx = torch.zeros(G, dtype=torch.float32, device=x.device)
    for i in range(n):
        mx = torch.where(mx > xt[i], mx, xt[i])
    allzero = mx < _f32(GROUP_MAX_EPS, x)
    cands = const(_qp_candidates(nmax), x)

    iscale = cdiv(fmax, mx).unsqueeze(1)  # [G, 1]
    L = nearest_int(iscale * x) & 0xFF
    scale = cdiv(1.0, iscale)
    diff = x - scale * L.to(torch.float32)
    best = seq_sum(((w * diff) * diff).t(), dim=0)

    for num in cands:
        iscale_is = cdiv(num, mx).unsqueeze(1)
        scale_is = cdiv(1.0, iscale_is)
        l = nearest_int(iscale_is * x).clamp_(max=nmax).to(torch.float32)
        diff = x - scale_is * l
        mse = seq_sum(((w * diff) * diff).t(), dim=0)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd.unsqueeze(1), iscale_is, iscale)

    li = nearest_int(iscale * x).clamp_(max=nmax)
    lf = li.to(torch.float32)
    L = li & 0xFF
    wx = w * x
    sumlx = seq_sum((wx * lf).t(), dim=0)
    suml2 = seq_sum(((w * lf) * lf).t(), dim=0)

    active = ~allzero
    wt, wxt, Lt = w.t().contiguous(), wx.t().contiguous(), L.t().contiguous()
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(n):
            wi = wt[i]
            wxi = wxt[i]
            Li = Lt[i]
            Lf = Li.to(torch.float32)
            slx = sumlx - wxi * Lf
            sl2 = suml2 - (wi * Lf) * Lf
            ok = active & (slx > 0) & (sl2 > 0)
            new_l = nearest_int(cdiv(xt[i] * sl2, slx)).clamp_(max=nmax)
            ok &= new_l != Li
            nf = new_l.to(torch.float32)
            slx = slx + wxi * nf
            sl2 = sl2 + (wi * nf) * nf
            acc = ok & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            Lt[i] = torch.where(acc, new_l & 0xFF, Li)
            sumlx = torch.where(acc, slx, sumlx)
            suml2 = torch.where(acc, sl2, suml2)
            changed |= acc
        active &= changed
        # A sweep that changes nothing would repeat itself: C stops there. Off the CPU all five
        # run (the extra ones are no-ops) rather than read ``active`` on the host.
        if not sync_free(x) and not bool(active.any()):
            break

    zero = torch.zeros_like(sumlx)
    out = torch.where(suml2 > 0, cdiv(sumlx, suml2), zero)
    out = torch.where(allzero, zero, out)
    L = torch.where(allzero.unsqueeze(0), torch.zeros_like(Lt), Lt).t().contiguous()
    return out, L
