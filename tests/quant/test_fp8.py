"""FP8 e4m3: per-tensor, per-channel, 128x128 block (vs transformers' FineGrainedFP8), mistral.rs ISQ."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight

from quantbench.errors import InputValueError, ShapeError
from quantbench.quant import dequantize, fp8, quantize
from quantbench.quant.schemes import get_scheme, reconstruction_error


def _weight(shape=(200, 300), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05


def test_e4m3_cast_saturates_and_rounds_to_even() -> None:
    x = torch.tensor([500.0, -1e4, 448.0, 464.0, 0.3, 2.0**-10, 3 * 2.0**-11, 1.0 + 1 / 16])
    got = fp8.to_e4m3(x).float().tolist()
    # 1 + 1/16 lies halfway between 1 and 1.125: ties to the even mantissa (1.0)
    assert got == [448.0, -448.0, 448.0, 448.0, 0.3125, 0.0, 2.0**-9, 1.0]


def test_per_tensor_and_per_channel() -> None:
    w = _weight()
    w[7] = 0  # an all-zero row
    qt = quantize(w, "FP8_TENSOR")
    s = w.abs().amax() / 448
    assert qt.tensors["weight"].dtype == torch.float8_e4m3fn and qt.tensors["weight_scale"].shape == ()
    assert torch.equal(qt.tensors["weight_scale"], s)
    assert torch.equal(qt.tensors["weight"].float(), fp8.to_e4m3(w / s).float())
    assert torch.equal(dequantize(qt), qt.tensors["weight"].float() * s)
    qc = quantize(w, "FP8_CHANNEL")
    sc = qc.tensors["weight_scale"]
    assert sc.shape == (200, 1) and sc[7].item() == 1.0
    row = 3
    assert sc[row].item() == (w[row].abs().max() / 448).item()
    assert dequantize(qc)[7].eq(0).all()
    assert reconstruction_error(w, qc)["rel_rmse"] <= reconstruction_error(w, qt)["rel_rmse"] + 1e-3


def test_block_matches_transformers_finegrained_fp8() -> None:
    w = _weight((256, 384), 1).to(torch.bfloat16)
    w[:128, 128:256] = 0  # an all-zero block
    hf = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[128, 128], scale_fmt=None))
    ref = Fp8Quantize(hf)._quantize_one("model.layers.0.mlp.up_proj.weight", w)
    q = quantize(w, "FP8_BLOCK")
    assert q.params == {"granularity": "block", "weight_block_size": [128, 128]}
    assert torch.equal(q.tensors["weight"].view(torch.uint8), ref["model.layers.0.mlp.up_proj.weight"].view(torch.uint8))
    assert torch.equal(q.tensors["weight_scale_inv"], ref["model.layers.0.mlp.up_proj.weight_scale_inv"])
    hf_deq = _dequantize_fp8_weight(q.tensors["weight"], q.tensors["weight_scale_inv"], [128, 128], torch.float32)
    assert torch.equal(dequantize(q), hf_deq)
    assert dequantize(q)[:128, 128:256].eq(0).all()


def test_block_partial_edges() -> None:
    w = _weight((200, 300), 2)
    q = quantize(w, "FP8_BLOCK")
    s = q.tensors["weight_scale_inv"]
    assert s.shape == (2, 3)
    # the bottom-right block is 72 x 44 elements; its scale comes from those only
    assert torch.allclose(s[1, 2], w[128:, 256:].abs().max() / 448, rtol=1e-6)
    assert reconstruction_error(w, q)["rel_rmse"] < 0.04
    assert q.bits_per_weight == get_scheme("FP8_BLOCK").bits_per_weight(w.shape) == 8 + 8 * 4 * 6 / w.numel()


def test_mistralrs_isq_fp8() -> None:
    """FP8Linear::quantize in the mistralrs 0.9.5 wheel: bf16 weight, scale = bf16(416 / amax)
    clamped to 416 (the float8 crate's F8E4M3::MAX), codes e4m3(bf16(w * scale))."""
    w = torch.tensor([[0.5, -2.0, 3.0, 100.0], [-300.0, 1.0, 0.0, 7.0]])
    q = quantize(w, "FP8")
    scale = 1.3828125  # bf16(416 / 300) = bf16(1.38666...): 8 mantissa bits
    assert q.tensors["quant_scale"].item() == scale
    assert q.tensors["dequant_w_scale"].item() == torch.tensor(1 / scale, dtype=torch.float32).item()
    assert q.tensors["dequant_x_scale"].item() == q.tensors["dequant_w_scale"].item()
    # -300 * 1.3828125 = -414.84 -> bf16 -414 -> e4m3 -416; 100 * s = 138.28 -> bf16 138 -> e4m3 144
    assert q.tensors["weight"].float()[1, 0].item() == -416.0 and q.tensors["weight"].float()[0, 3].item() == 144.0
    expect = fp8.to_e4m3((w.to(torch.bfloat16) * torch.tensor(scale, dtype=torch.bfloat16)).float())
    assert torch.equal(q.tensors["weight"].float(), expect.float())
    assert torch.equal(dequantize(q), expect.float() * q.tensors["dequant_w_scale"])
    assert q.params == {"granularity": "mistralrs", "dtype": "F8E4M3"}
    # amax < 1: the scale saturates at 416
    small = quantize(torch.tensor([[0.01, -0.02]]), "FP8")
    assert small.tensors["quant_scale"].item() == 416.0
    assert torch.equal(dequantize(quantize(torch.zeros(3, 4), "FP8")), torch.zeros(3, 4))


def test_bad_input() -> None:
    with pytest.raises(ShapeError, match="experts"):
        quantize(torch.randn(2, 3, 4), "FP8_BLOCK", name="experts")
    w = torch.randn(4, 4)
    w[0, 0] = float("-inf")
    with pytest.raises(InputValueError, match="lm_head"):
        quantize(w, "FP8_CHANNEL", name="lm_head")
