"""bitsandbytes checkpoints: ours are byte-identical to what transformers + bitsandbytes 0.50.2
save for the same float model, load back in transformers with the same logits as our engine, and
the reader turns transformers' files into QTensors our engine runs with transformers' logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from quantbench.errors import FormatError, InputValueError, UnknownTypeError
from quantbench.formats.checkpoint import default_layout, detect_layout, read_checkpoint_items, write_quantized_checkpoint
from quantbench.quant.qtensor import QTensor
from quantbench.quant.schemes import dequantize, quantize
from tests.formats import make_llama_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

TOKS = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))


def engine_logits(path: Path, toks: torch.Tensor = TOKS) -> torch.Tensor:
    """Our engine on a (quantized) HF dir, weights from :func:`read_checkpoint_items`."""
    from quantbench.engine.loader import _build, hf_args, read_hf_config
    from quantbench.engine.weights import load_weights

    args = hf_args(path, read_hf_config(path))
    model = _build(args, torch.float32, "cpu")
    load_weights(model, read_checkpoint_items(path), str(path), torch.float32, "cpu")
    for layer in model.linear_layers():
        layer.cache_dequantized = True  # QLinear's device probe reads w.data, which only GGML QTensors have
    with torch.no_grad():
        return model.eval()(toks)


def hf_logits(path: Path, toks: torch.Tensor = TOKS):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        return m(toks).logits.float(), m


def _bnb_config(scheme: str):
    from transformers import BitsAndBytesConfig

    if scheme == "INT8":
        return BitsAndBytesConfig(load_in_8bit=True)
    qt, dq = scheme.split("_")[0].lower(), scheme.endswith("_DQ")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                              bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_llama_dir(tmp_path_factory.mktemp("bnb") / "src")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("scheme", ["NF4", "FP4_DQ", "INT8"])
def test_checkpoint_matches_transformers_and_loads_back(src: Path, tmp_path: Path, scheme: str) -> None:
    from transformers import AutoModelForCausalLM

    peer = tmp_path / "peer"
    m = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=_bnb_config(scheme), dtype=torch.float32,
                                             device_map="cpu")
    m.save_pretrained(str(peer))
    ours = tmp_path / "ours"
    write_quantized_checkpoint(src, ours, scheme, options={"compute_dtype": "float32"})

    a, b = _tensors(ours), _tensors(peer)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((peer / "config.json").read_text())["quantization_config"]
    assert qa == qb
    assert (ours / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    # Reading transformers' file gives the QTensors our scheme makes from the float weights.
    src_t = _tensors(src)
    items = dict(read_checkpoint_items(peer))
    w = items["model.layers.1.mlp.down_proj.weight"]
    assert isinstance(w, QTensor) and w.qtype == scheme
    mine = quantize(src_t["model.layers.1.mlp.down_proj.weight"], scheme)
    assert torch.equal(dequantize(w), dequantize(mine))
    assert isinstance(items["lm_head.weight"], torch.Tensor)  # transformers keeps the head float

    # transformers + bnb on our file vs our engine on our file.
    theirs, hf = hf_logits(ours)
    mine_logits = engine_logits(ours)
    float_logits, _ = hf_logits(src)
    assert (theirs - float_logits).abs().max() > 1e-3  # quantization really happened
    if scheme == "INT8":
        # bnb's int8 matmul also quantizes activations (row-wise int8, fp16 outliers) at run time,
        # which our engine does not; the weights it holds are exactly ours.
        import bitsandbytes.functional as F

        lin = hf.model.layers[0].self_attn.q_proj
        scb = lin.weight.SCB if lin.weight.SCB is not None else lin.state.SCB  # bnb moves it to the state on use
        deq = F.int8_vectorwise_dequant(lin.weight.data, scb)
        assert torch.equal(deq.float(), dequantize(items["model.layers.0.self_attn.q_proj.weight"]))
        assert (theirs - mine_logits).abs().max() < 0.05 * float_logits.abs().max()
    else:
        torch.testing.assert_close(mine_logits, theirs, atol=1e-5, rtol=1e-5)


def test_bf16_source_records_dtype_and_compute_dtype(tmp_path: Path) -> None:
    src = make_llama_dir(tmp_path / "src", dtype=torch.bfloat16, layers=1)
    out = tmp_path / "out"
    write_quantized_checkpoint(src, out, "NF4")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    state = _tensors(out)["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"]
    assert json.loads(bytes(state.tolist()))["dtype"] == "bfloat16"


def _rewrite(path: Path, drop: str | None = None, config_patch: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    if drop:
        t = load_file(str(f))
        del t[drop]
        save_file(t, str(f), metadata={"format": "pt"})
    if config_patch:
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"].update(config_patch)
        (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def nf4_dir(src: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nf4") / "ours"
    write_quantized_checkpoint(src, out, "NF4_DQ")
    return out


def test_missing_absmax_is_named(nf4_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(nf4_dir, bad)
    _rewrite(bad, drop="model.layers.0.self_attn.k_proj.weight.absmax")
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight .*absmax"):
        list(read_checkpoint_items(bad))


def test_missing_quant_state_is_named(nf4_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(nf4_dir, bad)
    _rewrite(bad, drop="model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        list(read_checkpoint_items(bad))


@pytest.mark.parametrize("patch, msg", [
    ({"bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type 'int4'"),
    ({"load_in_4bit": False, "_load_in_4bit": False}, "exactly one of load_in_4bit"),
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
])
def test_unsupported_config(nf4_dir: Path, tmp_path: Path, patch: dict, msg: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(nf4_dir, bad)
    _rewrite(bad, config_patch=patch)
    with pytest.raises(FormatError, match=msg) as e:
        list(read_checkpoint_items(bad))
    assert "config.json" in str(e.value)


def test_dispatch_and_bad_requests(src: Path, tmp_path: Path) -> None:
    assert detect_layout({"quantization_config": {"quant_method": "bitsandbytes"}}, "x") == "bnb"
    assert detect_layout({"quantization": {"bits": 4, "group_size": 64}}, "x") == "mlx"
    assert detect_layout({}, "x") is None
    assert default_layout("INT8") == "bnb" and default_layout("AFQ4") == "mlx" and default_layout("FP8_BLOCK") == "fp8"
    with pytest.raises(UnknownTypeError, match="HQQ4 has no native checkpoint layout|'HQQ4' has no native"):
        write_quantized_checkpoint(src, tmp_path / "o", "HQQ4")
    with pytest.raises(UnknownTypeError, match="bnb layout cannot hold AFQ4"):
        write_quantized_checkpoint(src, tmp_path / "o", "AFQ4", layout="bnb")


def test_failed_write_leaves_nothing(src: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    t = load_file(str(src / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "out"
    with pytest.raises(InputValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        write_quantized_checkpoint(list(t.items()), out, "NF4", config=cfg)
    assert not out.exists() or list(out.iterdir()) == []


def test_sharded_output_from_a_quantized_source(src: Path, tmp_path: Path) -> None:
    """An MLX source is dequantized and re-quantized; companions may land in other shards."""
    mlx_dir = tmp_path / "mlx"
    write_quantized_checkpoint(src, mlx_dir, "AFQ8")
    out = tmp_path / "bnb"
    write_quantized_checkpoint(mlx_dir, out, "NF4", max_shard_bytes=100_000, options={"compute_dtype": "float32"})
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 3
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    assert not list(out.glob(".quantbench-spill-*"))
    theirs, _ = hf_logits(out)
    torch.testing.assert_close(engine_logits(out), theirs, atol=1e-5, rtol=1e-5)


def test_existing_checkpoint_needs_overwrite(src: Path, tmp_path: Path) -> None:
    from quantbench.errors import QuantbenchError

    out = tmp_path / "out"
    write_quantized_checkpoint(src, out, "NF4", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    with pytest.raises(QuantbenchError, match="already holds a checkpoint"):
        write_quantized_checkpoint(src, out, "FP4")
    write_quantized_checkpoint(src, out, "FP4", overwrite=True)
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
