"""Llama (incl. Llama 3 rope scaling). llama.cpp's ``llama`` GGUF arch also carries Mistral and Mixtral."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, gguf_common, gguf_rope_scaling, hf_common

HF_MODEL_TYPES = ("llama",)
GGUF_ARCHES = ("llama",)
# llama.cpp's converter permutes Q/K rows of this family for its interleaved rope; undone on load.
GGUF_PERMUTES_QK = True


def from_hf(cfg: Source) -> ModelArgs:
    c = hf_common(cfg, "llama")
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(**c, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))


def from_gguf(meta: Source, n_vocab: int, names: set[str]) -> ModelArgs:
    c = gguf_common(meta, "llama", n_vocab)
    c["rope_scaling"] = gguf_rope_scaling(meta)
    window = meta.get("attention.sliding_window")
    n_exp = int(meta.get("expert_count", 0))
    if n_exp:
        c["arch"] = "mixtral"
        return ModelArgs(**c, num_experts=n_exp, experts_per_tok=int(meta.req("expert_used_count")),
                         moe_block_name="block_sparse_moe", sliding_window=window)
    return ModelArgs(**c, sliding_window=window,
                     qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names)
