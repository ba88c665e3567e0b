"""UQFF 1.2 against the real mistral.rs 0.9.5 wheel: reading its files, writing files it loads,
round trips of every serde type, version checks and broken files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from quantbench.errors import FormatError
from quantbench.formats.safetensors_dir import Entry, read_header, write_safetensors_stream
from quantbench.formats.uqff import (
    REPORT_NAME,
    Staging,
    UqffFile,
    qtensor_layer,
    unquant_layer,
    version_entries,
    write_uqff_output,
)
from quantbench.quant import afq, dequantize, f8q8, fp8, hqq, mxfp4_ocp, quantize
from quantbench.quant.ggml.candle_kquants import quantize_rows_candle
from tests.formats import make_llama_dir, mistralrs, mistralrs_available

pytestmark = pytest.mark.skipif(not mistralrs_available(), reason="needs the mistralrs==0.9.5 wheel (pip install mistralrs==0.9.5)")

MISTRAL_TYPES = ["Q4K", "Q6K", "Q8_0", "Q4_0", "Q5_1", "HQQ4", "AFQ4", "FP8", "F8Q8", "MXFP4"]
LEGACY = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def mistral_outputs(tiny, tmp_path_factory):
    """mistral.rs's own UQFF of the tiny model for each type: {type: dir}."""
    base = tmp_path_factory.mktemp("mistral_uqff")
    out = {}
    for t in MISTRAL_TYPES:
        d = base / t
        mistralrs(tiny, isq=t, write_uqff=d / f"{t.lower()}.uqff")
        out[t] = d
    return out


def _dequant(q) -> torch.Tensor:
    return q.to(torch.float32) if isinstance(q, torch.Tensor) else dequantize(q)


def test_reads_every_mistralrs_output(tiny, mistral_outputs):
    src = safe_open(str(tiny / "model.safetensors"), "pt")
    max_err = {"q8_0": 0.01, "q6k": 0.02, "q5_1": 0.04, "q4k": 0.1, "q4_0": 0.12, "hqq4": 0.12, "afq4": 0.12,
               "afq6": 0.03, "fp8": 0.05, "f8q8": 0.1, "mxfp4": 0.25}
    for t, d in mistral_outputs.items():
        report = json.loads((d / REPORT_NAME).read_text())["outputs"][0]
        with UqffFile(d / f"{t.lower()}.uqff") as u:
            assert u.version == (1, 2, 0)
            assert u.metadata["uqff.producer"] == "mistral.rs"
            stored = {L["module"]: L["stored"] for L in report["layer_details"]}
            assert {k: L.label for k, L in u.layers.items()} == stored, t
            for key, L in u.layers.items():
                w = src.get_tensor(key + ".weight")
                assert tuple(L.shape) == tuple(w.shape), key
                q, bias = u.read_layer(key)
                assert bias is None
                err = ((_dequant(q) - w).norm() / w.norm()).item()
                assert err < max_err[L.label], f"{t} {key} {L.label}: relative error {err}"
                if L.label in LEGACY:  # the legacy GGML quantizers agree byte for byte
                    assert torch.equal(q.data, quantize(w, LEGACY[L.label]).data), f"{t} {key}"


def test_k_quant_blocks_are_candles_and_llama_cpp_search_is_no_worse(tiny, mistral_outputs):
    """mistral.rs quantizes K types with candle's port of an older llama.cpp search; its blocks
    are exactly ``quantize_rows_candle``'s (what quantbench writes into UQFF). quantbench's GGUF
    path follows current llama.cpp: other blocks, reconstructing at least as well."""
    src = safe_open(str(tiny / "model.safetensors"), "pt")
    for t, ggml in (("Q4K", "Q4_K"), ("Q6K", "Q6_K")):
        with UqffFile(mistral_outputs[t]) as u:
            key = "model.layers.0.mlp.down_proj"
            q, _ = u.read_layer(key)
            w = src.get_tensor(key + ".weight")
            assert torch.equal(quantize_rows_candle(ggml, w), q.data.reshape(w.shape[0], -1)), t
            ours = quantize(w, ggml)
            assert not torch.equal(ours.data, q.data)
            e_theirs = (dequantize(q) - w).pow(2).mean()
            e_ours = (dequantize(ours) - w).pow(2).mean()
            assert e_ours <= e_theirs * 1.01, (t, e_ours.item(), e_theirs.item())


