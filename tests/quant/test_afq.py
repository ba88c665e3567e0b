"""AFQ: MLX's affine rule, checked by hand and byte-for-byte against ``mlx`` (CPU build)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from quantbench.errors import InputValueError, ShapeError, UnknownTypeError
from quantbench.quant import afq, dequantize, quantize
from quantbench.quant.schemes import get_scheme, reconstruction_error

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]


def _words(q) -> np.ndarray:
    return q.tensors["w_q"].view(torch.int32).numpy().view(np.uint32)


def test_hand_computed_edge_snapping() -> None:
    """Two 32-element groups worked out on paper (float32 arithmetic)."""
    g1 = torch.zeros(32)
    g1[0], g1[1], g1[2] = -1.0, 0.5, 0.26  # |min| > |max|: edge = min = -1
    g2 = torch.zeros(32)
    g2[0], g2[1], g2[2] = 1.0, -0.1, 0.5  # |max| wins: edge = max = 1, negative scale
    q2 = afq.quantize(torch.stack([g1]).reshape(1, 32), bits=2, group_size=32)
    # 2 bits: scale = 1.5/3 = 0.5; q0 = rint(-1/0.5) = -2 -> scale = -1/-2 = 0.5, bias = -1
    assert q2.tensors["scales"].item() == 0.5 and q2.tensors["biases"].item() == -1.0
    codes = afq.unpack_lsb(q2.tensors["w_q"], 2, 32)[0]
    assert codes[:3].tolist() == [0, 3, 3] and codes[3:].eq(2).all()  # 0 -> code 2 exactly
    assert afq.dequantize(q2)[0, 3:].eq(0).all()
    q4 = afq.quantize(g2.reshape(1, 32), bits=4, group_size=32)
    s = torch.tensor(1.1, dtype=torch.float32) / 15  # (max - min) / 15, then negated
    q0 = torch.round(torch.tensor(1.0) / -s)  # rint(-13.6..) = -14
    assert q0.item() == -14
    assert q4.tensors["scales"].item() == pytest.approx(1.0 / -14, rel=1e-7)
    assert q4.tensors["biases"].item() == 1.0
    codes = afq.unpack_lsb(q4.tensors["w_q"], 4, 32)[0]
    assert codes[:3].tolist() == [0, 15, 7] and codes[3:].eq(14).all()
    # LSB-first: element 0 in the low nibble of word 0
    assert int(_words(q4)[0, 0]) & 0xF == 0 and (int(_words(q4)[0, 0]) >> 4) & 0xF == 15


def test_bitstream_packing_is_lsb_first() -> None:
    for bits in BITS:
        codes = torch.randint(0, 2**bits, (3, 64))
        words = afq.pack_lsb(codes, bits)
        assert words.dtype == torch.uint32 and words.shape == (3, 64 * bits // 32)
        stream = 0
        for j, c in enumerate(codes[1].tolist()):
            stream |= c << (j * bits)
        expect = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(words.shape[1])]
        assert words[1].view(torch.int32).numpy().view(np.uint32).tolist() == expect
        assert torch.equal(afq.unpack_lsb(words, bits, 64), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", BITS)
def test_matches_mlx(bits: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(6, 256, generator=g) * 0.05).to(dtype)
    w[0, :128] = 0  # all-zero groups
    w[1, 5] = 0.9  # an outlier
    arr = mx.array(w.float().numpy())
    if dtype == torch.bfloat16:
        arr = arr.astype(mx.bfloat16)
    for gs in GROUPS:
        q = afq.quantize(w, bits=bits, group_size=gs)
        mq, ms, mb = mx.quantize(arr, group_size=gs, bits=bits)
        assert _words(q).shape == tuple(mq.shape)
        np.testing.assert_array_equal(_words(q), np.array(mq))
        assert q.tensors["scales"].dtype == dtype
        np.testing.assert_array_equal(q.tensors["scales"].float().numpy(), np.array(ms.astype(mx.float32)))
        np.testing.assert_array_equal(q.tensors["biases"].float().numpy(), np.array(mb.astype(mx.float32)))
        ref = np.array(mx.dequantize(mq, ms, mb, group_size=gs, bits=bits).astype(mx.float32))
        np.testing.assert_allclose(afq.dequantize(q).numpy(), ref, rtol=0, atol=1e-2 * float(np.abs(ref).max()))
        assert afq.dequantize(q)[0, :128].eq(0).all()


def test_registry_names_and_bits_per_weight() -> None:
    w = torch.randn(16, 256, dtype=torch.bfloat16)
    for name, bits, gs in [("AFQ4", 4, 64), ("AFQ3_G32", 3, 32), ("AFQ8_G128", 8, 128), ("AFQ5", 5, 64)]:
        q = quantize(w, name)
        assert q.qtype == name and q.params == {"bits": bits, "group_size": gs}
        assert q.bits_per_weight == get_scheme(name).bits_per_weight(w.shape, torch.bfloat16) == bits + 32 / gs
        assert reconstruction_error(w, q)["rel_rmse"] < 2.0 ** (1 - bits) + 0.005  # + bf16 scale rounding
    assert get_scheme("AFQ4").isq_name == "AFQ4" and get_scheme("AFQ5").isq_name is None
    q32 = quantize(w.float(), "AFQ4", scale_dtype=torch.float16)
    assert q32.tensors["scales"].dtype == torch.float16


def test_bad_input() -> None:
    with pytest.raises(ShapeError, match="mlp.down"):
        quantize(torch.randn(4, 96), "AFQ4", name="mlp.down")
    with pytest.raises(UnknownTypeError, match="7"):
        afq.quantize(torch.randn(4, 64), bits=7, group_size=64, name="x")
    with pytest.raises(UnknownTypeError, match="group"):
        afq.quantize(torch.randn(4, 64), bits=4, group_size=16, name="x")
    w = torch.randn(4, 64)
    w[1, 1] = float("inf")
    with pytest.raises(InputValueError, match="attn"):
        quantize(w, "AFQ2", name="attn")
    assert torch.equal(dequantize(quantize(torch.zeros(2, 64), "AFQ3")), torch.zeros(2, 64))


def test_mistralrs_rule_by_hand() -> None:
    """mistral.rs's CPU AFQ ISQ: scale (max-min)/n_bins, bias min, Rust round (ties away), no
    MLX sign trick; a constant group gets scale 1 and decodes to its value exactly."""
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([-1.0, 0.5, 2.0, 0.25])  # rest 0; min -1, max 2, n_bins 3 -> scale 1
    w[1] = 0.75  # constant group
    q = afq.quantize(w, bits=2, group_size=32, rule="mistralrs")
    assert q.tensors["scales"].tolist() == [[1.0], [1.0]] and q.tensors["biases"].tolist() == [[-1.0], [0.75]]
    codes = afq.unpack_lsb(q.tensors["w_q"], 2, 32)
    # (x - min) / scale: 0, 1.5 -> 2, 3, 1.25 -> 1, and 1 for the zeros
    assert codes[0, :4].tolist() == [0, 2, 3, 1] and codes[0, 4:].eq(1).all()
    assert codes[1].eq(0).all() and afq.dequantize(q)[1].eq(0.75).all()
    tie = afq.quantize(torch.tensor([[0.0, 2.5] + [3.0] * 30]), bits=2, group_size=32, rule="mistralrs")
    assert afq.unpack_lsb(tie.tensors["w_q"], 2, 32)[0, 1].item() == 3  # 2.5 rounds away from zero, not to even 2
    with pytest.raises(UnknownTypeError, match="rule"):
        afq.quantize(w, bits=2, group_size=32, rule="gptq")
