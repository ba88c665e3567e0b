"""HF module names <-> GGUF imatrix names, per architecture family, and refusal of unknown names."""

from __future__ import annotations

import pytest

from quantbench.errors import ImatrixError
from quantbench.imatrix.names import GGUFKey, gguf_to_hf, hf_to_gguf

# (arch, HF module / mistral.rs key, GGUF imatrix entry); every pair must map both ways.
BOTH_WAYS = [
    ("llama", "model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
    ("llama", "model.layers.7.self_attn.k_proj", "blk.7.attn_k.weight"),
    ("llama", "model.layers.7.self_attn.v_proj", "blk.7.attn_v.weight"),
    ("llama", "model.layers.12.self_attn.o_proj", "blk.12.attn_output.weight"),
    ("llama", "model.layers.3.mlp.gate_proj", "blk.3.ffn_gate.weight"),
    ("llama", "model.layers.3.mlp.up_proj", "blk.3.ffn_up.weight"),
    ("llama", "model.layers.3.mlp.down_proj", "blk.3.ffn_down.weight"),
    ("llama", "lm_head", "output.weight"),
    ("qwen2", "model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight"),
    ("qwen3", "model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"),
    ("gemma2", "model.layers.25.mlp.gate_proj", "blk.25.ffn_gate.weight"),
    ("gemma3", "model.layers.4.self_attn.o_proj", "blk.4.attn_output.weight"),
    ("phi3", "model.layers.2.self_attn.qkv_proj", "blk.2.attn_qkv.weight"),
    ("phi3", "model.layers.2.mlp.gate_up_proj", "blk.2.ffn_up.weight"),
    ("phi3", "model.layers.2.mlp.down_proj", "blk.2.ffn_down.weight"),
    # Mixtral is GGUF arch "llama"; keys as mistral.rs 0.9.5 writes them (stacked experts)
    ("llama", "model.layers.5.block_sparse_moe.experts.gate_proj", "blk.5.ffn_gate_exps.weight"),
    ("llama", "model.layers.5.block_sparse_moe.experts.up_proj", "blk.5.ffn_up_exps.weight"),
    ("llama", "model.layers.5.block_sparse_moe.experts.down_proj", "blk.5.ffn_down_exps.weight"),
    ("llama", "model.layers.5.block_sparse_moe.gate", "blk.5.ffn_gate_inp.weight"),
    ("qwen3moe", "model.layers.9.mlp.experts.gate_proj", "blk.9.ffn_gate_exps.weight"),
    ("qwen3moe", "model.layers.9.mlp.experts.down_proj", "blk.9.ffn_down_exps.weight"),
    ("qwen3moe", "model.layers.9.mlp.gate", "blk.9.ffn_gate_inp.weight"),
    ("qwen2moe", "model.layers.9.mlp.shared_expert.up_proj", "blk.9.ffn_up_shexp.weight"),
    ("qwen2moe", "model.layers.9.mlp.shared_expert_gate", "blk.9.ffn_gate_inp_shexp.weight"),
]


@pytest.mark.parametrize("arch,hf,gguf", BOTH_WAYS)
def test_maps_both_ways(arch: str, hf: str, gguf: str) -> None:
    assert hf_to_gguf(hf) == GGUFKey(gguf)
    assert gguf_to_hf(gguf, arch) == hf


@pytest.mark.parametrize(
    "hf,gguf,expert",
    [
        ("model.layers.4.mlp.experts.17.gate_proj", "blk.4.ffn_gate_exps.weight", 17),
        ("model.layers.4.mlp.experts.0.down_proj", "blk.4.ffn_down_exps.weight", 0),
        ("model.layers.4.block_sparse_moe.experts.3.w1", "blk.4.ffn_gate_exps.weight", 3),
        ("model.layers.4.block_sparse_moe.experts.3.w3", "blk.4.ffn_up_exps.weight", 3),
        ("model.layers.4.block_sparse_moe.experts.3.w2", "blk.4.ffn_down_exps.weight", 3),
    ],
)
def test_per_expert_modules_give_stack_and_index(hf: str, gguf: str, expert: int) -> None:
    assert hf_to_gguf(hf) == GGUFKey(gguf, expert)


def test_ffn_up_depends_on_arch() -> None:
    assert gguf_to_hf("blk.0.ffn_up.weight", "llama") == "model.layers.0.mlp.up_proj"
    assert gguf_to_hf("blk.0.ffn_up.weight", "phi3") == "model.layers.0.mlp.gate_up_proj"
    assert gguf_to_hf("blk.0.ffn_up_exps.weight", "llama").startswith("model.layers.0.block_sparse_moe.")
    assert gguf_to_hf("blk.0.ffn_up_exps.weight", "qwen3moe").startswith("model.layers.0.mlp.experts.")


@pytest.mark.parametrize("bad", ["model.embed_tokens", "model.layers.0.input_layernorm", "vision_tower.blocks.0.fc1",
                                 "model.layers.x.self_attn.q_proj", "model.layers.0.mlp.experts.gate"])
def test_unknown_hf_names_are_refused(bad: str) -> None:
    with pytest.raises(ImatrixError, match="imatrix entry"):
        hf_to_gguf(bad)


def test_unknown_gguf_names_and_archs_are_refused() -> None:
    with pytest.raises(ImatrixError, match="token_embd"):
        gguf_to_hf("token_embd.weight")
    with pytest.raises(ImatrixError, match="ssm_in"):
        gguf_to_hf("blk.0.ssm_in.weight")
    with pytest.raises(ImatrixError, match="mamba"):
        gguf_to_hf("blk.0.attn_q.weight", "mamba")
