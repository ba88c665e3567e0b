"""Reading HF config.json dicts and GGUF metadata into :class:`ModelArgs` fields, with typed errors."""

from __future__ import annotations

from typing import Any

from quantbench.errors import FormatError


class Source:
    """A config mapping plus where it came from, so every missing key names its file."""

    def __init__(self, values: dict[str, Any], origin: str, prefix: str = "") -> None:
        self.values, self.origin, self.prefix = values, origin, prefix

    def req(self, key: str) -> Any:
        full = self.prefix + key
        if full not in self.values or self.values[full] is None:
            raise FormatError(f"{self.origin}: missing required key {full!r}")
        return self.values[full]

    def get(self, key: str, default: Any = None) -> Any:
        v = self.values.get(self.prefix + key)
        return default if v is None else v


HF_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "su")  # what engine/rope.py implements


def _checked_rope_kind(cfg: Source, kind: str | None, key: str) -> str:
    kind = kind or "default"
    if kind not in HF_ROPE_TYPES:
        raise FormatError(f"{cfg.origin}: {key} rope_type {kind!r} is not supported "
                          f"(supported: {', '.join(HF_ROPE_TYPES)})")
    return kind


def hf_rope(cfg: Source, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from transformers v4 (`rope_theta`/`rope_scaling`) or v5 (`rope_parameters`)."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if layer_type is not None and layer_type in rp:
            rp = rp[layer_type]
        elif "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = _checked_rope_kind(cfg, rp.get("rope_type", rp.get("type", "default")), "rope_parameters")
        return theta, (dict(rp) if kind != "default" else None)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        if _checked_rope_kind(cfg, scaling.get("rope_type", scaling.get("type")), "rope_scaling") == "default":
            scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling


def hf_common(cfg: Source, arch: str) -> dict[str, Any]:
    hid = int(cfg.req("hidden_size"))
    heads = int(cfg.req("num_attention_heads"))
    theta, scaling = hf_rope(cfg)
    eos = cfg.get("eos_token_id")
    return dict(
        arch=arch,
        hidden_size=hid,
        intermediate_size=int(cfg.req("intermediate_size")),
        num_layers=int(cfg.req("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or hid // heads),
        vocab_size=int(cfg.req("vocab_size")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hidden_act=str(cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos,
    )


def gguf_common(meta: Source, arch: str, n_vocab: int) -> dict[str, Any]:
    hid = int(meta.req("embedding_length"))
    heads = int(meta.req("attention.head_count"))
    kv = meta.get("attention.head_count_kv", heads)
    if isinstance(kv, (list, tuple)):
        if len(set(int(k) for k in kv)) != 1:
            raise FormatError(f"{meta.origin}: per-layer head_count_kv is not supported")
        kv = kv[0]
    ff = meta.req("feed_forward_length")
    if isinstance(ff, (list, tuple)):
        ff = ff[0]
    return dict(
        arch=arch,
        hidden_size=hid,
        intermediate_size=int(ff),
        num_layers=int(meta.req("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(meta.get("attention.key_length", hid // heads)),
        vocab_size=int(meta.get("vocab_size", n_vocab)),
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get("context_length", 4096)),
    )


def gguf_rope_scaling(meta: Source) -> dict | None:
    kind = meta.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.req("rope.scaling.factor"))}
    raise FormatError(f"{meta.origin}: rope scaling type {kind!r} is not supported")
