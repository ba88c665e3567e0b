"""Collecting an imatrix through the engine, against llama-imatrix and a float64 reference forward pass."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from quantbench.errors import ImatrixError
from quantbench.imatrix.collect import calibration_windows, collect_imatrix, imatrix_command
from quantbench.imatrix.files import read_imatrix, write_imatrix
from quantbench.imatrix.names import gguf_to_hf
from tests import llama_tools
from tests.imatrix.test_cimatrix import make_tiny_hf, reference_stats
from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

TEXT = llama_tools.SHARED_DATA / "calibration_datav3.txt"
CHUNKS, CTX = 3, 512


def _llama_imatrix_exact(model: Path, text: Path, *, chunks: int, ctx: int) -> Path:
    """llama-imatrix with an F32 KV cache and flash attention off: F32 arithmetic end to end.

    Its default run (F16 KV cache, CPU flash attention) rounds attention internals to half
    precision, which moves attn_output/ffn_down statistics by up to ~1e-3 relative. ``-b ctx``
    evaluates one window per batch: with several windows per batch llama.cpp may cut a micro-batch
    of fewer than 16 tokens, which llama-imatrix then skips (3x512 in one batch counts 1530 rows).
    """
    out = llama_tools.CACHE / f"{model.stem}-imatrix-f32kv-{chunks}x{ctx}-{llama_tools._key(model, text, chunks, ctx)}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
        llama_tools.run([llama_tools.need("llama-imatrix"), "-m", model, "-f", text, "-o", tmp, "--chunks", chunks,
                         "-c", ctx, "-b", ctx, "-t", "2", "--no-ppl", "-ctk", "f32", "-ctv", "f32", "-fa", "off"])
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def smollm2_f32() -> Path:
    return make_f32_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def ours(smollm2_f32: Path):
    from quantbench.engine import load_model

    return collect_imatrix(load_model(smollm2_f32, dtype="f32", device="cpu"), TEXT, ctx=CTX, chunks=CHUNKS,
                           progress=False)


def _compare(theirs, ours, chunks: int, ctx: int) -> tuple[float, float]:
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (chunks, ctx)
    worst_norm = worst_elem = 0.0
    for name, t in theirs.entries.items():
        o = ours.entries[name]
        assert o.counts.tolist() == t.counts.tolist() == [chunks * ctx], name
        diff = np.abs(o.sums.astype(np.float64) - t.sums)
        worst_norm = max(worst_norm, float(diff.max() / np.abs(t.sums).max()))
        worst_elem = max(worst_elem, float((diff / np.maximum(np.abs(t.sums), 1e-30)).max()))
    return worst_norm, worst_elem


@pytest.mark.oracle
def test_matches_llama_imatrix(smollm2_f32: Path, ours) -> None:
    """Same tokens, windows and statistics as llama-imatrix (F32 arithmetic): 210 tensors of SmolLM2."""
    theirs = read_imatrix(_llama_imatrix_exact(smollm2_f32, TEXT, chunks=CHUNKS, ctx=CTX))
    assert len(theirs.entries) == 30 * 7
    worst_norm, worst_elem = _compare(theirs, ours, CHUNKS, CTX)
    assert worst_elem < 1e-3 and worst_norm < 1e-4, (worst_elem, worst_norm)


@pytest.mark.oracle
def test_close_to_default_llama_imatrix(smollm2_f32: Path) -> None:
    """llama-imatrix's defaults (F16 KV cache, flash attention) differ only by half-precision rounding."""
    from quantbench.engine import load_model

    theirs = read_imatrix(llama_tools.llama_imatrix(smollm2_f32, TEXT, chunks=2, ctx=256))
    ours = collect_imatrix(load_model(smollm2_f32, dtype="f32", device="cpu"), TEXT, ctx=256, chunks=2,
                           progress=False)
    worst_norm, _ = _compare(theirs, ours, 2, 256)
    assert worst_norm < 1e-3, worst_norm


@pytest.mark.oracle
def test_llama_quantize_accepts_our_gguf_imatrix(smollm2_f32: Path, ours, tmp_path: Path) -> None:
    from quantbench.formats.gguf import read_gguf

    path = tmp_path / "ours.imatrix.gguf"
    write_imatrix(ours, path)
    meta = read_gguf(llama_tools.llama_quantize(smollm2_f32, "Q4_K_M", imatrix=path)).values()
    assert meta["quantize.imatrix.entries_count"] == 210
    assert meta["quantize.imatrix.chunks_count"] == CHUNKS
    assert meta["quantize.imatrix.dataset"] == str(TEXT)


