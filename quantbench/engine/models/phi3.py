"""Phi-3: fused qkv and gate_up projections, longrope scaling, optional sliding window."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, gguf_common, hf_common

HF_MODEL_TYPES = ("phi3",)
GGUF_ARCHES = ("phi3",)
GGUF_PERMUTES_QK = False


def from_hf(cfg: Source) -> ModelArgs:
    c = hf_common(cfg, "phi3")
    if c["rope_scaling"] is not None and "original_max_position_embeddings" not in c["rope_scaling"]:
        c["rope_scaling"] = dict(c["rope_scaling"], original_max_position_embeddings=cfg.get(
            "original_max_position_embeddings", c["max_position_embeddings"]))
    return ModelArgs(**c, fused_qkv=True, fused_gate_up=True, sliding_window=cfg.get("sliding_window"))


def from_gguf(meta: Source, n_vocab: int, names: set[str]) -> ModelArgs:
    c = gguf_common(meta, "phi3", n_vocab)
    return ModelArgs(**c, fused_qkv=True, fused_gate_up=True, sliding_window=meta.get("attention.sliding_window"))
