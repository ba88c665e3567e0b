"""IQ4_NL, IQ4_XS and MXFP4 beyond the generic cases: wide rows, several seeds, extreme magnitudes,
E8M0 exponent boundaries, level ties, and dequantization of arbitrary bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantbench.quant import dequantize, get_type, quantize
from quantbench.quant.qtensor import QTensor
from tests.quant.ggml.cases import check_against_oracle, make_imatrix

TYPES = ["IQ4_NL", "IQ4_XS", "MXFP4"]




def _f32_bits(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


@pytest.mark.oracle
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qtype", TYPES)
def test_wide_rows(qtype: str, seed: int, use_imatrix: bool, ggml_oracle) -> None:
    rng = np.random.default_rng(100 + seed)
    n = 4096
    x = np.concatenate([
        rng.standard_normal((10, n)),
        rng.standard_t(2.0, (10, n)),
        rng.standard_normal((4, n)) * 0.02,
    ]).astype(np.float32)
    im = make_imatrix(n, seed=seed + 7, zero_columns=seed == 0) if use_imatrix else None
    check_against_oracle(qtype, x, im, ggml_oracle)


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_extreme_magnitudes(qtype: str, ggml_oracle) -> None:
    """From subnormal to near FLT_MAX: fp16 scales underflow or overflow, x*x overflows to inf."""
    rng = np.random.default_rng(3)
    scales = [1e-40, 1e-38, 1e-30, 1e-16, 1e-15, 2e-15, 1e-7, 1e-5, 1e5, 1e7, 1e10, 1e19, 1e20, 1e30, 6e37]
    x = np.concatenate([rng.standard_normal((2, 512)) * s for s in scales]).astype(np.float32)
    im = (rng.standard_normal(512) ** 2).astype(np.float32)
    check_against_oracle(qtype, x, None, ggml_oracle)
    check_against_oracle(qtype, x, im, ggml_oracle)


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_overflowing_sub_blocks(qtype: str, ggml_oracle) -> None:
    """Sub-blocks whose x*x overflows (NaN scales, stored as x86's negative NaN) next to normal
    ones: in IQ4_XS a NaN sub-scale must never become the super-block's max scale."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[0, :32] *= 1e20
    x[1, 64:96] *= 1e30
    x[2, 480:] *= 3e19
    x[3, :] *= 1e19
    x[3, 100] = 3e38
    x[4, 32:64] = 0
    x[4, :32] *= 1e25
    x[5, ::2] *= 1e21
    check_against_oracle(qtype, x, None, ggml_oracle)
    check_against_oracle(qtype, x, make_imatrix(512, seed=12), ggml_oracle)


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
def test_iq4_group_max_eps_boundary(qtype: str, ggml_oracle) -> None:
    """Blocks whose amax sits on GROUP_MAX_EPS (1e-15f): the one just below it is skipped."""
    eps = np.float32(1e-15)
    below = np.nextafter(eps, np.float32(0))
    above = np.nextafter(eps, np.float32(1))
    rng = np.random.default_rng(4)
    rows = []
    for amax in (below, eps, above):
        for sign in (1, -1):
            r = (rng.uniform(-1, 1, 512) * amax * 0.9).astype(np.float32)
            r[::37] = sign * amax
            rows.append(r)
    x = np.stack(rows).astype(np.float32)
    x[1, 256:] *= np.float32(1e6)  # a normal sub-block next to near-eps ones in one super-block
    check_against_oracle(qtype, x, None, ggml_oracle)
    check_against_oracle(qtype, x, make_imatrix(512), ggml_oracle)


@pytest.mark.oracle
def test_iq4_xs_scale_structure(ggml_oracle) -> None:
    """Super-blocks with one dominant sub-block (6-bit scales clamp at -32), zero and tiny
    sub-blocks, and a dominant sub-block of either sign (sign of the fp16 super-scale)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[0, :32] *= 1000
    x[1, 224:256] *= -1000
    x[2, 32:64] = 0
    x[3, 64:96] *= 1e-20
    x[4, :256] = np.round(x[4, :256] * 8) / 8
    x[5, 256:] = 0
    x[5, 300] = -5.0
    x[6, :] = np.abs(x[6, :])
    x[7, :] = -np.abs(x[7, :])
    check_against_oracle("IQ4_XS", x, None, ggml_oracle)
    check_against_oracle("IQ4_XS", x, make_imatrix(512, seed=9), ggml_oracle)


@pytest.mark.oracle
def test_mxfp4_exponent_boundaries(ggml_oracle) -> None:
    """amax exactly 2^k for every k, and the floats just around it, where ``floorf(log2f(amax))``
    flips; amax below 2^-125 makes the (uint8_t) cast of a negative float wrap."""
    amaxes = []
    for k in range(-149, 128):
        pb = int(np.float32(2.0 ** k).view(np.uint32))
        amaxes.append(np.arange(max(1, pb - 64), pb + 8, dtype=np.uint32))
    top = int(np.finfo(np.float32).max.view(np.uint32))
    amaxes.append(np.arange(top - 64, top + 1, dtype=np.uint32))
    a = _f32_bits(np.concatenate(amaxes))
    rng = np.random.default_rng(6)
    x = (rng.uniform(-1, 1, (len(a), 32)) * a[:, None]).astype(np.float32)
    pos = rng.integers(0, 32, len(a))
    x[np.arange(len(a)), pos] = np.where(rng.random(len(a)) < 0.5, a, -a)
    x = np.concatenate([x, np.zeros((-len(x) % 8, 32), np.float32)])
    check_against_oracle("MXFP4", x.reshape(-1, 256), None, ggml_oracle)


@pytest.mark.oracle
def test_mxfp4_random_bit_patterns(ggml_oracle) -> None:
    """Blocks whose amax is any finite float (uniform over bit patterns)."""
    rng = np.random.default_rng(7)
    a = _f32_bits(rng.integers(1, 0x7F7FFFFF, 20000, dtype=np.uint32))
    x = (rng.uniform(-1, 1, (len(a), 32)) * a[:, None]).astype(np.float32)
    x[:, 3] = a
    check_against_oracle("MXFP4", x.reshape(-1, 128), None, ggml_oracle)


@pytest.mark.oracle
def test_mxfp4_level_ties(ggml_oracle) -> None:
    """Elements exactly halfway between two E2M1 levels, and one ulp either side: the C loop keeps
    the first (lower-index) level on a tie, and 0 beats -0."""
    halves = np.array([0.0, 0.5, 1.0, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0, 12.0, 14.0], np.float32)
    rows = []
    for k in (-140, -126, -60, -3, 0, 1, 5, 60, 120):
        d = np.float32(2.0) ** np.float32(k)
        blk_amax = np.float32(12.0) * d  # amax = 12d → shared scale d (e = k + 128)
        vals = np.concatenate([halves, -halves]) * d
        vals = np.concatenate([vals, np.nextafter(vals, np.float32(np.inf)), np.nextafter(vals, -np.float32(np.inf))])
        vals = vals[np.abs(vals) <= blk_amax]
        pad = (-len(vals) - 1) % 32
        blk = np.concatenate([[blk_amax], vals, np.zeros(pad, np.float32)]).astype(np.float32)
        rows.append(blk.reshape(-1, 32))
    x = np.concatenate(rows).reshape(-1, 32)
    x = np.concatenate([x, -x, np.full((1, 32), -0.0, np.float32)])
    check_against_oracle("MXFP4", x, None, ggml_oracle)


def _best_index_int8_scalar(x: float, vals: list[int]) -> int:
    """Straight port of ``best_index_int8`` with float32 arithmetic, as the test's reference."""
    f = np.float32
    x = f(x)
    if x <= vals[0]:
        return 0
    if x >= vals[-1]:
        return len(vals) - 1
    ml, mu = 0, len(vals) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < vals[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if f(x - f(vals[mu - 1])) < f(f(vals[mu]) - x) else mu


def test_iq4_best_index_matches_c_search() -> None:
    from quantbench.quant.ggml.iq4 import KVALUES_IQ4NL, best_index

    vals = list(KVALUES_IQ4NL)
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    pts = np.array(vals + mids + [-200, -127.5, 113.5, 200, 0.0, -0.0, 1e-30, -1e-30], np.float32)
    up = np.nextafter(pts, np.float32(np.inf))
    dn = np.nextafter(pts, -np.float32(np.inf))
    rng = np.random.default_rng(8)
    xs = np.concatenate([pts, up, dn, rng.uniform(-140, 130, 3000).astype(np.float32),
                         np.array([np.inf, -np.inf, np.nan], np.float32)])
    ours = best_index(torch.from_numpy(xs)).numpy()
    ref = np.array([15 if math.isnan(v) else _best_index_int8_scalar(v, vals) for v in xs])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_arbitrary_bytes_matches_gguf_py(qtype: str) -> None:
    """Every scale byte pattern (fp16 inf/NaN/subnormal, every E8M0 exponent) dequantizes as gguf-py."""
    import gguf
    from gguf import quants as gq

    t = get_type(qtype)
    rng = np.random.default_rng(9)
    blocks = rng.integers(0, 256, (4096, t.type_size), dtype=np.uint8)
    if qtype == "MXFP4":
        blocks[:256, 0] = np.arange(256)
    ours = t.dequantize_blocks(torch.from_numpy(blocks)).numpy()
    with np.errstate(all="ignore"):  # NaN/inf scales are part of the point
        ref = gq.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType(t.ggml_id)).reshape(ours.shape)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_error_is_small(qtype: str) -> None:
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.standard_normal((16, 1024)).astype(np.float32))
    y = dequantize(quantize(x, qtype))
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < 0.15, rel
    assert isinstance(quantize(x, qtype), QTensor)
