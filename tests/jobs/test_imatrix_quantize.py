"""An imatrix collected by quantbench, fed to quantbench and to llama-quantize: same bytes, better quality.

The imatrix is collected through the engine (``collect_imatrix``) on calibration_datav3.txt,
4 windows of 256 tokens, and written as a llama.cpp GGUF imatrix. llama-quantize reads that GGUF
file; quantbench reads it too, and also its ``.dat`` and ``.cimatrix`` conversions. Both
conversions are lossless for quantization on a dense model: ``.cimatrix`` stores the per-column
weights ``sums / count`` themselves, ``.dat`` stores them times a power-of-two ``ncall`` (exact
in float32), so the quantizers see bit-identical weights and must write identical bytes.

The quality check is the direction the imatrix exists for: with it, Q2_K and Q3_K_M lose less
(mean KL divergence against the F32 model on WikiText-2 test) than without.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from quantbench.formats.gguf import read_gguf
from quantbench.imatrix.files import Imatrix, read_imatrix, write_imatrix
from quantbench.jobs.quantize_gguf import quantize_gguf
from tests import llama_tools
from tests.jobs.test_quantize_gguf_vs_llama_quantize import assert_same_gguf
from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

pytestmark = pytest.mark.oracle

CALIBRATION = llama_tools.SHARED_DATA / "calibration_datav3.txt"
WIKI = llama_tools.SHARED_DATA / "wiki.test.raw"
CAL_CHUNKS, CAL_CTX = 4, 256
# Q4_K_M with an imatrix is also held to llama-quantize (llama-imatrix's file) in
# test_quantize_gguf_vs_llama_quantize.py; kept out here for the suite's time.
FTYPES = ["Q2_K", "Q3_K_M", "IQ4_XS"]
IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count")


@pytest.fixture(scope="module")
def f32_model() -> Path:
    return make_f32_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def f32_lm(f32_model: Path):
    from quantbench.engine import load_model

    return load_model(f32_model, dtype="f32", device="cpu")


@pytest.fixture(scope="module")
def collected(f32_lm) -> Imatrix:
    from quantbench.imatrix.collect import collect_imatrix

    return collect_imatrix(f32_lm, CALIBRATION, ctx=CAL_CTX, chunks=CAL_CHUNKS, progress=False)


@pytest.fixture(scope="module")
def imatrix_files(collected: Imatrix, tmp_path_factory) -> dict[str, Path]:
    """The collected imatrix as GGUF, ``.dat`` and ``.cimatrix``.

    The GGUF file is kept under a name made of its content hash, so the cached llama-quantize
    outputs (keyed by the imatrix file's name, size and mtime) are reused while the collected
    statistics stay the same, and remade when they change.
    """
    d = tmp_path_factory.mktemp("imatrix")
    fresh = d / "collected.gguf"
    write_imatrix(collected, fresh)
    digest = hashlib.sha256(fresh.read_bytes()).hexdigest()[:16]
    kept = llama_tools.CACHE / f"smollm2-quantbench-imatrix-{CAL_CHUNKS}x{CAL_CTX}-{digest}.gguf"
    if not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        part = kept.with_name(f"{kept.name}.partial-{os.getpid()}")
        shutil.copyfile(fresh, part)
        os.replace(part, kept)
    files = {"gguf": kept}
    for fmt, suffix in (("dat", ".imatrix"), ("cimatrix", ".cimatrix")):
        files[fmt] = d / f"collected{suffix}"
        assert write_imatrix(collected, files[fmt]) == fmt
    return files


@pytest.fixture(scope="module")
def ours(f32_model: Path, imatrix_files: dict[str, Path], tmp_path_factory) -> Callable[[str, str | None], Path]:
    """``ours(ftype, fmt)``: quantbench's quantization with the imatrix in ``fmt`` (None: without), memoized."""
    d = tmp_path_factory.mktemp("quantized")
    made: dict[tuple[str, str | None], Path] = {}

    def get(ftype: str, fmt: str | None) -> Path:
        if (ftype, fmt) not in made:
            out = d / f"{ftype}-{fmt or 'plain'}.gguf"
            quantize_gguf(f32_model, out, ftype, imatrix=imatrix_files[fmt] if fmt else None, device="cpu")
            made[ftype, fmt] = out
        return made[ftype, fmt]

    return get


def _bytes(t) -> np.ndarray:
    return np.asarray(t._raw).reshape(-1).view(np.uint8)


def test_collected_imatrix_covers_the_model(collected: Imatrix) -> None:
    assert (collected.chunk_count, collected.chunk_size) == (CAL_CHUNKS, CAL_CTX)
    assert collected.datasets == [str(CALIBRATION)]
    assert len(collected.entries) == 30 * 7  # q, k, v, o, gate, up, down in each of 30 blocks
    for name, e in collected.entries.items():
        assert e.counts.tolist() == [CAL_CHUNKS * CAL_CTX], name
        assert np.isfinite(e.sums).all() and (e.sums > 0).any(), name


@pytest.mark.parametrize("fmt", ["dat", "cimatrix"])
def test_conversions_keep_the_quantizer_weights(fmt: str, imatrix_files: dict[str, Path]) -> None:
    """What makes the cross-format byte comparisons below meaningful: bit-identical weights."""
    g, other = read_imatrix(imatrix_files["gguf"]), read_imatrix(imatrix_files[fmt])
    assert sorted(other.entries) == sorted(g.entries)
    for name in g.entries:
        a, b = g.quant_weights(name), other.quant_weights(name)
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), name


