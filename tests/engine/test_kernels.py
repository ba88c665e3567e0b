"""The Triton GGML kernels against the torch reference dequantizer, on CPU through Triton's interpreter.

The kernels run on CUDA in the engine; ``TRITON_INTERPRET=1`` executes the same kernel source
with numpy, so the unpacking arithmetic is checked bit for bit here on small shapes (five rows,
so the last row-program is partly masked; two tiles per row).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at import
triton = pytest.importorskip("triton")

from quantbench.engine import kernels  # noqa: E402
from quantbench.errors import ShapeError  # noqa: E402
from quantbench.quant import QTensor, dequantize, quantize  # noqa: E402

if "quantbench.engine.kernels.ggml_dequant" in sys.modules:  # imported earlier without the interpreter
    gd = importlib.reload(sys.modules["quantbench.engine.kernels.ggml_dequant"])
else:
    gd = importlib.import_module("quantbench.engine.kernels.ggml_dequant")

ROWS = 5


def _packed(qtype: str, k: int, seed: int) -> QTensor:
    """Real quantizer output for random data with outliers (exercises every level and scale)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, k, generator=g) * torch.rand(ROWS, 1, generator=g) * 0.1
    w[:, ::37] *= 8.0
    return quantize(w, qtype)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("qtype", sorted(kernels.DEQUANT_TYPES))
def test_dequant_f32_bit_exact(qtype: str) -> None:
    kt = gd.TYPES[qtype]
    k = 2 * (256 if kt.block_size == 256 else 256)  # 32-value types: 16 blocks = 2 tiles of 8
    q = _packed(qtype, k, seed=len(qtype) * 7 + kt.code)
    ref = dequantize(q)
    got = gd.dequantize_rows(qtype, q.data, k, torch.float32, rows_per_program=4)
    assert _bits_equal(got, ref), f"{qtype}: {(got != ref).sum().item()} values differ"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "MXFP4"])
def test_dequant_half_dtypes(qtype: str) -> None:
    """f16 output is the reference rounded to f16 (numpy's RNE cast, exact in the interpreter).

    bf16: the interpreter emulates the f32→bf16 cast by truncation rather than the GPU's round to
    nearest even, so on CPU the check is "within one bf16 step"; the H100 run in
    benchmarks/NOTES.md checks bf16 bit for bit.
    """
    k = 512
    q = _packed(qtype, k, seed=3)
    ref = dequantize(q)
    f16 = gd.dequantize_rows(qtype, q.data, k, torch.float16, rows_per_program=8)
    assert torch.equal(f16, ref.to(torch.float16))
    bf = gd.dequantize_rows(qtype, q.data, k, torch.bfloat16, rows_per_program=8)
    step = ref.abs().to(torch.bfloat16).float() * 2.0**-7
    assert ((bf.float() - ref).abs() <= step).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in numpy, as in the reference
def test_odd_block_count_and_raw_bytes() -> None:
    """A row of 3 blocks (tile of 1 block) and arbitrary bytes (any scale, NaN/inf included)."""
    g = torch.Generator().manual_seed(11)
    for qtype in ("Q8_0", "Q4_1", "IQ4_NL"):
        kt = gd.TYPES[qtype]
        data = torch.randint(0, 256, (ROWS, 3 * kt.type_size), generator=g, dtype=torch.uint8)
        q = QTensor(qtype, (ROWS, 96), {"data": data})
        ref = dequantize(q)
        got = gd.dequantize_rows(qtype, data, 96, torch.float32, rows_per_program=2)
        same = (got == ref) | (got.isnan() & ref.isnan())
        assert same.all(), qtype


@pytest.mark.parametrize("qtype,split,unroll", [("Q4_K", 1, 1), ("Q6_K", 2, 2), ("Q4_0", 2, 1), ("IQ4_XS", 1, 4)])
def test_gemv_matches_dense_product(qtype: str, split: int, unroll: int) -> None:
    k = 512
    q = _packed(qtype, k, seed=5)
    x = torch.randn(k, generator=torch.Generator().manual_seed(6))
    bias = torch.randn(ROWS, generator=torch.Generator().manual_seed(7))
    w = dequantize(q).double()
    ref = w @ x.double() + bias.double()
    y = gd.gemv_rows(qtype, q.data, k, x, bias, rows_per_program=4, split=split, unroll=unroll)
    assert y.shape == (ROWS,) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_engine_entry_points_on_nd_weights() -> None:
    """What QLinear/QExperts call on CUDA (device-agnostic under the interpreter): an expert stack
    [E, out, in] dequantized whole, and the per-weight launch plan reused on a second call."""
    w = torch.randn(3, 4, 256, generator=torch.Generator().manual_seed(8))
    q = quantize(w, "Q4_K")
    ref = dequantize(q)
    for _ in range(2):
        got = kernels.dequantize(q, torch.float32)
        assert got.shape == (3, 4, 256) and _bits_equal(got, ref)
    q2 = quantize(w[0], "Q6_K")
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(9))
    y = kernels.gemv(x, q2)
    assert y.shape == (1, 1, 4)
    assert torch.allclose(y, torch.nn.functional.linear(x, dequantize(q2)), rtol=1e-5, atol=1e-5)


def test_bad_packed_size_is_a_shape_error() -> None:
    q = QTensor("Q4_K", (4, 256), {"data": torch.zeros(4, 100, dtype=torch.uint8)})
    with pytest.raises(ShapeError, match="Q4_K tensor of shape"):
        kernels._rows(q)
    q = QTensor("Q4_0", (4, 40), {"data": torch.zeros(4, 18, dtype=torch.uint8)})
    with pytest.raises(ShapeError, match="multiple of the block size 32"):
        kernels._rows(q)


def test_cpu_tensors_keep_the_reference_path() -> None:
    q = _packed("Q4_K", 256, seed=1)
    assert not kernels.has_dequant_kernel(q, torch.bfloat16)
    assert not kernels.can_gemv(torch.zeros(256), q)
