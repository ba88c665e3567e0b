"""The decoder every supported architecture is an instance of, and its configuration.

Architectures differ in a handful of switches (biases, q/k norms, sandwich norms, soft-capping,
sliding windows, fused projections, routed experts); each ``models/<arch>.py`` file turns its
HF config or GGUF metadata into :class:`ModelArgs` and names its weights, and this file holds the
modules. Module attribute names follow the HF checkpoints so ``state_dict``-style names are the
HF names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.engine import ggml_numerics as gn
from quantbench.engine.cache import KVCache
from quantbench.engine.linear import QExperts, QLinear
from quantbench.engine.rope import Rope, make_rope

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class ModelArgs:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_local_theta: float | None = None  # sliding layers' base (Gemma 3)
    rope_local_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "sliding_attention" | "full_attention" per layer
    hidden_act: str = "silu"
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden)
    sandwich_norm: bool = False  # Gemma 2/3 pre+post norms around attention and MLP
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    fused_qkv: bool = False  # Phi-3
    fused_gate_up: bool = False  # Phi-3
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[bool] | None = None
    moe_block_name: str = "mlp"  # Mixtral: block_sparse_moe
    rope_freq_factors: Any = None  # GGUF llama3 rope_freqs tensor
    bos_token_id: int | None = None
    eos_token_id: Any = None
    extra: dict = field(default_factory=dict)

    def is_sliding(self, i: int) -> bool:
        # 0 means "no window": llama.cpp's Phi-3 converter writes sliding_window 0 for full attention
        if not self.sliding_window:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[i] == "sliding_attention"

    def is_moe(self, i: int) -> bool:
        return self.num_experts > 0 and (self.moe_layers is None or self.moe_layers[i])


class RMSNorm(nn.Module):
    ggml_exact = False  # llama.cpp's float ops bit for bit (set with act_quant="ggml")

    def __init__(self, dim: int, eps: float, offset: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ggml_exact:
            w = self.weight.float() + self.offset if self.offset else self.weight
            return gn.rms_norm(x, w, self.eps).to(x.dtype)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma: scale in float32, then cast (as HF's GemmaRMSNorm)
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    ggml_exact = False  # llama.cpp's rope, softmax and attention matmuls bit for bit

    def __init__(self, a: ModelArgs, i: int, prefix: str) -> None:
        super().__init__()
        self.a, self.layer = a, i
        H, KV, D, hid = a.num_heads, a.num_kv_heads, a.head_dim, a.hidden_size
        p = f"{prefix}.self_attn"
        if a.fused_qkv:
            self.qkv_proj = QLinear(hid, (H + 2 * KV) * D, a.qkv_bias, f"{p}.qkv_proj")
        else:
            self.q_proj = QLinear(hid, H * D, a.qkv_bias, f"{p}.q_proj")
            self.k_proj = QLinear(hid, KV * D, a.qkv_bias, f"{p}.k_proj")
            self.v_proj = QLinear(hid, KV * D, a.qkv_bias, f"{p}.v_proj")
        self.o_proj = QLinear(H * D, hid, a.o_bias, f"{p}.o_proj")
        if a.qk_norm:
            self.q_norm = RMSNorm(D, a.rms_norm_eps, a.norm_offset)
            self.k_norm = RMSNorm(D, a.rms_norm_eps, a.norm_offset)
        self.sliding = a.is_sliding(i)
        s = a.query_pre_attn_scalar
        self.scale = (s ** -0.5) if s else D ** -0.5
        self._ggml_rope: gn.RopeTable | None = None

    def ggml_rope(self) -> gn.RopeTable | None:
        """llama.cpp's rope table for this layer, or None where its scaling rule (YaRN, longrope,
        llama3 from config values) has no exact emulation here."""
        if self._ggml_rope is None:
            a = self.a
            local = self.sliding and a.rope_local_theta is not None
            theta = a.rope_local_theta if local else a.rope_theta
            scaling = (a.rope_local_scaling if local else a.rope_scaling) or {}
            kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
            factors = None if local else a.rope_freq_factors
            if kind == "linear":
                freq_scale = 1.0 / float(scaling["factor"])
            elif kind == "default" or factors is not None:
                freq_scale = 1.0
            else:
                return None
            self._ggml_rope = gn.RopeTable(theta, a.head_dim, freq_scale, factors)
        return self._ggml_rope

    def forward(self, x, cos, sin, cache: KVCache | None, start: int) -> torch.Tensor:
        a = self.a
        exact = self.ggml_exact and a.attn_softcap is None and self.ggml_rope() is not None
        B, T, _ = x.shape
        H, KV, D = a.num_heads, a.num_kv_heads, a.head_dim
        if a.fused_qkv:
            q, k, v = self.qkv_proj(x).split([H * D, KV * D, KV * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, H, D)
        k = k.view(B, T, KV, D)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if exact:
            cos, sin = self.ggml_rope().cos_sin(start, T, x.device)
            q = gn.rope_neox_halves(q, cos, sin).to(x.dtype)
            k = gn.rope_neox_halves(k, cos, sin).to(x.dtype)
        else:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)
        S = k.shape[2]
        qpos = torch.arange(start, start + T, device=x.device)[:, None]
        kpos = torch.arange(S, device=x.device)[None, :]
        allowed = kpos <= qpos
        if self.sliding:
            allowed = allowed & (qpos - kpos < a.sliding_window)
        if KV != H:
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        if exact:
            o = self._attention_ggml(q, k, v, allowed, start).to(x.dtype)
        elif a.attn_softcap is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        else:
            w = (q @ k.transpose(-1, -2)) * self.scale
            w = torch.tanh(w / a.attn_softcap) * a.attn_softcap
            w = w.masked_fill(~allowed, float("-inf"))
            o = torch.softmax(w.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def _attention_ggml(self, q, k, v, allowed, start: int) -> torch.Tensor:
        """softmax(q k^T * scale) v with llama.cpp's float arithmetic (:mod:`ggml_numerics`); the
        kq dot runs over the GGUF's interleaved q/k order for the architectures it permutes."""
        from quantbench.engine.models import module_for_arch

        s = self.a.query_pre_attn_scalar or self.a.head_dim
        scale = float(gn.cdiv(1.0, gn.sqrt32(torch.tensor([float(s)]))))  # 1.0f/sqrtf(s)
        interleaved = getattr(module_for_arch(self.a.arch), "GGUF_PERMUTES_QK", False)
        return gn.attention(q, k, v, allowed, scale, interleaved, start)