@pytest.mark.parametrize("ftype", FTYPES)
def test_same_bytes_as_llama_quantize_with_our_imatrix(ftype: str, f32_model: Path, imatrix_files: dict[str, Path],
                                                       ours) -> None:
    ref = llama_tools.llama_quantize(f32_model, ftype, imatrix=imatrix_files["gguf"])
    meta = read_gguf(ref).values()
    assert meta["quantize.imatrix.entries_count"] == 210 and meta["quantize.imatrix.chunks_count"] == CAL_CHUNKS
    # the imatrix must change what llama-quantize writes, or equal bytes would prove nothing
    plain = read_gguf(llama_tools.llama_quantize(f32_model, ftype))
    changed = [t.name for t, u in zip(read_gguf(ref).tensors, plain.tensors)
               if not np.array_equal(_bytes(t), _bytes(u))]
    assert len(changed) >= 100, f"only {len(changed)} tensors changed with the imatrix"
    assert_same_gguf(ours(ftype, "gguf"), ref)


@pytest.mark.parametrize("ftype,fmt", [("Q2_K", "dat"), ("IQ4_XS", "cimatrix")])
def test_converted_imatrix_gives_the_same_bytes(ftype: str, fmt: str, f32_model: Path,
                                                imatrix_files: dict[str, Path], ours) -> None:
    """quantbench with the .dat / .cimatrix conversion == llama-quantize with the GGUF original.

    One ftype per format: a whole-file quantization with an imatrix is the slow part of this file
    (about a minute on two idle cores). That the quantizers' weights are bit-identical for every
    tensor is checked above for both formats, which is why one whole file per format suffices.

    The ``quantize.imatrix.*`` keys name the file that was used, so they legitimately differ:
    the file name always, the dataset and chunk count where the format cannot carry them.
    """
    ref = llama_tools.llama_quantize(f32_model, ftype, imatrix=imatrix_files["gguf"])
    out = ours(ftype, fmt)
    assert_same_gguf(out, ref, skip_keys=IMATRIX_KEYS)
    meta = read_gguf(out).values()
    assert meta["quantize.imatrix.file"] == str(imatrix_files[fmt])[:127]
    assert meta["quantize.imatrix.entries_count"] == 210
    if fmt == "dat":  # the legacy format keeps the chunk count and the first dataset name
        assert meta["quantize.imatrix.chunks_count"] == CAL_CHUNKS
        assert meta["quantize.imatrix.dataset"] == str(CALIBRATION)
    else:  # .cimatrix holds values only
        assert "quantize.imatrix.chunks_count" not in meta and "quantize.imatrix.dataset" not in meta


# ------------------------------------------------------------------ quality


EVAL_CHUNKS, EVAL_CTX = 4, 512


@pytest.fixture(scope="module")
def base_logits(f32_lm, tmp_path_factory) -> Path:
    from quantbench.engine.perplexity import evaluate

    path = tmp_path_factory.mktemp("kld") / "f32.logits"
    evaluate(f32_lm, WIKI.read_text(encoding="utf-8"), ctx=EVAL_CTX, chunks=EVAL_CHUNKS, save_logits=path)
    return path


@pytest.mark.parametrize("ftype", ["Q2_K"])
def test_imatrix_lowers_kld(ftype: str, f32_model: Path, ours, base_logits: Path) -> None:
    """With the imatrix, mean KLD vs F32 (and PPL) on 4x512 WikiText-2 tokens is lower than without.

    The file without imatrix is llama-quantize's (cached, so only one more quantization runs
    here); the one with it is quantbench's, which the tests above hold equal to llama-quantize's.

    Measured with this 4x256-token imatrix: Q2_K 0.417 -> 0.290 (PPL 29.8 -> 26.4), Q3_K_M
    0.140 -> 0.081 (PPL 25.1 -> 24.1), each gap 8-10 standard errors wide; so the assertion asks
    for more than a lower number: a gap over 3 standard errors of the difference. The 20x512 table
    with a 32x512 imatrix is benchmarks/imatrix_quality.py's.
    """
    from quantbench.engine import load_model
    from quantbench.engine.perplexity import evaluate

    text = WIKI.read_text(encoding="utf-8")
    res = []
    for path in (llama_tools.llama_quantize(f32_model, ftype), ours(ftype, "gguf")):
        lm = load_model(path, dtype="f32", device="cpu")
        res.append(evaluate(lm, text, ctx=EVAL_CTX, chunks=EVAL_CHUNKS, kl_base=base_logits))
        del lm
    plain, with_im = res
    gap = plain.kld_mean - with_im.kld_mean
    # the two KLD series are correlated (same tokens), so this bound on the difference is conservative
    se = (plain.kld_err ** 2 + with_im.kld_err ** 2) ** 0.5
    summary = (f"{ftype}: KLD {plain.kld_mean:.4f}±{plain.kld_err:.4f} -> {with_im.kld_mean:.4f}±{with_im.kld_err:.4f}, "
               f"PPL {plain.ppl:.3f} -> {with_im.ppl:.3f}")
    assert gap > 3 * se, summary
    assert with_im.ppl < plain.ppl, summary
