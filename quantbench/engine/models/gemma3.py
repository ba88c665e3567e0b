"""Gemma 3 (text): Gemma 2's layout plus q/k norms, 5:1 sliding/global layers with their own rope bases."""

from __future__ import annotations

from quantbench.engine.models.base import ModelArgs
from quantbench.engine.models.config_keys import Source, gguf_common, gguf_rope_scaling, hf_common, hf_rope
from quantbench.engine.models.gemma2 import _types, gguf_layer_types, gguf_query_scalar

HF_MODEL_TYPES = ("gemma3_text",)
GGUF_ARCHES = ("gemma3",)
GGUF_PERMUTES_QK = False
GGUF_NORM_SHIFTED = True


def from_hf(cfg: Source) -> ModelArgs:
    c = hf_common(cfg, "gemma3")
    c["hidden_act"] = str(cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")))
    c["rope_theta"], c["rope_scaling"] = hf_rope(cfg, "full_attention")
    if isinstance(cfg.get("rope_parameters"), dict) and "sliding_attention" in cfg.get("rope_parameters"):
        local_theta, local_scaling = hf_rope(cfg, "sliding_attention")
    else:
        local_theta, local_scaling = float(cfg.get("rope_local_base_freq", 10000.0)), None
    pattern = int(cfg.get("sliding_window_pattern", 6))
    return ModelArgs(**c, norm_offset=1.0, embed_scale=True, sandwich_norm=True, qk_norm=True,
                     attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
                     query_pre_attn_scalar=float(cfg.req("query_pre_attn_scalar")),
                     sliding_window=cfg.get("sliding_window"), layer_types=_types(c["num_layers"], cfg, pattern),
                     rope_local_theta=local_theta, rope_local_scaling=local_scaling,
                     qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)))


def from_gguf(meta: Source, n_vocab: int, names: set[str]) -> ModelArgs:
    c = gguf_common(meta, "gemma3", n_vocab)
    c["hidden_act"] = "gelu_pytorch_tanh"
    c["tie_word_embeddings"] = True
    c["rope_scaling"] = gguf_rope_scaling(meta)
    # as llama.cpp: no (or a zero) window means every layer is global; sliding layers use
    # rope.freq_base_swa (10000 when absent) without the global layers' scaling
    window = meta.get("attention.sliding_window") or None
    types = gguf_layer_types(meta, c["num_layers"], 6) if window else None
    return ModelArgs(**c, norm_offset=0.0, extra={"gemma_norm": True}, embed_scale=True, sandwich_norm=True,
                     qk_norm=True, query_pre_attn_scalar=gguf_query_scalar(c, 62),
                     final_softcap=meta.get("final_logit_softcapping"),
                     sliding_window=window, layer_types=types,
                     rope_local_theta=float(meta.get("rope.freq_base_swa", 10000.0)) if window else None)
