"""Qwen2: Llama with q/k/v biases and NeoX rope (no Q/K permutation in GGUF)."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, gguf_common, gguf_rope_scaling, hf_common

HF_MODEL_TYPES = ("qwen2",)
GGUF_ARCHES = ("qwen2",)
GGUF_PERMUTES_QK = False


def _window(cfg: Source) -> tuple[int | None, list[str] | None]:
    if not cfg.get("use_sliding_window", False):
        return None, None
    return cfg.get("sliding_window"), cfg.get("layer_types")


def from_hf(cfg: Source) -> ModelArgs:
    window, types = _window(cfg)
    return ModelArgs(**hf_common(cfg, "qwen2"), qkv_bias=True, sliding_window=window, layer_types=types)


def from_gguf(meta: Source, n_vocab: int, names: set[str]) -> ModelArgs:
    c = gguf_common(meta, "qwen2", n_vocab)
    return ModelArgs(**c, rope_scaling=gguf_rope_scaling(meta), qkv_bias=True)
