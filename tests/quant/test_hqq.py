"""HQQ against the real ``hqq==0.2.8`` Quantizer, plus mistral.rs's packing and ISQ settings."""

from __future__ import annotations

import pytest
import torch
from hqq.core.optimize import optimize_weights_proximal_legacy
from hqq.core.quantize import Quantizer

from quantbench.errors import InputValueError, ShapeError, UnknownTypeError
from quantbench.quant import dequantize, hqq, quantize
from quantbench.quant.schemes import get_scheme, reconstruction_error

BITS = [2, 3, 4, 8]


def _weight(seed: int = 0, shape=(96, 256)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[3, 10] = 0.3  # an outlier, as real weights have
    return w


def _hqq_ref(w: torch.Tensor, bits: int, iters: int) -> tuple[torch.Tensor, dict]:
    """hqq's Quantizer with the proximal solver limited to ``iters`` steps (hqq's default is 20)."""
    saved = Quantizer.optimize_weights
    Quantizer.optimize_weights = lambda **kw: optimize_weights_proximal_legacy(
        **kw, opt_params={"lp_norm": 0.7, "beta": 1e1, "kappa": 1.01, "iters": iters}
    )
    try:
        wq, meta = Quantizer.quantize(w, nbits=bits, group_size=64, axis=0, optimize=True, device="cpu")
    finally:
        Quantizer.optimize_weights = saved
    meta["compute_dtype"] = torch.float32
    return wq, meta


@pytest.mark.parametrize("bits", BITS)
def test_hqq_legacy_mode_is_bit_identical_to_hqq(bits: int) -> None:
    """Without mistral.rs's beta schedule and with hqq's 20 steps, packing, zeros and scales match hqq."""
    w = _weight(bits)
    q = hqq.quantize(w, bits=bits, optimization_steps=20, beta_schedule=False)
    wq_ref, meta = _hqq_ref(w, bits, 20)
    assert q.tensors["w_q"].dtype == wq_ref.dtype
    assert torch.equal(q.tensors["w_q"], wq_ref)
    assert torch.equal(q.tensors["zeros"], meta["zero"])
    assert torch.equal(q.tensors["scales"], meta["scale"])
    assert torch.equal(hqq.dequantize(q), Quantizer.dequantize(wq_ref, meta))


@pytest.mark.parametrize("bits", BITS)
def test_mistralrs_settings_within_one_percent_of_hqq(bits: int) -> None:
    """HQQ<bits> (group 64, axis 0, 10 steps, beta *= 1.01) vs hqq with the same group/axis/steps."""
    w = _weight(10 + bits)
    ours = reconstruction_error(w, quantize(w, f"HQQ{bits}"))["rel_rmse"]
    for iters in (10, 20):
        wq_ref, meta = _hqq_ref(w, bits, iters)
        ref = reconstruction_error(w, Quantizer.dequantize(wq_ref, meta))["rel_rmse"]
        assert abs(ours - ref) <= 0.01 * ref, (bits, iters, ours, ref)


def test_solver_improves_on_plain_min_max() -> None:
    """The zero-point solver must beat min/max rounding (steps=1 still updates the zero once)."""
    w = _weight(5)
    q = quantize(w, "HQQ4")
    g = w.reshape(64, -1)
    mn, mx = g.amin(0, keepdim=True), g.amax(0, keepdim=True)
    s = 15 / (mx - mn)
    plain = ((torch.round(g * s - mn * s).clamp(0, 15) + mn * s) / s).reshape(w.shape)
    assert reconstruction_error(w, q)["mae"] < reconstruction_error(w, plain)["mae"]


def test_packing_layout_matches_mistralrs() -> None:
    """4-bit: first half of the grouped rows in the high nibble; 3-bit: rows padded to 70, row
    ``i * 7 + r`` of the padded matrix at shift ``27 - 3i`` of packed row ``r``."""
    codes = torch.randint(0, 16, (64, 5))
    packed = hqq._pack(codes.float(), 4)
    assert packed.shape == (32, 5) and packed.dtype == torch.uint8
    assert torch.equal(packed, (codes[:32] << 4 | codes[32:]).to(torch.uint8))
    codes3 = torch.randint(0, 8, (64, 3))
    p3 = hqq._pack(codes3.float(), 3)
    assert p3.shape == (7, 3) and p3.dtype == torch.int32
    assert int(p3[0, 0]) >> 27 == int(codes3[0, 0]) and (int(p3[6, 1]) >> 24) & 7 == int(codes3[7 + 6, 1])
    for bits in (1, 2, 3, 4, 8):
        c = torch.randint(0, 2**bits, (64, 7)).float()
        assert torch.equal(hqq._unpack(hqq._pack(c, bits), bits, 64), c)


def test_strided_groups_and_shapes() -> None:
    w = _weight(1, (8, 128))
    q = quantize(w, "HQQ4")
    n = w.numel() // 64
    assert q.tensors["scales"].shape == (1, n) and q.tensors["zeros"].shape == (1, n)
    assert q.tensors["scales"].dtype == torch.float32
    # group j holds flat elements j, j+N, j+2N, ...: a constant group decodes exactly
    w2 = torch.randn(8, 128) * 0.01
    w2.reshape(64, -1)[:, 3] = 0.125
    assert torch.allclose(dequantize(quantize(w2, "HQQ4")).reshape(64, -1)[:, 3], torch.full((64,), 0.125))
    assert q.params == {
        "bits": 4, "group_size": 64, "axis": 0, "optimization_steps": 10,
        "round_zeros": False, "channel_wise": True, "beta_schedule": True,
    }
    assert q.bits_per_weight == get_scheme("HQQ4").bits_per_weight(w.shape) == 5.0


def test_zero_groups_and_bad_input() -> None:
    w = torch.zeros(4, 64)
    out = dequantize(quantize(w, "HQQ2"))
    assert torch.equal(out, torch.zeros_like(w))
    with pytest.raises(ShapeError, match="layer.w"):
        quantize(torch.randn(3, 7), "HQQ4", name="layer.w")
    with pytest.raises(UnknownTypeError, match="not 5"):
        hqq.quantize(torch.randn(4, 64), bits=5, name="x")
    bad = torch.randn(4, 64)
    bad[0, 0] = float("nan")
    with pytest.raises(InputValueError, match="blk.0"):
        quantize(bad, "HQQ8", name="blk.0")
