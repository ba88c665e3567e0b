"""GGUF tensor names ↔ the engine's (HF) names, and llama.cpp's Q/K row permutation undone.

llama.cpp's converter renames HF tensors (``model.layers.3.self_attn.q_proj.weight`` →
``blk.3.attn_q.weight``), stacks MoE experts into ``ffn_{gate,up,down}_exps``, and for the
Llama family permutes Q/K rows so its rope can rotate adjacent pairs. The engine uses HF's
layout, so loading a GGUF maps names back and inverts that permutation — on packed rows too,
which is exact because every GGML block runs along a row.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch

from quantbench.errors import FormatError
from quantbench.quant import QTensor

TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# (GGUF block suffix, HF suffix) — the defaults for Llama-like blocks; gemma's sandwich norms differ.
BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "{moe}.gate",
    "ffn_gate_exps": "{moe}.experts.gate_proj",
    "ffn_up_exps": "{moe}.experts.up_proj",
    "ffn_down_exps": "{moe}.experts.down_proj",
}
SANDWICH = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Tensors llama.cpp stores beside the weights (rope factors), read into the config, not the model.
AUX_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})

_QK = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias")


def permuted_heads(hf_name: str, n_head: int, n_kv_head: int, permutes_qk: bool) -> int | None:
    """Heads of the Q/K weight or bias ``hf_name`` whose rows llama.cpp permuted, else None."""
    if not permutes_qk or not hf_name.endswith(_QK):
        return None
    return n_head if ".q_proj." in hf_name else n_kv_head


_BLK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def block_table(sandwich: bool, fused_gate_up: bool, moe_block: str) -> dict[str, str]:
    t = {k: v.replace("{moe}", moe_block) for k, v in BLOCK.items()}
    if sandwich:
        t.update(SANDWICH)
    if fused_gate_up:
        t["ffn_up"] = "mlp.gate_up_proj"
    return t


def gguf_to_hf(name: str, table: dict[str, str]) -> str | None:
    if name in TOP:
        return TOP[name]
    m = _BLK.match(name)
    if not m or m.group(2) not in table:
        return None
    return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"


def model_tensors(gf, args) -> Iterator[tuple[Any, str]]:
    """(GGUF tensor, HF name) for every model tensor of ``gf`` (an open GGUF file) whose
    architecture is ``args`` (a ``ModelArgs``): auxiliary tensors (rope tables...) are skipped,
    and a tensor with no place in the model is a :class:`FormatError` naming it."""
    table = block_table(args.sandwich_norm, args.fused_gate_up, args.moe_block_name)
    for t in gf.tensors:
        if t.name in AUX_TENSORS:
            continue
        hf = gguf_to_hf(t.name, table)
        if hf is None:
            raise FormatError(f"{gf.path}: tensor {t.name} has no place in a {args.arch} model")
        yield t, hf


def hf_to_gguf(name: str, table: dict[str, str]) -> str | None:
    for g, h in TOP.items():
        if h == name:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not m:
        return None
    for g, h in table.items():
        if h == m.group(2):
            return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return None


def unpermute_rows(w: torch.Tensor | QTensor, n_head: int) -> torch.Tensor | QTensor:
    """Inverse of llama.cpp's ``permute``: per head, rows (i, half) interleaved back to halves."""
    rows = w.shape[0]
    d = rows // n_head // 2
    # GGUF row j holds HF row perm[j]; HF row k is therefore GGUF row inv[k]
    perm = torch.arange(rows).reshape(n_head, 2, d).transpose(1, 2).reshape(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(rows)
    if isinstance(w, QTensor):
        data = w.data.index_select(0, inv.to(w.data.device))
        return QTensor(w.qtype, w.shape, {"data": data}, dict(w.params))
    return w.index_select(0, inv.to(w.device))


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``permute`` (HF → GGUF row order for Llama-family Q/K)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
