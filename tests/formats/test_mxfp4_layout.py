"""gpt-oss MXFP4 checkpoints: what we write loads in transformers' Mxfp4 path with the logits of
the float model carrying our dequantized experts, and the reader agrees with transformers'
own unpacking (``convert_moe_packed_tensors``) of the same tensors."""

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
from tests.formats.test_bnb_layout import TOKS, _tensors

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def oss_src(tmp_path_factory) -> Path:
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=256, sliding_window=64,
                       layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    for n, p in model.named_parameters():
        if ".experts." in n:
            p.data.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("oss") / "src"
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("scheme", ["MXFP4_OCP", "MXFP4_ISQ"])
def test_gpt_oss_checkpoint_round_trip(oss_src: Path, tmp_path: Path, scheme: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = tmp_path / "out"
    write_quantized_checkpoint(oss_src, out, scheme)  # gpt_oss picks the mxfp4 layout by default
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mxfp4" and "lm_head" in qc["modules_to_not_convert"]
    t = _tensors(out)
    assert t["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 128, 4, 16)
    assert t["model.layers.0.mlp.experts.down_proj_scales"].shape == (4, 128, 2)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in t
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16

    items = dict(read_checkpoint_items(out))
    ref = AutoModelForCausalLM.from_pretrained(str(oss_src), device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        float_logits = ref(TOKS).logits
    sd = ref.state_dict()
    n_q = 0
    for name, v in items.items():
        if isinstance(v, QTensor):
            n_q += 1
            base = name
            theirs = convert_moe_packed_tensors(t[base + "_blocks"], t[base + "_scales"], dtype=torch.float32)
            ours = dequantize(v).transpose(-1, -2)
            assert torch.equal(ours, theirs), name
            sd[name].copy_(ours)
    assert n_q == 4
    with torch.no_grad():
        ours_logits = ref(TOKS).logits
    hq = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        theirs_logits = hq(TOKS).logits
    assert (theirs_logits - float_logits).abs().max() > 1e-3
    torch.testing.assert_close(theirs_logits, ours_logits, atol=1e-5, rtol=1e-5)


def test_dense_model_is_refused(tmp_path: Path) -> None:
    src = make_llama_dir(tmp_path / "src", layers=1)
    with pytest.raises(FormatError, match="has none — write MXFP4 to the mlx layout"):
        write_quantized_checkpoint(src, tmp_path / "out", "MXFP4_OCP", layout="mxfp4")
    assert not (tmp_path / "out" / "config.json").exists()


def _patched(d: Path, tmp_path: Path, drop: str) -> Path:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    t = load_file(str(bad / "model.safetensors"))
    del t[drop]
    save_file(t, str(bad / "model.safetensors"))
    return bad


@pytest.fixture(scope="module")
def oss_q(oss_src: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ossq") / "out"
    write_quantized_checkpoint(oss_src, out, "MXFP4_OCP")
    return out


def test_blocks_without_scales(oss_q: Path, tmp_path: Path) -> None:
    bad = _patched(oss_q, tmp_path, "model.layers.1.mlp.experts.down_proj_scales")
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.experts\.down_proj_blocks has no companion"):
        list(read_checkpoint_items(bad))


def test_scales_without_blocks(oss_q: Path, tmp_path: Path) -> None:
    bad = _patched(oss_q, tmp_path, "model.layers.0.mlp.experts.gate_up_proj_blocks")
    with pytest.raises(FormatError, match=r"gate_up_proj_scales: MXFP4 scales without"):
        list(read_checkpoint_items(bad))


def test_requantizing_our_checkpoint_reproduces_it(oss_q: Path, tmp_path: Path) -> None:
    """A quantized source is dequantized (expert blocks turned back to transformers' orientation)
    before quantizing; OCP MXFP4 of its own output is the same values (the only byte changes are
    -0 codes, from negative inputs that rounded to zero, becoming +0)."""
    out = tmp_path / "again"
    write_quantized_checkpoint(oss_q, out, "MXFP4_OCP")
    a, b = _tensors(oss_q), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        if k.endswith("_blocks"):
            neg_zero_dropped = torch.where((a[k] & 0x0F) == 8, a[k] & 0xF0, a[k])
            neg_zero_dropped = torch.where((neg_zero_dropped >> 4) == 8, neg_zero_dropped & 0x0F, neg_zero_dropped)
            assert torch.equal(neg_zero_dropped, b[k]), k
        else:
            assert torch.equal(a[k], b[k]), k
    qa, qb = dict(read_checkpoint_items(oss_q)), dict(read_checkpoint_items(out))
    for k, v in qa.items():
        if isinstance(v, QTensor):
            assert torch.equal(dequantize(v), dequantize(qb[k])), k
