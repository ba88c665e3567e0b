"""Batched ports of ggml's affine level searches (``make_qkx2_quants``, ``make_qkx3_quants``,
``make_qp_quants``), bit-identical to the C float32 arithmetic.

Every function works on many groups at once: ``x`` is ``[G, n]`` (one group per row) and the
result is one scale (and min) per group plus the integer levels. Loops in Python run only over
the ``n`` positions of a group (so sums accumulate in C order), over candidate scales where the
C code updates a running best, or over refinement passes. Candidate scales are evaluated all at
once and the C "keep the first strictly better" rule is rebuilt with a first-index argmin.

Two torch traps matter for bit-exactness on CUDA: ``python_scalar / tensor`` is computed as
``reciprocal(tensor) * scalar`` and ``tensor / cpu_scalar`` as ``tensor * (1/scalar)``. Divisions
here therefore always divide by / into float32 tensors on the input's device (:func:`cdiv`).
"""

from __future__ import annotations

import torch

GROUP_MAX_EPS = 1e-15
_MAGIC = 12582912.0  # 1.5 * 2^23
# Elements of one [n, groups, candidates] temporary; bounds memory while keeping ops large.
_CHUNK_ELEMS = 1 << 18


def ggml_nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` exactly, including its out-of-range results (int32).

    Inside |v| <= 2^22 the magic-number trick is round-half-even; outside (or NaN/inf, which
    release builds do not assert on) it returns the low mantissa bits, which we reproduce too.
    """
    r = torch.round(v).to(torch.int32)
    bad = ~(v.abs() <= 4194303.0)
    if bool(bad.any()):
        bits = (v + _MAGIC).view(torch.int32)
        r = torch.where(bad, (bits & 0x007FFFFF) - 0x00400000, r)
    return r


def _f32(v: float, ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=ref.device)


def cdiv(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 ``a / b`` on any device (never a reciprocal-multiply shortcut)."""
    ref = a if isinstance(a, torch.Tensor) else b
    assert isinstance(ref, torch.Tensor)
    if not isinstance(a, torch.Tensor):
        a = _f32(a, ref)
    if not isinstance(b, torch.Tensor):
        b = _f32(b, ref)
    return torch.div(a, b)


def _seq_sum0(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in C loop order starting from +0.0f (``s = 0; s += t[j]``)."""
    acc = torch.zeros_like(t[0])
    for j in range(t.shape[0]):
        acc.add_(t[j])
    return acc


def _levels_(v: torch.Tensor, nmax: int, in_range: bool) -> torch.Tensor:
    """In place: ``MAX(0, MIN(nmax, nearest_int(v)))`` as exact float32 values.

    ``in_range`` promises |v| <= 2^22, where ggml's magic-number rounding is round-half-even
    (``torch.round``); otherwise the exact integer emulation is used.
    """
    if in_range:
        return v.round_().clamp_(0, nmax)
    return ggml_nearest_int(v).clamp_(0, nmax).to(torch.float32)


def _qkx_candidates(
    xt: torch.Tensor,
    wt: torch.Tensor,
    xm: torch.Tensor,
    rng: torch.Tensor,
    sum_w: torch.Tensor,
    sum_x: torch.Tensor,
    cand: torch.Tensor,
    nmax: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ``is = 0..nstep`` candidates for a chunk of groups ([n, G] inputs).

    Returns the first-best candidate's (error, scale, min, L [n, G]); error is +inf where no
    candidate had ``D > 0``.
    """
    n = xt.shape[0]
    iscale_c = cdiv(cand.unsqueeze(0), rng.unsqueeze(1))  # [G, S]
    okc = bool(((iscale_c * rng.unsqueeze(1)) <= _f32(4194303.0, xt)).all())
    Lc = _levels_(iscale_c.unsqueeze(0) * xm.unsqueeze(2), nmax, okc)  # [n, G, S]
    w3 = wt.unsqueeze(2)
    x3 = xt.unsqueeze(2)
    wl = w3 * Lc
    tmp = torch.empty_like(wl)
    sum_l = _seq_sum0(wl)
    sum_l2 = _seq_sum0(torch.mul(wl, Lc, out=tmp))
    sum_xl = _seq_sum0(torch.mul(wl, x3, out=tmp))
    del wl
    sw = sum_w.unsqueeze(1)
    sx = sum_x.unsqueeze(1)
    D = sw * sum_l2 - sum_l * sum_l
    this_scale = cdiv(sw * sum_xl - sx * sum_l, D)
    this_min = cdiv(sum_l2 * sx - sum_l * sum_xl, D)
    pos = this_min > 0
    this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
    this_scale = torch.where(pos, cdiv(sum_xl, sum_l2), this_scale)
    d = torch.mul(this_scale.unsqueeze(0), Lc, out=tmp)
    d.add_(this_min.unsqueeze(0)).sub_(x3)
    d = d.abs_() if use_mad else d.mul_(d)
    cur = _seq_sum0(d.mul_(w3))
    del d, tmp
    # D <= 0 skips the candidate; NaN errors never compare smaller.
    cur = torch.where((D > 0) & ~torch.isnan(cur), cur, torch.full_like(cur, float("inf")))
    cmin, idx = torch.min(cur, dim=1)  # first index of the minimum = first strict improvement
    ii = idx.unsqueeze(1)
    Lsel = Lc.gather(2, ii.unsqueeze(0).expand(n, -1, 1)).squeeze(2)
    return cmin, this_scale.gather(1, ii).squeeze(1), this_min.gather(1, ii).squeeze(1), Lsel


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
    the top level; candidate inverse scales ``(rmin + rdelta*is + nmax)/(max-min)`` for
    ``is = 0..nstep``; ``use_mad`` selects |err| instead of err^2.
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

    # Running min/max/sums exactly as the C loop (first element seeds them).
    mn = xt[0].clone()
    mx = xt[0].clone()
    sum_w = wt[0].clone()
    sum_x = sum_w * xt[0]
    for i in range(1, n):
        xi = xt[i]
        mn = torch.where(xi < mn, xi, mn)
        mx = torch.where(xi > mx, xi, mx)
        sum_w = sum_w + wt[i]
        sum_x = sum_x + wt[i] * xi
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    degenerate = mx == mn
    # Degenerate groups return early in C; give them a harmless range so they cannot force
    # the slow exact-rounding path, and overwrite their results at the end.
    rng = torch.where(degenerate, torch.ones_like(mx), mx - mn)

    iscale = cdiv(float(nmax), rng)
    scale = cdiv(1.0, iscale)
    xm = xt - mn  # [n, G]
    ok0 = bool(((iscale * rng) <= _f32(4194303.0, x)).all())
    L = _levels_(iscale * xm, nmax, ok0)  # [n, G]
    d0 = scale * L
    d0.add_(mn).sub_(xt)
    d0 = d0.abs_() if use_mad else d0.mul_(d0)
    best = _seq_sum0(d0.mul_(wt))
    best_min = mn

    if nstep >= 1:
        S = nstep + 1
        # rmin + rdelta*is + nmax in float32, left to right as C does
        steps = torch.arange(S, device=x.device, dtype=torch.float32)
        cand = (_f32(rmin, x) + _f32(rdelta, x) * steps) + _f32(float(nmax), x)
        budget = _CHUNK_ELEMS if x.device.type == "cpu" else _CHUNK_ELEMS_ACCEL
        gc = max(1, budget // (n * S))
        parts = [
            _qkx_candidates(xt[:, s:s + gc], wt[:, s:s + gc], xm[:, s:s + gc], rng[s:s + gc],
                            sum_w[s:s + gc], sum_x[s:s + gc], cand, nmax, use_mad)
            for s in range(0, G, gc)
        ]
        cmin, c_scale, c_min, c_L = (torch.cat(p, dim=-1) for p in zip(*parts))
        take = cmin < best
        scale = torch.where(take, c_scale, scale)
        best_min = torch.where(take, c_min, best_min)
        L = torch.where(take.unsqueeze(0), c_L, L)

    scale = torch.where(degenerate, torch.zeros_like(scale), scale)
    best_min = torch.where(degenerate, mn, best_min)
    L = torch.where(degenerate.unsqueeze(0), torch.zeros_like(L), L)
    return scale, -best_min, L.t().to(torch.int32)


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

    mx = torch.zeros(G, dtype=torch.float32, device=x.device)
    for i in range(n):
        mx = torch.where(mx > x[:, i], mx, x[:, i])
    allzero = mx < _f32(GROUP_MAX_EPS, x)

    iscale = cdiv(fmax, mx).unsqueeze(1)  # [G, 1]
    L = ggml_nearest_int(iscale * x) & 0xFF
    scale = cdiv(1.0, iscale)
    diff = x - scale * L.to(torch.float32)
    best = _seq_sum0(((w * diff) * diff).t())

    for is_ in (-4, -3, -2, -1, 1, 2, 3, 4):
        num = _f32(0.1, x) * _f32(float(is_), x) + _f32(fmax, x)
        iscale_is = cdiv(num, mx).unsqueeze(1)
        scale_is = cdiv(1.0, iscale_is)
        l = ggml_nearest_int(iscale_is * x).clamp_(max=nmax).to(torch.float32)
        diff = x - scale_is * l
        mse = _seq_sum0(((w * diff) * diff).t())
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd.unsqueeze(1), iscale_is, iscale)

    li = ggml_nearest_int(iscale * x).clamp_(max=nmax)
    lf = li.to(torch.float32)
    L = li & 0xFF
    wx = w * x
    sumlx = _seq_sum0((wx * lf).t())
    suml2 = _seq_sum0(((w * lf) * lf).t())

    active = ~allzero
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(n):
            wi = w[:, i]
            wxi = wx[:, i]
            Li = L[:, i]
            Lf = Li.to(torch.float32)
            slx = sumlx - wxi * Lf
            sl2 = suml2 - (wi * Lf) * Lf
            ok = active & (slx > 0) & (sl2 > 0)
            new_l = ggml_nearest_int(cdiv(x[:, i] * sl2, slx)).clamp_(max=nmax)
            ok &= new_l != Li
            nf = new_l.to(torch.float32)
            slx = slx + wxi * nf
            sl2 = sl2 + (wi * nf) * nf
            acc = ok & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[:, i] = torch.where(acc, new_l & 0xFF, Li)
            sumlx = torch.where(acc, slx, sumlx)
            suml2 = torch.where(acc, sl2, suml2)
            changed |= acc
        active &= changed
        if not bool(active.any()):
            break

    zero = torch.zeros_like(sumlx)
    out = torch.where(suml2 > 0, cdiv(sumlx, suml2), zero)
    out = torch.where(allzero, zero, out)
    L = torch.where(allzero.unsqueeze(1), torch.zeros_like(L), L)
    return out, L
