"""The engine runs UQFF outputs written by mistral.rs (``write_uqff``) and by quantbench.

SmolLM2 is converted GGUF → HF dir by quantbench; mistral.rs quantizes that directory with its
own ISQ and writes UQFF; quantbench loads it (``uqff_source.load_uqff_model``) and measures PPL on
WikiText-2 windows. quantbench's UQFF writer quantizes as mistral.rs's ISQ does (llama.cpp's
reference quantizer for Q8_0, candle's K-quant search for Q4K), so both files hold the same bytes
and give the same PPL.
"""

from __future__ import annotations

import pytest
import torch

from quantbench.engine.perplexity import evaluate
from quantbench.engine.uqff_source import load_uqff_model, uqff_items
from quantbench.errors import FormatError
from tests.formats import WIKI, make_llama_dir, mistralrs, mistralrs_available

pytestmark = pytest.mark.skipif(not mistralrs_available(), reason="needs the mistralrs==0.9.5 wheel")
CTX, CHUNKS = 256, 4


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    from quantbench.jobs.convert import convert
    from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

    d = tmp_path_factory.mktemp("smol") / "hf"
    convert(make_f32_gguf(smollm2_gguf()), d)
    return d


@pytest.fixture(scope="module")
def text() -> str:
    return WIKI.read_text(encoding="utf-8")[:60_000]


def _pair(smol_dir, tmp_path_factory, isq: str, ours: str):
    from quantbench.jobs.quantize_uqff import quantize_uqff

    base = tmp_path_factory.mktemp(f"uqff_{ours}")
    mistralrs(smol_dir, isq=isq, write_uqff=base / "mistral" / f"{ours}.uqff")
    quantize_uqff(smol_dir, base / "qb" / f"{ours}.uqff", [ours])
    return base / "mistral" / f"{ours}.uqff", base / "qb" / f"{ours}.uqff"


@pytest.mark.parametrize("isq,stem", [("Q8_0", "q8_0"), ("Q4K", "q4k")])
def test_mistralrs_uqff_ppl_equals_quantbench(smol_dir, text, tmp_path_factory, isq, stem):
    theirs, ours = _pair(smol_dir, tmp_path_factory, isq, stem)
    from quantbench.formats.uqff import UqffFile

    with UqffFile(theirs) as a, UqffFile(ours) as b:
        assert a.metadata["uqff.producer"] == "mistral.rs"
        assert set(a.layers) == set(b.layers)
        for k in a.layers:
            assert torch.equal(a.read_layer(k)[0].data, b.read_layer(k)[0].data), k
    p_theirs = evaluate(load_uqff_model(theirs), text, ctx=CTX, chunks=CHUNKS).ppl
    p_ours = evaluate(load_uqff_model(ours), text, ctx=CTX, chunks=CHUNKS).ppl
    print(f"SmolLM2 {isq} PPL (ctx {CTX}, {CHUNKS} chunks): mistral.rs UQFF {p_theirs:.4f}, quantbench UQFF {p_ours:.4f}")
    assert abs(p_theirs - p_ours) / p_ours < 1e-3


def test_uqff_items_yield_packed_layers_and_residual(tmp_path):
    from quantbench.jobs.quantize_uqff import quantize_uqff
    from quantbench.quant.qtensor import QTensor

    src = make_llama_dir(tmp_path / "tiny")
    out = tmp_path / "u" / "q4k.uqff"
    quantize_uqff(src, out, ["q4k"])
    cfg, items = uqff_items(out)
    got = dict(items)
    assert cfg["model_type"] == "llama"
    assert isinstance(got["model.layers.0.self_attn.q_proj.weight"], QTensor)
    assert not isinstance(got["model.norm.weight"], QTensor)
    # the residual can also come from the original model dir when it is not beside the UQFF
    (tmp_path / "u" / "residual.safetensors").unlink()
    with pytest.raises(FormatError, match="residual"):
        uqff_items(out)
    _, items2 = uqff_items(out, src)
    got2 = dict(items2)
    assert set(got2) == set(got)
    assert torch.equal(got2["model.norm.weight"], got["model.norm.weight"])


def test_missing_config_is_a_clear_error(tmp_path):
    from quantbench.jobs.quantize_uqff import quantize_uqff

    src = make_llama_dir(tmp_path / "tiny")
    out = tmp_path / "u" / "q8_0.uqff"
    quantize_uqff(src, out, ["q8_0"])
    (tmp_path / "u" / "config.json").unlink()
    with pytest.raises(FormatError, match="config.json"):
        load_uqff_model(out)
