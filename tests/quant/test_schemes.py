"""The scheme registry: public dispatch next to GGML, shared guarantees, CUDA."""

from __future__ import annotations

import pytest
import torch

from quantbench.errors import ImatrixError, UnknownTypeError
from quantbench.quant import QTensor, dequantize, quantize
from quantbench.quant.schemes import all_schemes, get_scheme, reconstruction_error

NAMES = [s.name for s in all_schemes()]


def _weight(shape=(64, 256), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


def test_registry_contents() -> None:
    for name in ["HQQ4", "HQQ8", "AFQ2", "AFQ3", "AFQ4", "AFQ5", "AFQ6", "AFQ8", "AFQ4_G32", "AFQ4_G128",
                 "FP8", "FP8_TENSOR", "FP8_CHANNEL", "FP8_BLOCK", "F8Q8", "MXFP4_ISQ", "MXFP4_OCP",
                 "NF4", "NF4_DQ", "FP4", "FP4_DQ", "INT8"]:
        assert name in NAMES
    isq = {s.isq_name for s in all_schemes() if s.isq_name}
    assert {"HQQ4", "HQQ8", "AFQ2", "AFQ3", "AFQ4", "AFQ6", "AFQ8", "FP8", "F8Q8", "MXFP4"} == isq
    assert get_scheme("hqq4") is get_scheme("HQQ4")
    with pytest.raises(UnknownTypeError, match="AFQ7"):
        get_scheme("AFQ7")


@pytest.mark.parametrize("name", NAMES)
def test_every_scheme_roundtrip_zeros_and_size(name: str) -> None:
    w = _weight()
    q = quantize(w, name, name="blk.0.w")
    assert isinstance(q, QTensor) and q.qtype == name and q.shape == tuple(w.shape)
    r = dequantize(q)
    assert r.dtype == torch.float32 and r.shape == w.shape and torch.isfinite(r).all()
    err = reconstruction_error(w, q)
    assert err["rel_rmse"] < 0.45
    assert q.bits_per_weight == pytest.approx(get_scheme(name).bits_per_weight(w.shape, w.dtype))
    z = dequantize(quantize(torch.zeros_like(w), name))
    assert torch.equal(z, torch.zeros_like(w))


def test_ggml_dispatch_unchanged_and_options_rejected() -> None:
    w = _weight((4, 64))
    q = quantize(w, "Q4_0")
    assert q.qtype == "Q4_0" and set(q.tensors) == {"data"}
    assert dequantize(q).shape == (4, 64)
    with pytest.raises(UnknownTypeError, match="takes no options"):
        quantize(w, "Q4_0", optimization_steps=3)
    with pytest.raises(UnknownTypeError, match="NOPE"):
        quantize(w, "NOPE")
    with pytest.raises(ImatrixError, match="data-free"):
        quantize(w, "AFQ4", torch.ones(64))
    with pytest.raises(UnknownTypeError, match="group_size"):
        quantize(w, "AFQ4", group_size=32)
    q = quantize(w, "HQQ4", optimization_steps=3)
    assert q.params["optimization_steps"] == 3


def test_reconstruction_error_helper() -> None:
    w = torch.tensor([[3.0, 4.0]])
    e = reconstruction_error(w, torch.tensor([[3.0, 5.0]]))
    assert e == {"rmse": pytest.approx(0.5 ** 0.5), "rel_rmse": pytest.approx(0.2), "max_abs": 1.0, "mae": 0.5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda(name: str) -> None:
    """Dequantizing on CUDA gives the CPU result; quantizing on CUDA reconstructs as well as on CPU."""
    w = _weight((256, 256), 3)
    q = quantize(w, name)
    cpu = dequantize(q)
    gpu = dequantize(q.to("cuda"))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)
    qg = quantize(w.cuda(), name)
    assert all(t.is_cuda for t in qg.tensors.values())
    e_cpu = reconstruction_error(w, q)["rel_rmse"]
    e_gpu = reconstruction_error(w.cuda(), qg)["rel_rmse"]
    assert e_gpu == pytest.approx(e_cpu, rel=0.01)