class MLP(nn.Module):
    ggml_exact = False  # llama.cpp's SwiGLU bit for bit

    def __init__(self, a: ModelArgs, prefix: str) -> None:
        super().__init__()
        self.a = a
        hid, ff = a.hidden_size, a.intermediate_size
        p = f"{prefix}.mlp"
        if a.fused_gate_up:
            self.gate_up_proj = QLinear(hid, 2 * ff, a.mlp_bias, f"{p}.gate_up_proj")
        else:
            self.gate_proj = QLinear(hid, ff, a.mlp_bias, f"{p}.gate_proj")
            self.up_proj = QLinear(hid, ff, a.mlp_bias, f"{p}.up_proj")
        self.down_proj = QLinear(ff, hid, a.mlp_bias, f"{p}.down_proj")
        self.act = ACTIVATIONS[a.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a.fused_gate_up:
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        if self.ggml_exact and self.a.hidden_act in ("silu", "swish"):
            return self.down_proj(gn.swiglu(g, u).to(x.dtype))
        return self.down_proj(self.act(g) * u)


class MoE(nn.Module):
    """Softmax router, top-k experts, weights renormalized when ``norm_topk_prob``."""

    def __init__(self, a: ModelArgs, prefix: str) -> None:
        super().__init__()
        self.a = a
        p = f"{prefix}.{a.moe_block_name}"
        self.gate = QLinear(a.hidden_size, a.num_experts, False, f"{p}.gate")
        ff = a.moe_intermediate_size or a.intermediate_size
        self.experts = QExperts(a.num_experts, a.hidden_size, ff, f"{p}.experts", ACTIVATIONS[a.hidden_act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = x.reshape(-1, C)
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.a.experts_per_tok, dim=-1)
        if self.a.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return self.experts(h, top_i, top_w.to(x.dtype)).reshape(B, T, C)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, i: int) -> None:
        super().__init__()
        self.a = a
        prefix = f"model.layers.{i}"
        eps, off = a.rms_norm_eps, a.norm_offset
        self.input_layernorm = RMSNorm(a.hidden_size, eps, off)
        self.self_attn = Attention(a, i, prefix)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, eps, off)
        if a.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(a.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(a.hidden_size, eps, off)
        self.moe = a.is_moe(i)
        if self.moe:
            setattr(self, a.moe_block_name, MoE(a, prefix))
        else:
            self.mlp = MLP(a, prefix)

    def forward(self, x, cos, sin, cache, start) -> torch.Tensor:
        a = self.a
        ff = getattr(self, a.moe_block_name) if self.moe else self.mlp
        if a.sandwich_norm:
            h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, start))
            x = x + h
            return x + self.post_feedforward_layernorm(ff(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + ff(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    """Token embedding whose table may be packed (GGUF keeps it quantized)."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.hf_name = "model.embed_tokens"
        self.weight = None
        self._cached: torch.Tensor | None = None

    def set_weight(self, w) -> None:
        self.weight = w
        self._cached = None

    def table(self, dtype: torch.dtype) -> torch.Tensor:
        from quantbench.engine.linear import materialize
        from quantbench.quant import QTensor

        if not isinstance(self.weight, QTensor):
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        if self._cached is None or self._cached.dtype != dtype:
            self._cached = materialize(self.weight, dtype)
        return self._cached

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.table(dtype))


class Model(nn.Module):
    """Decoder-only LM: ``model(tokens [B,T], cache, start) -> logits [B,T,V]`` (float32)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.args = a
        self.dtype = torch.float32
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(a.vocab_size, a.hidden_size)
        self.model.layers = nn.ModuleList([Block(a, i) for i in range(a.num_layers)])
        self.model.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.norm_offset)
        self.lm_head = QLinear(a.hidden_size, a.vocab_size, False, "lm_head")
        freq = a.rope_freq_factors
        self.rope_global: Rope = make_rope(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings, freq)
        self.rope_local: Rope | None = None
        if a.rope_local_theta is not None:
            self.rope_local = make_rope(a.head_dim, a.rope_local_theta, a.rope_local_scaling, a.max_position_embeddings)

    def make_cache(self, max_len: int, batch: int = 1) -> KVCache:
        a = self.args
        dev = self.model.norm.weight.device
        return KVCache(a.num_layers, batch, a.num_kv_heads, a.head_dim, max_len, self.dtype, dev)

    def set_act_quant(self, mode: str) -> None:
        """``"ggml"``: every packed linear layer quantizes its input as llama.cpp's CPU backend
        does, and norms, rope/attention and SwiGLU switch to llama.cpp's exact float ops
        (:mod:`quantbench.engine.ggml_numerics`), so logits reproduce llama.cpp's bit for bit
        where those ops are emulated. ``"none"``: float activations, the plain ops."""
        for layer in self.linear_layers():
            layer.act_quant = mode
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.ggml_exact = mode == "ggml"

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        a = self.args
        T = tokens.shape[1]
        x = self.model.embed_tokens(tokens, self.dtype)
        if a.embed_scale:
            x = x * torch.tensor(math.sqrt(a.hidden_size), dtype=x.dtype)
        pos = torch.arange(start, start + T, device=tokens.device)
        cos_g, sin_g = self.rope_global.cos_sin(pos, x.dtype)
        cos_l, sin_l = (cos_g, sin_g) if self.rope_local is None else self.rope_local.cos_sin(pos, x.dtype)
        for i, blk in enumerate(self.model.layers):
            local = self.rope_local is not None and a.is_sliding(i)
            x = blk(x, cos_l if local else cos_g, sin_l if local else sin_g, cache, start)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = self.lm_head(x).float()
        if a.final_softcap is not None:
            logits = torch.tanh(logits / a.final_softcap) * a.final_softcap
        return logits

    def linear_layers(self) -> list[QLinear]:
        return [m for m in self.modules() if isinstance(m, QLinear)]
