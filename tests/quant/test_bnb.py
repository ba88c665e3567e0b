"""NF4 / FP4 (with and without double quant) and LLM.int8 against ``bitsandbytes==0.50.2`` on CPU."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.utils import unpack_tensor_to_dict

from quantbench.errors import InputValueError, ShapeError
from quantbench.quant import bnb, dequantize, quantize
from quantbench.quant.schemes import get_scheme


def _weight(seed: int, dtype: torch.dtype, shape=(96, 320)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.03 * torch.rand(shape[0], 1, generator=g)
    w[0, :70] = 0  # an all-zero block and a partly zero one
    w[1, 5] = 1e-7
    w[2, 9] = -0.4
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_identical_to_bitsandbytes(quant_type: str, double_quant: bool, dtype: torch.dtype) -> None:
    w = _weight(hash((quant_type, double_quant)) % 1000, dtype)
    ref, st = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    name = quant_type.upper() + ("_DQ" if double_quant else "")
    q = quantize(w, name)
    t = q.tensors
    assert t["weight"].dtype == torch.uint8 and torch.equal(t["weight"], ref)
    assert torch.equal(t["absmax"], st.absmax)
    assert torch.equal(t["quant_map"], st.code)
    if double_quant:
        assert torch.equal(t["nested_absmax"], st.state2.absmax)
        assert torch.equal(t["nested_quant_map"], st.state2.code)
        assert q.params["nested_offset"] == st.offset.item()
    packed = st.as_dict(packed=True)
    assert unpack_tensor_to_dict(packed[f"quant_state.bitsandbytes__{quant_type}"]) == bnb.quant_state_fields(q)
    assert set(packed) - {f"quant_state.bitsandbytes__{quant_type}"} == set(t) - {"weight"}
    # bnb dequantizes in float32 and casts to dtype; we keep float32
    deq = dequantize(q)
    assert torch.equal(deq.to(dtype), F.dequantize_4bit(ref, st))
    assert deq[0, :64].eq(0).all()


def test_odd_element_count_and_short_last_block() -> None:
    w = _weight(3, torch.float32, (7, 45))
    ref, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize(w, "NF4_DQ")
    assert torch.equal(q.tensors["weight"], ref) and torch.equal(q.tensors["absmax"], st.absmax)
    assert torch.equal(dequantize(q), F.dequantize_4bit(ref, st))


def test_nested_8bit_uses_bnb_lookup_table() -> None:
    """bnb's CPU 8-bit quantizer snaps to a 65536-point grid; near-zero codes are unreachable."""
    code = bnb.dynamic_map()
    vals = torch.cat([torch.tensor([1.0]), torch.linspace(-0.01, 0.01, 2001), torch.rand(500) * 2 - 1])
    ref, st = F.quantize_blockwise(vals, blocksize=4096)
    idx, absmax = bnb.quantize_blockwise_8bit(vals, code, 4096)
    assert torch.equal(idx, ref) and torch.equal(absmax, st.absmax)
    assert not ((idx >= 124) & (idx <= 130)).any()


def test_int8_identical_to_bitsandbytes() -> None:
    w = _weight(7, torch.bfloat16, (48, 80))
    w[5] = 0  # an all-zero row decodes to zeros
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))  # Int8Params casts to float16 first
    q = quantize(w, "INT8")
    assert q.tensors["CB"].dtype == torch.int8 and torch.equal(q.tensors["CB"][torch.arange(48) != 5], cb[torch.arange(48) != 5])
    assert torch.equal(q.tensors["SCB"], scb)
    keep = torch.arange(48) != 5
    assert torch.equal(dequantize(q)[keep], F.int8_vectorwise_dequant(cb, scb)[keep])
    assert dequantize(q)[5].eq(0).all() and q.params["threshold"] == 6.0


def test_bits_per_weight_and_errors() -> None:
    w = torch.randn(64, 256)
    for name in ("NF4", "NF4_DQ", "FP4", "FP4_DQ", "INT8"):
        q = quantize(w, name)
        assert q.bits_per_weight == pytest.approx(get_scheme(name).bits_per_weight(w.shape))
    assert quantize(w, "NF4").bits_per_weight == pytest.approx(4 + 32 / 64 + 16 * 32 / w.numel())
    with pytest.raises(ShapeError, match="conv"):
        quantize(torch.randn(2, 3, 4), "INT8", name="conv")
    with pytest.raises(InputValueError, match="emb"):
        quantize(torch.full((4, 4), 1e6), "INT8", name="emb")
    bad = torch.randn(4, 64)
    bad[2, 2] = float("nan")
    with pytest.raises(InputValueError, match="q_proj"):
        quantize(bad, "NF4", name="q_proj")
    with pytest.raises(ShapeError, match="blocksize"):
        bnb.quantize_4bit(torch.randn(64), quant_type="nf4", blocksize=48, name="x")
