"""MLX checkpoints: ours are byte-identical to ``mlx_lm.convert`` (affine), load in mlx-lm, and
our engine on mlx-lm's own output gives mlx-lm's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quantbench.errors import FormatError
from quantbench.formats.checkpoint import read_checkpoint_items, write_quantized_checkpoint
from quantbench.quant.qtensor import QTensor
from tests.formats import make_llama_dir
from tests.formats.test_bnb_layout import TOKS, _tensors, engine_logits

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

CASES = [("AFQ4", 64, 4, "affine"), ("AFQ3_G32", 32, 3, "affine"), ("MXFP4_OCP", 32, 4, "mxfp4")]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_llama_dir(tmp_path_factory.mktemp("mlx") / "src")


def mlx_logits(path: Path) -> torch.Tensor:
    model, _ = mlx_lm.load(str(path))
    out = model(mx.array(TOKS.numpy())).astype(mx.float32)
    return torch.from_numpy(np.array(out))


@pytest.mark.parametrize("scheme, gs, bits, mode", CASES)
def test_matches_mlx_lm_convert(src: Path, tmp_path: Path, scheme: str, gs: int, bits: int, mode: str) -> None:
    peer = tmp_path / "peer"
    mlx_lm.convert(str(src), mlx_path=str(peer), quantize=True, q_group_size=gs, q_bits=bits, q_mode=mode)
    ours = tmp_path / "ours"
    write_quantized_checkpoint(src, ours, scheme)

    a, b = _tensors(ours), _tensors(peer)
    assert sorted(a) == sorted(b)  # embeddings and head quantized too, as mlx-lm does
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if mode == "affine":
            assert torch.equal(a[k], b[k]), k  # MLX's affine rule, byte for byte
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ours, peer))
    assert ca["quantization"] == cb["quantization"] == {"group_size": gs, "bits": bits, "mode": mode}
    assert ca["quantization_config"] == cb["quantization_config"]

    # mlx-lm runs our file; our engine runs both files with mlx-lm's logits.
    theirs_on_ours = mlx_logits(ours)
    torch.testing.assert_close(engine_logits(ours), theirs_on_ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine_logits(peer), mlx_logits(peer), atol=1e-4, rtol=1e-4)
    items = dict(read_checkpoint_items(peer))
    emb = items["model.embed_tokens.weight"]
    assert isinstance(emb, QTensor) and emb.shape == (512, 256)


def test_layers_the_group_does_not_divide_stay_float(tmp_path: Path) -> None:
    src = make_llama_dir(tmp_path / "src", inter=320, layers=1)  # down_proj rows of 320: not a multiple of 128
    out = tmp_path / "out"
    write_quantized_checkpoint(src, out, "AFQ4_G128")
    t = _tensors(out)
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.down_proj.scales" not in t
    assert t["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint32
    torch.testing.assert_close(engine_logits(out), mlx_logits(out), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def afq_dir(src: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("afq") / "ours"
    write_quantized_checkpoint(src, out, "AFQ4")
    return out


def _patched(afq_dir: Path, tmp_path: Path, drop: str | None = None, quant: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(afq_dir, bad)
    if drop:
        t = load_file(str(bad / "model.safetensors"))
        del t[drop]
        save_file(t, str(bad / "model.safetensors"), metadata={"format": "mlx"})
    if quant:
        cfg = json.loads((bad / "config.json").read_text())
        cfg["quantization"].update(quant)
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("quant, msg", [
    ({"bits": 7}, "MLX affine bits 7 is not supported"),
    ({"group_size": 16}, "MLX group_size 16 is not supported"),
    ({"mode": "nvfp4"}, "mode 'nvfp4' is not supported"),
])
def test_unsupported_quantization(afq_dir: Path, tmp_path: Path, quant: dict, msg: str) -> None:
    with pytest.raises(FormatError, match=msg) as e:
        list(read_checkpoint_items(_patched(afq_dir, tmp_path, quant=quant)))
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("drop, msg", [
    ("model.layers.0.mlp.up_proj.biases", r"tensor model\.layers\.0\.mlp\.up_proj\.weight has no companion tensor model\.layers\.0\.mlp\.up_proj\.biases"),
    ("model.layers.1.self_attn.o_proj.scales", r"model\.layers\.1\.self_attn\.o_proj\.weight: packed uint32 weight without"),
    ("model.layers.0.self_attn.q_proj.weight", r"q_proj\.(scales|biases) belongs to model\.layers\.0\.self_attn\.q_proj\.weight"),
])
def test_missing_tensors_are_named(afq_dir: Path, tmp_path: Path, drop: str, msg: str) -> None:
    with pytest.raises(FormatError, match=msg) as e:
        list(read_checkpoint_items(_patched(afq_dir, tmp_path, drop=drop)))
    assert "model.safetensors" in str(e.value)
