"""Qwen3: Qwen2 without biases, with RMSNorm on q and k per head."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, gguf_common, gguf_rope_scaling, hf_common
from quantbench.engine.models.qwen2 import _window

HF_MODEL_TYPES = ("qwen3",)
GGUF_ARCHES = ("qwen3",)
GGUF_PERMUTES_QK = False


def from_hf(cfg: Source) -> ModelArgs:
    window, types = _window(cfg)
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(**hf_common(cfg, "qwen3"), qk_norm=True, qkv_bias=bias, o_bias=bias,
                     sliding_window=window, layer_types=types)


def from_gguf(meta: Source, n_vocab: int, names: set[str]) -> ModelArgs:
    c = gguf_common(meta, "qwen3", n_vocab)
    return ModelArgs(**c, rope_scaling=gguf_rope_scaling(meta), qk_norm=True,
                     qkv_bias="blk.0.attn_q.bias" in names)
