"""End to end on the real model: quantbench quantize == llama-quantize (types, order, metadata, bytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantbench.formats.gguf import read_gguf
from quantbench.jobs.quantize_gguf import quantize_gguf
from tests import llama_tools
from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def f32_model() -> Path:
    return make_f32_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def imatrix_gguf(f32_model: Path) -> Path:
    return llama_tools.llama_imatrix(f32_model, llama_tools.SHARED_DATA / "calibration_datav3.txt", chunks=4, ctx=256)


@pytest.fixture(scope="module")
def imatrix_dat(f32_model: Path) -> Path:
    return llama_tools.llama_imatrix(f32_model, llama_tools.SHARED_DATA / "calibration_datav3.txt", chunks=4, ctx=256,
                                     fmt="dat")


def assert_same_gguf(ours: Path, ref: Path, *, skip_keys: tuple[str, ...] = ()) -> None:
    a, b = read_gguf(ours), read_gguf(ref)
    ka = [k for k in a.metadata if k not in skip_keys]
    kb = [k for k in b.metadata if k not in skip_keys]
    assert ka == kb, "metadata keys or their order differ"
    for k in ka:
        va, vb = a.metadata[k], b.metadata[k]
        assert va.vtype == vb.vtype and va.value == vb.value, f"metadata {k}: {va.value!r} != {vb.value!r}"
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors], "tensor order differs"
    wrong_types = [(t.name, t.ggml_type, u.ggml_type) for t, u in zip(a.tensors, b.tensors) if t.ggml_type != u.ggml_type]
    assert not wrong_types, f"{len(wrong_types)} tensor types differ, e.g. {wrong_types[:3]}"
    for t, u in zip(a.tensors, b.tensors):
        assert t.shape == u.shape, t.name
        ra, rb = np.asarray(t._raw).reshape(-1).view(np.uint8), np.asarray(u._raw).reshape(-1).view(np.uint8)
        if not np.array_equal(ra, rb):
            nbad = int((ra != rb).sum())
            pytest.fail(f"{t.name} ({t.ggml_type}): {nbad} of {ra.size} bytes differ")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q6_K", "Q8_0", "IQ4_XS"])
def test_same_file_as_llama_quantize(ftype: str, f32_model: Path, tmp_path: Path) -> None:
    ref = llama_tools.llama_quantize(f32_model, ftype)
    ours = tmp_path / f"{ftype}.gguf"
    quantize_gguf(f32_model, ours, ftype, device="cpu")
    assert_same_gguf(ours, ref)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K"])
def test_same_file_with_gguf_imatrix(ftype: str, f32_model: Path, imatrix_gguf: Path, tmp_path: Path) -> None:
    ref = llama_tools.llama_quantize(f32_model, ftype, imatrix=imatrix_gguf)
    ours = tmp_path / f"{ftype}.gguf"
    quantize_gguf(f32_model, ours, ftype, imatrix=imatrix_gguf, device="cpu")
    assert_same_gguf(ours, ref)


def test_same_file_with_legacy_dat_imatrix(f32_model: Path, imatrix_dat: Path, tmp_path: Path) -> None:
    ref = llama_tools.llama_quantize(f32_model, "Q4_0", imatrix=imatrix_dat)
    ours = tmp_path / "q4_0.gguf"
    quantize_gguf(f32_model, ours, "Q4_0", imatrix=imatrix_dat, device="cpu")
    assert_same_gguf(ours, ref)


def test_pure(f32_model: Path, tmp_path: Path) -> None:
    ref = llama_tools.llama_quantize(f32_model, "Q5_1", pure=True)
    ours = tmp_path / "q5_1-pure.gguf"
    quantize_gguf(f32_model, ours, "Q5_1", pure=True, device="cpu")
    assert_same_gguf(ours, ref)


def test_quantized_file_runs_in_llama_cpp(f32_model: Path, tmp_path: Path) -> None:
    """Our Q4_K_M file loads in llama-perplexity and scores WikiText-2 like the F32 reference."""
    ours = tmp_path / "q4_k_m.gguf"
    quantize_gguf(f32_model, ours, "Q4_K_M", device="cpu")
    text = llama_tools.SHARED_DATA / "wiki.test.raw"
    ppl_q = llama_tools.llama_perplexity(ours, text, chunks=4, ctx=256)
    ppl_f = llama_tools.llama_perplexity(f32_model, text, chunks=4, ctx=256)
    assert np.isfinite(ppl_q) and ppl_f < ppl_q < ppl_f * 1.25, (ppl_q, ppl_f)
