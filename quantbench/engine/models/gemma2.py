"""Gemma 2: (1 + w) RMSNorm, sandwich norms, attention and final soft-capping, alternating sliding layers."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, gguf_common, hf_common
from quantbench.errors import FormatError

HF_MODEL_TYPES = ("gemma2",)
GGUF_ARCHES = ("gemma2",)
GGUF_PERMUTES_QK = False
# llama.cpp's converter stores Gemma norm weights as (1 + w): loaded as-is with offset 0.
GGUF_NORM_SHIFTED = True


def _types(n: int, cfg: Source | None, pattern: int) -> list[str]:
    given = cfg.get("layer_types") if cfg is not None else None
    if given:
        return list(given)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def gguf_layer_types(meta: Source, n: int, default_pattern: int) -> list[str]:
    """llama.cpp's sliding layers: ``attention.sliding_window_pattern`` (a per-layer bool array, or
    a period whose last layer is global; 0 = every layer sliding), else the arch's fixed period."""
    pattern = meta.get("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) < n:
            raise FormatError(f"{meta.origin}: attention.sliding_window_pattern has {len(pattern)} entries "
                              f"for {n} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern[:n]]
    if int(pattern) == 0:
        return ["sliding_attention"] * n
    return _types(n, None, int(pattern))


def gguf_query_scalar(c: dict, layers_27b: int) -> float:
    """GGUF has no query_pre_attn_scalar; llama.cpp uses head_dim, except for the 27B models
    (recognized by their layer count) whose HF configs say hidden/heads."""
    return float(c["hidden_size"] // c["num_heads"] if c["num_layers"] == layers_27b else c["head_dim"])


def from_hf(cfg: Source) -> ModelArgs:
    c = hf_common(cfg, "gemma2")
    c["hidden_act"] = str(cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")))
    return ModelArgs(**c, norm_offset=1.0, embed_scale=True, sandwich_norm=True,
                     attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
                     query_pre_attn_scalar=float(cfg.req("query_pre_attn_scalar")),
                     sliding_window=cfg.get("sliding_window"), layer_types=_types(c["num_layers"], cfg, 2),
                     qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)))


def from_gguf(meta: Source, n_vocab: int, names: set[str]) -> ModelArgs:
    c = gguf_common(meta, "gemma2", n_vocab)
    c["hidden_act"] = "gelu_pytorch_tanh"
    c["tie_word_embeddings"] = True
    return ModelArgs(**c, norm_offset=0.0, extra={"gemma_norm": True}, embed_scale=True, sandwich_norm=True,
                     attn_softcap=meta.get("attn_logit_softcapping"), final_softcap=meta.get("final_logit_softcapping"),
                     query_pre_attn_scalar=gguf_query_scalar(c, 46),
                     sliding_window=meta.get("attention.sliding_window", 4096),  # llama.cpp's Gemma 2 default
                     layer_types=gguf_layer_types(meta, c["num_layers"], 2))
