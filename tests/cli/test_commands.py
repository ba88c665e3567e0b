"""The CLI commands run end to end on a small local GGUF and print what they made."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from quantbench.cli.main import main
from quantbench.formats.gguf import read_gguf
from tests.gguf_models import tiny_llama_gguf


def test_quantize_then_inspect(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "q.gguf"
    res = CliRunner().invoke(main, ["quantize", "-m", str(src), "--isq", "Q4_K_M", "-o", str(out), "--device", "cpu",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "bits/weight" in res.output
    g = read_gguf(out)
    types = {t.name: t.ggml_type for t in g.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert g.values()["general.file_type"] == 15
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "blk.0.attn_q.weight" in res.output and "Q4_K" in res.output
    assert "bits/weight" in res.output and "general.file_type" in res.output


def test_pure_single_type(tmp_path: Path) -> None:
    src = tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "q.gguf"
    res = CliRunner().invoke(main, ["quantize", "-m", str(src), "--isq", "Q8_0", "--pure", "-o", str(out),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    types = {t.ggml_type for t in read_gguf(out).tensors if len(t.shape) == 2}
    assert types == {"Q8_0"}
