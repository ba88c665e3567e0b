"""Imatrix entry names: HF module names (mistral.rs ``.cimatrix`` keys) <-> GGUF tensor names.

llama.cpp keys an imatrix entry by the GGUF weight it feeds (``blk.3.attn_q.weight``); mistral.rs
keys it by the module's tracking key, which is the HF module path (``model.layers.3.self_attn.q_proj``).
MoE experts are one stacked entry in both: GGUF ``blk.N.ffn_gate_exps.weight`` and mistral.rs
``model.layers.N.mlp.experts.gate_proj`` (Qwen-MoE) or ``model.layers.N.block_sparse_moe.experts.gate_proj``
(Mixtral), values laid out expert-major ``[n_expert, n_in]``. Per-expert HF modules
(``...experts.5.gate_proj``, Mixtral's ``...experts.5.w1``) map to the stacked GGUF name plus an index.

The GGUF -> HF direction needs the architecture: Phi-3's fused ``ffn_up`` is HF ``mlp.gate_up_proj``,
and expert/router prefixes differ between Mixtral (GGUF arch ``llama``) and Qwen-MoE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantbench.errors import ImatrixError

# GGUF arch names (general.architecture) whose linear layers this module knows.
SUPPORTED_ARCHS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2moe", "qwen3moe",
                   "gemma", "gemma2", "gemma3", "phi3")

_ALIASES = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}  # HF model_type spellings

_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "qkv_proj": "attn_qkv"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "gate_up_proj": "ffn_up"}
_MIXTRAL_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PROJ = ("gate_proj", "up_proj", "down_proj")

_LAYER = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(.+)$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


@dataclass(frozen=True)
class GGUFKey:
    """Where an HF module's statistics live in a GGUF imatrix: tensor name and expert slot."""

    name: str
    expert: int | None = None


def hf_to_gguf(hf_name: str) -> GGUFKey:
    """GGUF imatrix name of an HF linear module; per-expert modules also give their index."""
    if hf_name in ("lm_head", "model.lm_head", "output"):
        return GGUFKey("output.weight")
    m = _LAYER.match(hf_name)
    if m is None:
        raise ImatrixError(f"imatrix entry {hf_name!r}: not a decoder-layer linear or lm_head")
    n, rest = int(m.group(1)), m.group(2)
    parts = rest.split(".")
    blk = f"blk.{n}."
    if len(parts) == 2 and parts[0] in ("self_attn", "attention") and parts[1] in _ATTN:
        return GGUFKey(blk + _ATTN[parts[1]] + ".weight")
    if len(parts) == 2 and parts[0] == "mlp" and parts[1] in _MLP:
        return GGUFKey(blk + _MLP[parts[1]] + ".weight")
    if rest in ("mlp.gate", "block_sparse_moe.gate"):
        return GGUFKey(blk + "ffn_gate_inp.weight")
    if rest == "mlp.shared_expert_gate":
        return GGUFKey(blk + "ffn_gate_inp_shexp.weight")
    if len(parts) == 3 and parts[:2] == ["mlp", "shared_expert"] and parts[2] in _PROJ:
        return GGUFKey(blk + _MLP[parts[2]] + "_shexp.weight")
    if len(parts) >= 3 and parts[0] in ("mlp", "block_sparse_moe") and parts[1] == "experts":
        tail = parts[2:]
        expert = None
        if len(tail) == 2 and tail[0].isdigit():
            expert, tail = int(tail[0]), tail[1:]
        if len(tail) == 1:
            proj = _MIXTRAL_W.get(tail[0], tail[0])
            if proj in _PROJ:
                return GGUFKey(blk + _MLP[proj] + "_exps.weight", expert)
    raise ImatrixError(f"imatrix entry {hf_name!r}: unknown module {rest!r} in layer {n}")


def gguf_to_hf(gguf_name: str, arch: str = "llama") -> str:
    """HF module name (mistral.rs tracking key) of a GGUF imatrix entry; experts give the stacked key."""
    arch = _ALIASES.get(arch, arch)
    if arch not in SUPPORTED_ARCHS:
        raise ImatrixError(f"architecture {arch!r}: no HF name mapping (known: {', '.join(SUPPORTED_ARCHS)})")
    if gguf_name == "output.weight":
        return "lm_head"
    m = _BLK.match(gguf_name)
    if m is None:
        raise ImatrixError(f"imatrix entry {gguf_name!r}: not a blk.N.*.weight or output.weight tensor")
    layer = f"model.layers.{m.group(1)}."
    t = m.group(2)
    moe = "block_sparse_moe" if arch in ("llama", "mistral", "mixtral") else "mlp"
    for proj, attn in _ATTN.items():
        if t == attn:
            return layer + "self_attn." + proj
    if t == "ffn_up" and arch == "phi3":
        return layer + "mlp.gate_up_proj"
    for proj in _PROJ:
        base = _MLP[proj]
        if t == base:
            return layer + "mlp." + proj
        if t == base + "_exps":
            return layer + f"{moe}.experts.{proj}"
        if t == base + "_shexp":
            return layer + "mlp.shared_expert." + proj
    if t == "ffn_gate_inp":
        return layer + f"{moe}.gate"
    if t == "ffn_gate_inp_shexp":
        return layer + "mlp.shared_expert_gate"
    raise ImatrixError(f"imatrix entry {gguf_name!r}: no HF module for tensor kind {t!r} ({arch})")
