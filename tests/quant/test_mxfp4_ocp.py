"""MXFP4 in the gpt-oss / mistral.rs layout: OCP scale rule and mistral.rs's ISQ rule."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

from quantbench.errors import ShapeError
from quantbench.quant import dequantize, get_type, mxfp4_ocp, quantize
from quantbench.quant.schemes import get_scheme, reconstruction_error


def _block(*vals: float) -> torch.Tensor:
    b = torch.zeros(32)
    b[: len(vals)] = torch.tensor(vals)
    return b


def test_ocp_rule_by_hand() -> None:
    # amax 6: e = floor(log2 6) - 2 = 0 (byte 127); ties to even; 7.9 in the next block saturates
    b0 = _block(6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, -6.0)
    b1 = _block(7.9, 1.0)  # e = floor(log2 7.9) - 2 = 0: 7.9 -> 6 (saturated)
    b2 = _block(8.0, -1.0)  # e = 1: 8/2 = 4, -1/2 = -0.5
    q = mxfp4_ocp.quantize(torch.stack([b0, b1, b2]).reshape(1, 96), rule="ocp")
    assert q.tensors["scales"].tolist() == [[127, 127, 128]]
    out = mxfp4_ocp.dequantize(q).reshape(3, 32)
    assert out[0, :10].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -6.0]
    assert out[1, :2].tolist() == [6.0, 1.0] and out[2, :2].tolist() == [8.0, -1.0]
    # low nibble = even element; sign bit set for -0.1 although it rounds to zero
    blocks = q.tensors["blocks"].reshape(-1)
    assert blocks[0].item() == (7 | (0 << 4)) and blocks[4].item() == (8 | (15 << 4))


def test_mistralrs_rule_by_hand() -> None:
    # byte = floor(log2(amax / 6)) + 127: amax 11.9 -> 127, so 11.9 saturates at 6 (clipped)
    b0 = _block(11.9, 0.25, 1.25, 5.0, -2.5)
    q = mxfp4_ocp.quantize(b0.reshape(1, 32), rule="mistralrs")
    assert q.tensors["scales"].item() == 127
    assert mxfp4_ocp.dequantize(q)[0, :5].tolist() == [6.0, 0.5, 1.5, 6.0, -3.0]  # midpoints go up
    z = mxfp4_ocp.quantize(torch.zeros(1, 32), rule="mistralrs")
    assert z.tensors["scales"].item() == 127 and z.tensors["blocks"].eq(0).all()
    zo = mxfp4_ocp.quantize(torch.zeros(1, 32), rule="ocp")
    assert zo.tensors["scales"].item() == 0 and mxfp4_ocp.dequantize(zo).eq(0).all()


def test_exponent_is_exact_near_powers_of_two() -> None:
    below = torch.nextafter(torch.tensor(4.0), torch.tensor(0.0))
    q = mxfp4_ocp.quantize(_block(float(below)).reshape(1, 32), rule="ocp")
    assert q.tensors["scales"].item() == 127 - 1  # floor(log2(3.9999998)) = 1
    tiny = mxfp4_ocp.quantize(_block(1e-40).reshape(1, 32), rule="ocp")
    assert tiny.tensors["scales"].item() == 0  # clamped to the E8M0 range


def test_dequantize_matches_gpt_oss_loader() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 48, 128, generator=g) * 0.03
    for name in ("MXFP4_OCP", "MXFP4_ISQ"):
        q = quantize(w, name)
        assert q.tensors["blocks"].shape == (1, 48, 64) and q.tensors["scales"].shape == (1, 48, 4)
        gpt_blocks = q.tensors["blocks"].reshape(1, 48, 4, 16)  # gpt-oss *_blocks view
        ref = _convert_moe_packed_tensors(gpt_blocks, q.tensors["scales"], dtype=torch.float32).transpose(1, 2)
        assert torch.equal(dequantize(q), ref)
    ocp = reconstruction_error(w, quantize(w, "MXFP4_OCP"))["rel_rmse"]
    isq = reconstruction_error(w, quantize(w, "MXFP4_ISQ"))["rel_rmse"]
    assert ocp < 0.15 and ocp < isq  # mistral.rs's floor(log2(amax/6)) clips block maxima


def test_registry_and_errors() -> None:
    assert get_type("MXFP4").type_size == 17  # GGML's MXFP4 is untouched and still wins the name
    assert get_scheme("MXFP4_ISQ").isq_name == "MXFP4" and get_scheme("MXFP4_ISQ").uqff_type == 6
    w = torch.randn(8, 64)
    assert quantize(w, "MXFP4").qtype == "MXFP4" and "data" in quantize(w, "MXFP4").tensors
    q = quantize(w, "MXFP4_OCP")
    assert q.bits_per_weight == get_scheme("MXFP4_OCP").bits_per_weight(w.shape) == 4.25
    with pytest.raises(ShapeError, match="w1"):
        quantize(torch.randn(4, 48), "MXFP4_OCP", name="w1")
