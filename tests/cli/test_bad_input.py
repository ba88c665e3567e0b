"""Bad input: one-line typed error, non-zero exit, nothing left under the output name."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from quantbench.cli.main import main
from tests.gguf_models import tiny_llama_gguf


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


def _assert_clean_error(res, out: Path, needle: str) -> None:
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.split("\n") if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    # one error line, the last thing printed (a progress bar may precede it)
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), res.stderr
    msg = errors[0]
    assert needle in msg, msg
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.partial") for p in out.parent.iterdir())


def test_truncated_gguf(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    data = src.read_bytes()
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out.gguf"
    _assert_clean_error(_run(["quantize", "-m", str(bad), "--isq", "Q4_0", "-o", str(out)]), out, "trunc.gguf")


def test_truncated_header(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    bad = tmp_path / "head.gguf"
    bad.write_bytes(src.read_bytes()[:200])
    out = tmp_path / "out.gguf"
    _assert_clean_error(_run(["quantize", "-m", str(bad), "--isq", "Q4_0", "-o", str(out)]), out, "head.gguf")


def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "notgguf.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    out = tmp_path / "out.gguf"
    _assert_clean_error(_run(["quantize", "-m", str(bad), "--isq", "Q4_0", "-o", str(out)]), out, "not a GGUF file")


def test_unknown_isq(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out.gguf"
    _assert_clean_error(_run(["quantize", "-m", str(src), "--isq", "Q4_K_Z", "-o", str(out)]), out, "Q4_K_Z")


def _write_dat(path: Path, entries: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, v in entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 1, v.size))
            f.write(v.astype("<f4").tobytes())


def test_imatrix_for_other_model_names(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    im = tmp_path / "other.dat"
    _write_dat(im, {"model.layers.0.mlp.up_proj": np.ones(64, np.float32)})
    out = tmp_path / "out.gguf"
    res = _run(["quantize", "-m", str(src), "--isq", "Q4_K_M", "--imatrix", str(im), "-o", str(out)])
    _assert_clean_error(res, out, "another model")


def test_imatrix_for_other_model_sizes(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    im = tmp_path / "sizes.dat"
    _write_dat(im, {"blk.0.attn_q.weight": np.ones(100, np.float32)})
    out = tmp_path / "out.gguf"
    res = _run(["quantize", "-m", str(src), "--isq", "Q4_K_M", "--imatrix", str(im), "-o", str(out)])
    _assert_clean_error(res, out, "blk.0.attn_q.weight")


def test_garbage_imatrix(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    im = tmp_path / "junk.dat"
    im.write_bytes(b"\xff\xff\xff\x7f" + b"junk")
    out = tmp_path / "out.gguf"
    res = _run(["quantize", "-m", str(src), "--isq", "Q4_K_M", "--imatrix", str(im), "-o", str(out)])
    _assert_clean_error(res, out, "junk.dat")


def test_missing_model(tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    _assert_clean_error(_run(["quantize", "-m", str(tmp_path / "nope.gguf"), "--isq", "Q4_0", "-o", str(out)]), out,
                        "nope.gguf")


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor that fails after the header was written: the partial file is removed."""
    src = tiny_llama_gguf(tmp_path / "m.gguf", nan_tensor="blk.1.ffn_up.weight")
    out = tmp_path / "out.gguf"
    _assert_clean_error(_run(["quantize", "-m", str(src), "--isq", "Q8_0", "-o", str(out)]), out, "blk.1.ffn_up.weight")
