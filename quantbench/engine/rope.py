"""Rotary position embeddings with the scaling rules HF configs name (default, linear, llama3, longrope)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantbench.errors import FormatError


@dataclass
class Rope:
    """Inverse frequencies plus what the scaling rule does to cos/sin."""

    inv_freq: torch.Tensor  # float32 [head_dim/2]
    attention_scaling: float = 1.0
    long_inv_freq: torch.Tensor | None = None  # longrope: used past original_max
    original_max: int = 0

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq
        if self.long_inv_freq is not None and int(positions.max()) + 1 > self.original_max:
            inv = self.long_inv_freq
        inv = inv.to(positions.device)
        freqs = positions.to(torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim))


def make_rope(dim: int, theta: float, scaling: dict | None, max_pos: int, freq_factors: torch.Tensor | None = None) -> Rope:
    """Build a :class:`Rope` from an HF ``rope_scaling``/``rope_parameters`` dict.

    ``freq_factors`` is GGUF's ``rope_freqs.weight`` (llama.cpp stores llama3 scaling as
    precomputed per-frequency divisors instead of config values).
    """
    inv = base_inv_freq(dim, theta)
    if freq_factors is not None:
        return Rope(inv / freq_factors.to(device="cpu", dtype=torch.float32))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind == "default":
        return Rope(inv)
    if kind == "linear":
        return Rope(inv / float(scaling["factor"]))
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return Rope(torch.where(medium, smoothed, scaled))
    if kind in ("longrope", "su"):
        original = int(scaling.get("original_max_position_embeddings") or max_pos)
        factor = scaling.get("factor") or (max_pos / original)
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
        short = torch.tensor(scaling["short_factor"], dtype=torch.float32, device="cpu")
        long = torch.tensor(scaling["long_factor"], dtype=torch.float32, device="cpu")
        return Rope(1.0 / (short * theta**exps), float(attn), 1.0 / (long * theta**exps), original)
    raise FormatError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3, longrope)")
