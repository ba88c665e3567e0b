"""`quantbench inspect` on the three containers: GGUF, a UQFF output and a HF model directory."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from quantbench.cli.main import main
from quantbench.jobs.quantize_uqff import quantize_uqff
from tests.formats import make_llama_dir


def test_inspect_uqff_and_hf_dir(tmp_path: Path):
    src = make_llama_dir(tmp_path / "m")
    quantize_uqff(src, tmp_path / "out" / "q8_0.uqff", "q8_0")
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "out" / "q8_0.uqff")])
    assert r.exit_code == 0, r.output
    assert "by type: q8_0 ×16" in r.output
    r = CliRunner().invoke(main, ["inspect", str(src)])
    assert r.exit_code == 0, r.output
    assert "model_type=llama" in r.output and "q_proj" in r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.uqff")])
    assert r.exit_code == 1 and "missing-0.uqff" in r.stderr
