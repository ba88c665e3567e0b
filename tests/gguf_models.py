"""Small GGUF models built locally for tests: llama architecture, random weights, real layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_llama_gguf(
    path: Path,
    *,
    hidden: int = 256,
    ffn: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 320,
    seed: int = 0,
    nan_tensor: str | None = None,
    tied: bool = False,
) -> Path:
    """Write an F32 llama GGUF with random weights and the metadata llama.cpp needs to load it."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    toks = [f"<t{i}>" for i in range(vocab)]
    w.add_token_list(toks)
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    hd = hidden // heads

    def t(name: str, *shape: int) -> None:
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name == nan_tensor:
            a[3, 7] = np.nan
        w.add_tensor(name, a)

    t("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    if not tied:
        t("output.weight", vocab, hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        t(f"blk.{i}.attn_q.weight", heads * hd, hidden)
        t(f"blk.{i}.attn_k.weight", kv_heads * hd, hidden)
        t(f"blk.{i}.attn_v.weight", kv_heads * hd, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, heads * hd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        t(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        t(f"blk.{i}.ffn_up.weight", ffn, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
