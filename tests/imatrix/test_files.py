"""llama.cpp imatrix files: read both formats, write both, and round-trip without loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantbench.errors import ImatrixError
from quantbench.imatrix.files import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_dat, write_imatrix_gguf
from tests import llama_tools
from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf


def _sample() -> Imatrix:
    rng = np.random.default_rng(0)
    entries = {
        "blk.0.attn_q.weight": ImatrixEntry((rng.random(64) * 10).astype(np.float32), np.array([40])),
        "blk.0.ffn_down.weight": ImatrixEntry((rng.random(128) * 3).astype(np.float32), np.array([40])),
        # two experts, one never routed to: its weights must come out as ones, never NaN
        "blk.0.ffn_up_exps.weight": ImatrixEntry((rng.random(2 * 64)).astype(np.float32), np.array([12, 0])),
    }
    entries["blk.0.attn_q.weight"].sums[:8] = 0.0  # zero columns
    return Imatrix(entries, ["calibration_datav3.txt"], chunk_count=4, chunk_size=256)


def test_gguf_round_trip(tmp_path: Path) -> None:
    im = _sample()
    write_imatrix_gguf(im, tmp_path / "a.gguf")
    back = read_imatrix(tmp_path / "a.gguf")
    assert back.datasets == im.datasets and back.chunk_count == 4 and back.chunk_size == 256
    assert set(back.entries) == set(im.entries)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)


def test_quant_weights_never_nan() -> None:
    im = _sample()
    w = im.quant_weights("blk.0.ffn_up_exps.weight")
    assert np.isfinite(w).all()
    np.testing.assert_array_equal(w[64:], np.ones(64, np.float32))  # expert with count 0
    q = im.quant_weights("blk.0.attn_q.weight")
    assert np.isfinite(q).all() and (q[:8] == 0).all()


def test_dat_round_trip_keeps_quant_weights(tmp_path: Path) -> None:
    im = _sample()
    del im.entries["blk.0.ffn_up_exps.weight"]  # the legacy format has one count per entry
    write_imatrix_dat(im, tmp_path / "a.dat")
    back = read_imatrix(tmp_path / "a.dat")
    assert back.is_legacy and back.chunk_count == 4 and back.datasets == im.datasets
    for name in im.entries:
        np.testing.assert_allclose(back.quant_weights(name), im.quant_weights(name), rtol=1e-6)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00\x00", b"\x02\x00\x00\x00\x05\x00\x00\x00abc"])
def test_broken_files_are_refused(tmp_path: Path, payload: bytes) -> None:
    p = tmp_path / "bad.dat"
    p.write_bytes(payload)
    with pytest.raises(ImatrixError, match="bad.dat"):
        read_imatrix(p)


@pytest.mark.oracle
def test_llama_imatrix_file_rewritten_by_us_gives_same_quantization(tmp_path: Path) -> None:
    """Read llama-imatrix's GGUF, write it back with quantbench: llama-quantize makes the same bytes from both."""
    f32 = make_f32_gguf(smollm2_gguf())
    theirs = llama_tools.llama_imatrix(f32, llama_tools.SHARED_DATA / "calibration_datav3.txt", chunks=4, ctx=256)
    ours = tmp_path / "ours.imatrix.gguf"
    write_imatrix_gguf(read_imatrix(theirs), ours)
    a = llama_tools.llama_quantize(f32, "Q4_K_M", imatrix=theirs)
    b = llama_tools.llama_quantize(f32, "Q4_K_M", imatrix=ours)
    from quantbench.formats.gguf import read_gguf

    ta, tb = read_gguf(a).tensors, read_gguf(b).tensors
    assert [t.name for t in ta] == [t.name for t in tb]
    for x, y in zip(ta, tb):
        assert np.array_equal(np.asarray(x._raw), np.asarray(y._raw)), x.name