# ------------------------------------------------------------------ tiny HF models (fast)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_statistics_equal_a_float64_forward_pass(tmp_path: Path, kind: str) -> None:
    """Every linear input of the engine (MoE: per expert, with routing counts) against a reference."""
    from quantbench.engine import load_model

    model = make_tiny_hf(tmp_path / kind, kind)
    lm = load_model(model, dtype="f32", device="cpu")
    ctx, chunks = 64, 3
    im = collect_imatrix(lm, TEXT, ctx=ctx, chunks=chunks, progress=False)
    text = TEXT.read_text()[:-1] if TEXT.read_text().endswith("\n") else TEXT.read_text()
    windows = calibration_windows(lm.tokenizer.encode(text, add_special=True, parse_special=False), ctx, chunks,
                                  lm.tokenizer.bos_id if lm.tokenizer.add_bos else None, "calibration")
    refs = [reference_stats(model, w.tolist(), q8=False) for w in windows]
    assert "output.weight" not in im.entries  # only with --process-output
    for name, e in im.entries.items():
        hf = gguf_to_hf(name, kind)
        if name.endswith("_exps.weight"):
            n_exp = len(e.counts)
            counts = sum(r[hf.rsplit(".", 1)[0] + ".counts"] for r in refs)
            assert e.counts.tolist() == counts.tolist(), name
            assert counts.sum() == ctx * chunks * 2  # top-2
            sums = sum(r[hf].reshape(n_exp, -1) * r[hf.rsplit(".", 1)[0] + ".counts"][:, None] for r in refs)
            want = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 1.0).reshape(-1)
        else:
            assert e.counts.tolist() == [ctx * chunks], name
            want = sum(r[hf] for r in refs) / len(refs)
        got = im.quant_weights(name)
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, name


def test_command_writes_every_format(tiny: Path, tmp_path: Path) -> None:
    reports = {}
    for out, fmt in (("a.gguf", None), ("a.imatrix", None), ("a.cimatrix", None), ("a.bin", "cimatrix")):
        reports[out] = imatrix_command(str(tiny), str(TEXT), str(tmp_path / out), ctx=32, chunks=2, fmt=fmt,
                                       device="cpu", progress=False)
    assert [r.fmt for r in reports.values()] == ["gguf", "dat", "cimatrix", "cimatrix"]
    r = reports["a.gguf"]
    assert (r.entries, r.chunks, r.tokens) == (14, 2, 64) and r.tokens_per_second > 0
    g = read_imatrix(tmp_path / "a.gguf")
    for other in ("a.imatrix", "a.cimatrix"):
        o = read_imatrix(tmp_path / other)
        for name in g.entries:
            assert np.array_equal(o.quant_weights(name), g.quant_weights(name)), (other, name)
    assert read_imatrix(tmp_path / "a.bin", "cimatrix").entries.keys() == g.entries.keys()


def test_process_output_adds_the_output_head(tiny: Path, tmp_path: Path) -> None:
    imatrix_command(str(tiny), str(TEXT), str(tmp_path / "o.gguf"), ctx=32, chunks=2, process_output=True,
                    device="cpu", progress=False)
    e = read_imatrix(tmp_path / "o.gguf").entries["output.weight"]
    assert e.counts.tolist() == [64] and e.sums.size == 256


@pytest.mark.parametrize(
    "content,why",
    [(b"", "empty"), (b"\n  \n", "empty"), (b"short text", "fewer than one window"), (b"\xff\xfe text", "not UTF-8")],
)
def test_bad_calibration_text_is_refused(tiny: Path, tmp_path: Path, content: bytes, why: str) -> None:
    cal = tmp_path / "cal.txt"
    cal.write_bytes(content)
    out = tmp_path / "x.gguf"
    with pytest.raises(ImatrixError, match=why) as ei:
        imatrix_command(str(tiny), str(cal), str(out), ctx=32, device="cpu", progress=False)
    assert "cal.txt" in str(ei.value)
    assert not out.exists()


def test_bad_options_are_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match="--format"):
        imatrix_command("no-such-model", str(TEXT), str(tmp_path / "x.npz"))
    with pytest.raises(ImatrixError, match="no such calibration file"):
        imatrix_command("no-such-model", str(tmp_path / "missing.txt"), str(tmp_path / "x.gguf"))
    with pytest.raises(ImatrixError, match="at least 16"):
        calibration_windows(list(range(100)), 8, None, None, "t")
    with pytest.raises(ImatrixError, match="--chunks 0"):
        calibration_windows(list(range(100)), 16, 0, None, "t")


def test_windows_follow_llama_imatrix() -> None:
    w = calibration_windows(list(range(10, 110)), 16, None, 1, "t")
    assert w.shape == (6, 16)  # 100 // 16 windows, the tail dropped
    assert w[:, 0].tolist() == [1] * 6 and w[1, 1:].tolist() == list(range(27, 42))
    assert calibration_windows(list(range(100)), 16, 2, None, "t")[:, 0].tolist() == [0, 16]
