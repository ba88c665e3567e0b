"""FP8 checkpoints: block-scaled ones (DeepSeek-V3 / FineGrainedFP8) carry exactly what
transformers' own ``Fp8Quantize`` makes and load in its FineGrainedFP8 path; compressed-tensors
``float-quantized`` ones load through transformers' compressed-tensors path, and what the
compressed-tensors compressor writes reads back to its own decompression."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from quantbench.errors import FormatError
from quantbench.formats.checkpoint import read_checkpoint_items, write_quantized_checkpoint
from quantbench.quant.qtensor import QTensor
from quantbench.quant.schemes import dequantize
from tests.formats import make_llama_dir
from tests.formats.test_bnb_layout import _tensors, engine_logits, hf_logits

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    # intermediate 320: the MLP is not a whole number of 128-blocks, attention is
    return make_llama_dir(tmp_path_factory.mktemp("fp8") / "src", inter=320)


@pytest.fixture(scope="module")
def float_logits(src: Path) -> torch.Tensor:
    return hf_logits(src)[0]


def test_block_checkpoint_is_transformers_fp8(src: Path, tmp_path: Path, float_logits: torch.Tensor) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    out = tmp_path / "out"
    write_quantized_checkpoint(src, out, "FP8_BLOCK")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [128, 128] and cfg["fmt"] == "e4m3"
    mlp = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(cfg["modules_to_not_convert"]) == sorted(["lm_head", *mlp])

    ours, srct = _tensors(out), _tensors(src)
    op = Fp8Quantize(type("Q", (), {"quantization_config": type("C", (), {"weight_block_size": (128, 128), "scale_fmt": "float"})()})())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        ref = op.convert({name: srct[name]})
        scale = name.removesuffix(".weight") + ".weight_scale_inv"
        assert ours[name].dtype == torch.float8_e4m3fn
        assert torch.equal(ours[name].view(torch.uint8), ref[name].view(torch.uint8))
        assert torch.equal(ours[scale], ref[scale])
    assert ours["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32

    theirs, _ = hf_logits(out)  # on CPU transformers dequantizes FP8 checkpoints at load
    assert (theirs - float_logits).abs().max() > 1e-4
    torch.testing.assert_close(engine_logits(out), theirs, atol=1e-5, rtol=1e-5)


def test_deepseek_partial_blocks_and_ue8m0(tmp_path: Path) -> None:
    """DeepSeek-V3 stores ceil-sized scale grids (edge blocks partial); some models use E8M0 scales."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=g)
    from quantbench.quant.schemes import quantize

    q = quantize(w, "FP8_BLOCK")
    assert q.tensors["weight_scale_inv"].shape == (2, 3)
    e8 = torch.randint(110, 130, (2, 3), dtype=torch.uint8, generator=g)
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a.weight": q.tensors["weight"], "a.weight_scale_inv": q.tensors["weight_scale_inv"],
               "b.weight": q.tensors["weight"].clone(), "b.weight_scale_inv": e8}, str(d / "model.safetensors"))
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps({"model_type": "x", "quantization_config": qc}))
    items = dict(read_checkpoint_items(d))
    a, b = items["a.weight"], items["b.weight"]
    assert isinstance(a, QTensor) and a.qtype == "FP8_BLOCK"
    assert torch.equal(dequantize(a), dequantize(q))
    codes = q.tensors["weight"].to(torch.float32)
    scale = torch.exp2(e8.to(torch.float32) - 127).repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    assert torch.equal(dequantize(b), codes * scale)


@pytest.mark.parametrize("scheme", ["FP8_CHANNEL", "FP8_TENSOR", "FP8_BLOCK", "FP8"])
def test_compressed_tensors_checkpoint_loads_in_transformers(src: Path, tmp_path: Path, scheme: str,
                                                           float_logits: torch.Tensor) -> None:
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "out"
    write_quantized_checkpoint(src, out, scheme, layout="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    t = _tensors(out)
    shape = t["model.layers.0.mlp.down_proj.weight_scale"].shape
    assert shape == {"FP8_CHANNEL": (256, 1), "FP8_TENSOR": (1,), "FP8": (1,), "FP8_BLOCK": (2, 3)}[scheme]
    theirs, _ = hf_logits(out)
    assert (theirs - float_logits).abs().max() > 1e-4
    torch.testing.assert_close(engine_logits(out), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_reads_what_compressed_tensors_writes(src: Path, tmp_path: Path, strategy: str) -> None:
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import save_file
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    sch = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False))
    qc = QuantizationConfig(config_groups={"group_0": sch}, format="float-quantized",
                            quantization_status="compressed", ignore=["lm_head"]).model_dump(mode="json")
    tensors, expect = {}, {}
    for name, w in _tensors(src).items():
        if name.endswith("_proj.weight"):
            amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
            comp = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": amax / 448.0}, sch)
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale"] = comp["weight"], comp["weight_scale"]
            expect[name] = FloatQuantizationCompressor.decompress(comp, sch)["weight"]
        else:
            tensors[name] = w
    d = tmp_path / "ct"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    items = dict(read_checkpoint_items(d))
    for name, ref in expect.items():
        q = items[name]
        assert isinstance(q, QTensor) and q.qtype == f"FP8_{strategy.upper()}"
        assert torch.equal(dequantize(q), ref.float()), name


@pytest.fixture(scope="module")
def block_dir(src: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blk") / "out"
    write_quantized_checkpoint(src, out, "FP8_BLOCK")
    return out


def _patched(d: Path, tmp_path: Path, drop: str | None = None, qc: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    if drop:
        t = load_file(str(bad / "model.safetensors"))
        del t[drop]
        save_file(t, str(bad / "model.safetensors"))
    if qc:
        cfg = json.loads((bad / "config.json").read_text())
        cfg["quantization_config"].update(qc)
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("qc, msg", [
    ({"fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
    ({"activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
    ({"weight_block_size": [128, 64]}, r"non-square weight block \[128, 64\]"),
    ({"weight_block_size": "128"}, "weight_block_size must be two positive integers"),
])
def test_unsupported_fp8_config(block_dir: Path, tmp_path: Path, qc: dict, msg: str) -> None:
    with pytest.raises(FormatError, match=msg):
        list(read_checkpoint_items(_patched(block_dir, tmp_path, qc=qc)))


def test_missing_scale_is_named(block_dir: Path, tmp_path: Path) -> None:
    bad = _patched(block_dir, tmp_path, drop="model.layers.1.self_attn.v_proj.weight_scale_inv")
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.v_proj\.weight has no companion"):
        list(read_checkpoint_items(bad))


def test_unsupported_compressed_tensors_format(block_dir: Path, tmp_path: Path) -> None:
    bad = _patched(block_dir, tmp_path, qc={"quant_method": "compressed-tensors", "format": "pack-quantized",
                                            "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}})
    with pytest.raises(FormatError, match="format 'pack-quantized'"):
        list(read_checkpoint_items(bad))
