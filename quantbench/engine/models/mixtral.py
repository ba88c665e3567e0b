"""Mixtral: Mistral attention with a routed mixture of SwiGLU experts (GGUF: ``llama`` arch + experts)."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, hf_common

HF_MODEL_TYPES = ("mixtral",)
GGUF_ARCHES: tuple[str, ...] = ()
GGUF_PERMUTES_QK = True


def from_hf(cfg: Source) -> ModelArgs:
    return ModelArgs(**hf_common(cfg, "mixtral"), sliding_window=cfg.get("sliding_window"),
                     num_experts=int(cfg.req("num_local_experts")),
                     experts_per_tok=int(cfg.req("num_experts_per_tok")), moe_block_name="block_sparse_moe")
