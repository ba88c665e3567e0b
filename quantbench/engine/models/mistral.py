"""Mistral: Llama with an optional sliding attention window (GGUF files use the ``llama`` arch)."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, hf_common

HF_MODEL_TYPES = ("mistral",)
GGUF_ARCHES: tuple[str, ...] = ()
GGUF_PERMUTES_QK = True


def from_hf(cfg: Source) -> ModelArgs:
    return ModelArgs(**hf_common(cfg, "mistral"), sliding_window=cfg.get("sliding_window"))
