"""Every GGML type: our packed bytes equal llama.cpp's ``ggml_quantize_chunk``, with and without imatrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.quant import all_types, dequantize, quantize
from tests.quant.ggml.cases import check_against_oracle, make_cases, make_imatrix

QUANT_TYPES = [t.name for t in all_types()]


def _row_len(block_size: int) -> int:
    # 512 covers two super-blocks; 768 = 3 of them; legacy types also get an odd count of blocks.
    return 768 if block_size == 256 else 32 * 7


@pytest.mark.oracle
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_bytes_identical(qtype: str, use_imatrix: bool, ggml_oracle) -> None:
    from quantbench.quant import get_type

    t = get_type(qtype)
    n = _row_len(t.block_size)
    im = make_imatrix(n) if use_imatrix else None
    for case, x in make_cases(n).items():
        check_against_oracle(qtype, x, im, ggml_oracle, f"{qtype}/{case}")


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_dequantize_matches_gguf_py(qtype: str) -> None:
    import gguf
    from gguf import quants as gq
    from quantbench.quant import get_type

    t = get_type(qtype)
    if qtype in ("Q8_1", "Q8_K"):
        pytest.skip("gguf-py has no dequantizer for this type")  # see test_q8_1_dequantize / test_kquants_symmetric
    n = _row_len(t.block_size)
    x = make_cases(n)["heavy_tailed"]
    q = quantize(torch.from_numpy(x), qtype)
    ours = dequantize(q).numpy()
    ref = gq.dequantize(q.data.numpy(), gguf.GGMLQuantizationType(t.ggml_id))
    np.testing.assert_array_equal(ours, ref.reshape(ours.shape).astype(np.float32))


def test_q8_1_dequantize() -> None:
    """Q8_1 block = fp16 d, fp16 s (= d * sum q), 32 int8 q: value = d * q, decoded by hand here."""
    x = make_cases(64)["heavy_tailed"]
    q = quantize(torch.from_numpy(x), "Q8_1")
    raw = q.data.numpy().reshape(-1, 36)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    s = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = raw[:, 4:].copy().view(np.int8).astype(np.float32)
    np.testing.assert_array_equal(dequantize(q).numpy().reshape(-1, 32), qs * d)
    np.testing.assert_allclose(s[:, 0], (qs.sum(1) * d[:, 0]).astype(np.float16).astype(np.float32), rtol=1e-3)
