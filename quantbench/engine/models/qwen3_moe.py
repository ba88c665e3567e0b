"""Qwen3-MoE: Qwen3 attention with routed experts (top-k renormalized when ``norm_topk_prob``)."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, gguf_common, gguf_rope_scaling, hf_common
from quantbench.errors import FormatError

HF_MODEL_TYPES = ("qwen3_moe",)
GGUF_ARCHES = ("qwen3moe",)
GGUF_PERMUTES_QK = False


def from_hf(cfg: Source) -> ModelArgs:
    c = hf_common(cfg, "qwen3_moe")
    n = c["num_layers"]
    only = set(cfg.get("mlp_only_layers", []) or [])
    step = int(cfg.get("decoder_sparse_step", 1))
    moe = [(i not in only) and (i + 1) % step == 0 for i in range(n)]
    bias = bool(cfg.get("attention_bias", False))
    # transformers 5 writes the expert count as `num_local_experts`; v4 checkpoints say `num_experts`
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    if n_exp is None:
        raise FormatError(f"{cfg.origin}: missing required key 'num_experts' (or 'num_local_experts')")
    return ModelArgs(**c, qk_norm=True, qkv_bias=bias, o_bias=bias,
                     num_experts=int(n_exp), experts_per_tok=int(cfg.req("num_experts_per_tok")),
                     moe_intermediate_size=int(cfg.req("moe_intermediate_size")),
                     norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=moe)


def from_gguf(meta: Source, n_vocab: int, names: set[str]) -> ModelArgs:
    c = gguf_common(meta, "qwen3_moe", n_vocab)
    moe = [f"blk.{i}.ffn_gate_inp.weight" in names for i in range(c["num_layers"])]
    return ModelArgs(**c, rope_scaling=gguf_rope_scaling(meta), qk_norm=True,
                     num_experts=int(meta.req("expert_count")), experts_per_tok=int(meta.req("expert_used_count")),
                     moe_intermediate_size=int(meta.req("expert_feed_forward_length")),
                     norm_topk_prob=True, moe_layers=moe)