@pytest.mark.parametrize("t", ["Q4K", "HQQ4", "AFQ4", "FP8", "F8Q8", "MXFP4"])
def test_rewritten_by_quantbench_loads_identically_in_mistralrs(t, tiny, mistral_outputs, tmp_path):
    """Read mistral.rs's output into QTensors and write it back with quantbench's writer: the
    tensors (names, dtypes, shapes, bytes) match, and mistral.rs generates the same text."""
    src_dir = mistral_outputs[t]
    out = tmp_path / "rewritten"
    out.mkdir()
    for f in src_dir.iterdir():
        if f.suffix != ".uqff":
            shutil.copy(f, out / f.name)
    stem = t.lower()
    with UqffFile(src_dir / f"{stem}.uqff") as u:
        layers = []
        for key, L in u.layers.items():
            q, bias = u.read_layer(key)
            layers.append(qtensor_layer(key, L.family, q, bias))
        with Staging() as st:
            shards = write_uqff_output(out / f"{stem}.uqff", layers, st)
    assert shards == [f"{stem}-0.uqff"]
    theirs, _ = read_header(src_dir / f"{stem}-0.uqff")
    ours, meta = read_header(out / f"{stem}-0.uqff")
    assert meta["uqff.producer"] == "quantbench" and meta["uqff.version"] == "1.2.0"
    assert {n: (i.dtype, i.shape) for n, i in ours.items()} == {n: (i.dtype, i.shape) for n, i in theirs.items()}
    a, b = safe_open(str(src_dir / f"{stem}-0.uqff"), "pt"), safe_open(str(out / f"{stem}-0.uqff"), "pt")
    for n in theirs:
        x, y = a.get_tensor(n), b.get_tensor(n)
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), n
    want = mistralrs(src_dir, from_uqff=f"{stem}-0.uqff", max_tokens=16)
    got = mistralrs(out, from_uqff=f"{stem}-0.uqff", max_tokens=16)
    assert got == want and len(want) > 0


def _scheme_qtensors(w: torch.Tensor):
    g = quantize(w, "Q5_K")
    return {
        "gguf": g,
        "hqq": hqq.quantize(w, bits=4),
        "afq": afq.quantize(w, bits=6, group_size=64, scale_dtype=torch.float32),
        "fp8": fp8.quantize(w, granularity="mistralrs"),
        "f8q8": f8q8.quantize(w),
        "mxfp4": mxfp4_ocp.quantize(w, rule="mistralrs"),
    }


def test_round_trip_every_family_and_bias(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g)
    bias = torch.randn(64, generator=g)
    qs = _scheme_qtensors(w)
    layers = [qtensor_layer(f"m.{fam}", fam, q, bias if fam == "afq" else None) for fam, q in sorted(qs.items())]
    u16 = w.to(torch.bfloat16)
    layers.append(unquant_layer("m.zz_unquant", "BF16", tuple(w.shape), lambda: [u16], bias))
    with Staging() as st:
        write_uqff_output(tmp_path / "x.uqff", layers, st)
    with UqffFile(tmp_path / "x-0.uqff") as u:
        assert [L.label for L in u.layers.values()] == ["afq6", "f8q8", "fp8", "q5k", "hqq4", "mxfp4", "unquant"]
        for fam, q in qs.items():
            back, b = u.read_layer(f"m.{fam}")
            assert back.shape == q.shape
            for k, v in q.tensors.items():
                assert torch.equal(back.tensors[k].reshape(-1).view(torch.uint8), v.reshape(-1).contiguous().view(torch.uint8)), (fam, k)
            for k in ("bits", "group_size", "num_blocks"):
                if k in q.params:
                    assert back.params[k] == q.params[k]
            assert (b is not None) == (fam == "afq")
        back, b = u.read_layer("m.zz_unquant")
        assert torch.equal(back, u16) and torch.equal(b, bias)


def _tiny_uqff(path, *, version=(1, 2, 0), names=None):
    entries = [Entry(k, "U32", (), (lambda v=v: [torch.tensor(v, dtype=torch.uint32)])) for k, v in
               zip(("uqff.version.major", "uqff.version.minor", "uqff.version.patch"), version)] if version else []
    q = quantize(torch.randn(4, 32), "Q8_0")
    layer = qtensor_layer("model.layers.0.mlp.up_proj", "gguf", q)
    entries += layer if names is None else [Entry(n, "U8", (1,), lambda: [b"\0"]) for n in names]
    write_safetensors_stream(path, entries, {"uqff.version": ".".join(map(str, version or (0,)))})


