"""F8Q8: mistral.rs's 33-byte blocks (e4m3 scale x416, 32 int8), worked by hand.

416 is mistral.rs's F8E4M3::MAX; the bytes are checked against the mistralrs wheel in
tests/jobs/test_quantize_uqff.py (same greedy text as its own F8Q8 ISQ)."""

from __future__ import annotations

import pytest
import torch

from quantbench.errors import InputValueError
from quantbench.quant import dequantize, f8q8, quantize
from quantbench.quant.fp8 import to_e4m3
from quantbench.quant.ggml.common import roundf
from quantbench.quant.schemes import get_scheme, reconstruction_error


def test_block_layout_by_hand() -> None:
    x = torch.zeros(64)
    x[0], x[1], x[2], x[3] = 127.0, 2.5, -2.5, -0.49999997  # d = 1: ties round away from zero
    x[32], x[33] = 254.0, 100.0  # d = 2: d * 416 = 832 saturates the e4m3 scale at 448 -> 448/416
    q = quantize(x.reshape(2, 32), "F8Q8")
    data = q.tensors["weight"]
    assert data.dtype == torch.uint8 and data.shape == (66,)
    assert q.params == {"num_blocks": 2}
    blocks = data.reshape(2, 33)
    assert blocks[0, 0].item() == to_e4m3(torch.tensor(416.0)).view(torch.uint8).item()  # fp8(1 * 416) is exact
    qs = blocks[:, 1:].view(torch.int8)
    assert qs[0, :4].tolist() == [127, 3, -3, 0]
    assert qs[1, :2].tolist() == [127, 50]
    out = dequantize(q).reshape(-1)
    assert out[:4].tolist() == [127.0, 3.0, -3.0, 0.0]
    assert out[32:34].tolist() == (torch.tensor([127.0, 50.0]) * (torch.tensor(448.0) / 416)).tolist()  # the saturated scale shrinks the block


def test_scale_is_rounded_to_e4m3() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    q = f8q8.quantize(x)
    blocks = q.tensors["weight"].reshape(4, 33)
    amax = x.abs().amax(dim=1)
    d = amax / 127
    assert torch.equal(blocks[:, 0], to_e4m3(d * 416).view(torch.uint8))
    codes = blocks[:, 1:].view(torch.int8).float()
    assert torch.equal(codes, roundf(x * (1 / d).unsqueeze(1)))
    dq = blocks[:, :1].contiguous().view(torch.float8_e4m3fn).float() / 416
    assert torch.equal(f8q8.dequantize(q), codes * dq)


def test_flattened_padding_and_bits_per_weight() -> None:
    w = torch.randn(100, 100) * 0.05
    q = quantize(w, "F8Q8")
    assert q.params["num_blocks"] == 313  # 10000 elements padded to 10016
    assert q.tensors["weight"].numel() == 313 * 33
    assert dequantize(q).shape == (100, 100)
    assert reconstruction_error(w, q)["rel_rmse"] < 0.05
    assert q.bits_per_weight == get_scheme("F8Q8").bits_per_weight(w.shape) == 8 * 313 * 33 / 10000


def test_zero_and_bad_input() -> None:
    assert torch.equal(dequantize(quantize(torch.zeros(3, 40), "F8Q8")), torch.zeros(3, 40))
    w = torch.randn(2, 32)
    w[1, 3] = float("nan")
    with pytest.raises(InputValueError, match="gate"):
        quantize(w, "F8Q8", name="gate")