def test_version_checks_like_mistralrs(tmp_path, tiny):
    cases = {
        "older-minor": ((1, 1, 7), None),
        "newer-minor": ((1, 3, 0), "newer than this reader"),
        "major-2": ((2, 0, 0), "incompatible"),
        "major-0": ((0, 2, 0), "incompatible"),
        "no-version": (None, "legacy UQFF: no uqff.version tag"),
    }
    for name, (version, err) in cases.items():
        d = tmp_path / name
        d.mkdir()
        _tiny_uqff(d / "x-0.uqff", version=version)
        if err is None:
            assert UqffFile(d / "x-0.uqff").version == version
        else:
            with pytest.raises(FormatError, match=err):
                UqffFile(d / "x-0.uqff")
    (tmp_path / "legacy").mkdir()
    _tiny_uqff(tmp_path / "legacy" / "x-0.uqff", version=None, names=["0", "1", "2"])
    with pytest.raises(FormatError, match=r"legacy UQFF \(pre-1.0, numbered tensors\)"):
        UqffFile(tmp_path / "legacy" / "x-0.uqff")
    # mistral.rs refuses the same files
    for name in ("newer-minor", "no-version"):
        model = tmp_path / f"model-{name}"
        shutil.copytree(tiny, model)
        shutil.copy(tmp_path / name / "x-0.uqff", model / "x-0.uqff")
        with pytest.raises(AssertionError, match="newer mistral.rs|no version tag"):
            mistralrs(model, from_uqff="x-0.uqff", max_tokens=1)


def test_version_scalars_only_in_first_shard_and_shards_merge(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = [qtensor_layer(f"model.layers.{i}.mlp.up_proj", "gguf", quantize(torch.randn(64, 256, generator=g), "Q8_0"))
              for i in range(4)]
    with Staging() as st:
        shards = write_uqff_output(tmp_path / "q8_0.uqff", layers, st, max_shard_bytes=20000)
    assert shards == [f"q8_0-{i}.uqff" for i in range(len(shards))] and len(shards) >= 4
    first, _ = read_header(tmp_path / shards[0])
    assert {"uqff.version.major", "uqff.version.minor", "uqff.version.patch"} <= set(first)
    for s in shards[1:]:
        assert not any(n.startswith("uqff.version") for n in read_header(tmp_path / s)[0])
    with UqffFile(tmp_path / "q8_0.uqff") as u:  # the output name finds all shards
        assert len(u.shards) == len(shards) and len(u.layers) == 4


def test_duplicate_key_across_uqff_shards(tmp_path):
    _tiny_uqff(tmp_path / "x-0.uqff")
    q = quantize(torch.randn(4, 32), "Q8_0")
    write_safetensors_stream(tmp_path / "x-1.uqff", qtensor_layer("model.layers.0.mlp.up_proj", "gguf", q))
    with pytest.raises(FormatError, match=r"'model.layers.0.mlp.up_proj.weight.*' appears in two shards: .*x-0.uqff and .*x-1.uqff"):
        UqffFile(tmp_path / "x-0.uqff")


def test_truncated_and_inconsistent_shards(tmp_path):
    _tiny_uqff(tmp_path / "x-0.uqff")
    data = (tmp_path / "x-0.uqff").read_bytes()
    (tmp_path / "x-0.uqff").write_bytes(data[:-7])
    with pytest.raises(FormatError, match="truncated"):
        UqffFile(tmp_path / "x-0.uqff")
    # a GGUF layer whose byte count does not match its shape and dtype
    entries = version_entries() + qtensor_layer("a", "gguf", quantize(torch.randn(4, 32), "Q8_0"))
    entries = [Entry(e.name, e.dtype, e.shape, e.produce) if e.name != "a.weight.shape"
               else Entry(e.name, "U32", (2,), lambda: [torch.tensor([5, 32], dtype=torch.uint32)]) for e in entries]
    write_safetensors_stream(tmp_path / "y-0.uqff", entries)
    with pytest.raises(FormatError, match=r"layer a: 136 bytes do not hold a Q8_0 tensor of shape \[5, 32\]"):
        UqffFile(tmp_path / "y-0.uqff")
    with pytest.raises(FormatError, match="no UQFF file"):
        UqffFile(tmp_path / "missing.uqff")
