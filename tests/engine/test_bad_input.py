"""Bad model input → the typed ``QuantbenchError`` subclass, with a message naming the file and
the key or tensor at fault (the CLI prints that one line; never a deep traceback).

Inputs are written directly (config.json + safetensors, or a GGUF through the ``gguf`` package),
each next to a well-formed twin that must load: a test that a broken file fails is only worth
something if the same file, unbroken, works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantbench.engine import load_model
from quantbench.engine.gguf_names import permute_rows
from quantbench.errors import FormatError, InputValueError, QuantbenchError, ShapeError

HID, FF, LAYERS, HEADS, KV, VOCAB = 32, 48, 2, 4, 2, 64
HEAD_DIM = HID // HEADS


def llama_config(**over: Any) -> dict[str, Any]:
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=HID, intermediate_size=FF,
               num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
               rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=128)
    cfg.update(over)
    return cfg


def llama_tensors(n_experts: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named weights of the config above (Mixtral-style experts when ``n_experts``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.2

    t = {"model.embed_tokens.weight": r(VOCAB, HID), "model.norm.weight": 1 + r(HID), "lm_head.weight": r(VOCAB, HID)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        t |= {f"{p}.input_layernorm.weight": 1 + r(HID), f"{p}.post_attention_layernorm.weight": 1 + r(HID),
              f"{p}.self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HID),
              f"{p}.self_attn.k_proj.weight": r(KV * HEAD_DIM, HID),
              f"{p}.self_attn.v_proj.weight": r(KV * HEAD_DIM, HID),
              f"{p}.self_attn.o_proj.weight": r(HID, HEADS * HEAD_DIM)}
        if n_experts:
            t[f"{p}.block_sparse_moe.gate.weight"] = r(n_experts, HID)
            for e in range(n_experts):
                q = f"{p}.block_sparse_moe.experts.{e}"
                t |= {f"{q}.w1.weight": r(FF, HID), f"{q}.w3.weight": r(FF, HID), f"{q}.w2.weight": r(HID, FF)}
        else:
            t |= {f"{p}.mlp.gate_proj.weight": r(FF, HID), f"{p}.mlp.up_proj.weight": r(FF, HID),
                  f"{p}.mlp.down_proj.weight": r(HID, FF)}
    return t


def write_hf(d: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


def load(path: Path):
    return load_model(path, dtype="f32", device="cpu", with_tokenizer=False)


def raises(kind: type[QuantbenchError], path: Path, *needles: str) -> str:
    """Load ``path``; it must raise exactly ``kind`` whose message names every needle."""
    with pytest.raises(QuantbenchError) as info:
        load(path)
    assert type(info.value) is kind, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message {msg!r}"
    assert "\n" not in msg
    return msg


TOKENS = torch.tensor([[1, 5, 9, 33, 2, 63, 17]])


# --- HF directories -------------------------------------------------------------------------


def test_well_formed_hf_dir_loads(tmp_path: Path) -> None:
    d = write_hf(tmp_path / "m", llama_config(), llama_tensors())
    out = load(d).model(TOKENS)
    assert out.shape == (1, TOKENS.shape[1], VOCAB) and torch.isfinite(out).all()
    moe = write_hf(tmp_path / "moe", llama_config(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
                   llama_tensors(n_experts=4))
    assert torch.isfinite(load(moe).model(TOKENS)).all()


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "vocab_size", "model_type"])
def test_missing_config_key(tmp_path: Path, key: str) -> None:
    cfg = llama_config()
    del cfg[key]
    d = write_hf(tmp_path, cfg, llama_tensors())
    raises(FormatError, d, str(d / "config.json"), f"'{key}'", "missing")


@pytest.mark.parametrize("model_type,key", [("mixtral", "num_local_experts"), ("mixtral", "num_experts_per_tok"),
                                            ("qwen3_moe", "num_experts"), ("qwen3_moe", "moe_intermediate_size"),
                                            ("gemma2", "query_pre_attn_scalar")])
def test_missing_arch_specific_key(tmp_path: Path, model_type: str, key: str) -> None:
    full = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                query_pre_attn_scalar=8)
    cfg = llama_config(model_type=model_type, **{k: v for k, v in full.items() if k != key})
    if key == "num_experts":
        del cfg["num_local_experts"]  # transformers 5 spells qwen3_moe's expert count this way
    d = write_hf(tmp_path, cfg, llama_tensors())
    raises(FormatError, d, str(d / "config.json"), f"'{key}'")


def test_unknown_model_type(tmp_path: Path) -> None:
    d = write_hf(tmp_path, llama_config(model_type="mamba"), llama_tensors())
    raises(FormatError, d, str(d / "config.json"), "'mamba'", "not supported", "llama")


def test_unsupported_rope_type(tmp_path: Path) -> None:
    cfg = llama_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    d = write_hf(tmp_path, cfg, llama_tensors())
    raises(FormatError, d, str(d / "config.json"), "'yarn'", "not supported")
    cfg = llama_config(rope_scaling={"type": "dynamic", "factor": 2.0})
    write_hf(tmp_path, cfg, llama_tensors())
    raises(FormatError, d, str(d / "config.json"), "'dynamic'")


def test_no_config_or_bad_json(tmp_path: Path) -> None:
    d = write_hf(tmp_path, llama_config(), llama_tensors())
    (d / "config.json").write_text("{ not json")
    raises(FormatError, d, str(d / "config.json"), "invalid JSON")
    (d / "config.json").unlink()
    raises(FormatError, d, str(d), "config.json")


def test_tensor_with_wrong_shape(tmp_path: Path) -> None:
    t = llama_tensors()
    t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(KV * HEAD_DIM, HID - 1)
    d = write_hf(tmp_path, llama_config(), t)
    raises(ShapeError, d, str(d), "model.layers.1.self_attn.k_proj.weight", f"[{KV * HEAD_DIM}, {HID - 1}]",
           f"[{KV * HEAD_DIM}, {HID}]")


def test_config_disagrees_with_weights(tmp_path: Path) -> None:
    d = write_hf(tmp_path, llama_config(intermediate_size=FF + 16), llama_tensors())
    # whichever MLP tensor comes first in the file is named, with both widths
    raises(ShapeError, d, str(d), "model.layers.0.mlp.", str(FF), str(FF + 16), "the config implies")


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    t = llama_tensors()
    del t["model.layers.1.mlp.down_proj.weight"]
    d = write_hf(tmp_path / "a", llama_config(), t)
    raises(FormatError, d, str(d), "missing", "model.layers.1.mlp.down_proj.weight")
    t = llama_tensors() | {"model.layers.0.self_attn.extra_proj.weight": torch.zeros(4, 4)}
    d = write_hf(tmp_path / "b", llama_config(), t)
    raises(FormatError, d, str(d), "model.layers.0.self_attn.extra_proj.weight")
    # one layer too many in the weights
    d = write_hf(tmp_path / "c", llama_config(num_hidden_layers=LAYERS - 1), llama_tensors())
    raises(FormatError, d, str(d), f"model.layers.{LAYERS - 1}.")


def test_missing_expert(tmp_path: Path) -> None:
    t = llama_tensors(n_experts=4)
    del t["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    d = write_hf(tmp_path, llama_config(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2), t)
    raises(FormatError, d, str(d), "model.layers.0.block_sparse_moe.experts", "3 of 4")


def test_corrupt_or_missing_safetensors(tmp_path: Path) -> None:
    d = write_hf(tmp_path, llama_config(), llama_tensors())
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    raises(FormatError, d, str(f))
    f.unlink()
    raises(FormatError, d, str(d), "safetensors")


# --- GGUF files ----------------------------------------------------------------------------

LLAMA_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def llama_gguf_tensors() -> dict[str, np.ndarray]:
    """The HF weights above, GGUF-named, Q/K rows permuted as llama.cpp's converter does."""
    hf = llama_tensors()
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(LAYERS):
        for g, h in LLAMA_GGUF_BLOCK.items():
            w = hf[f"model.layers.{i}.{h}.weight"]
            if g in ("attn_q", "attn_k"):
                w = permute_rows(w, HEADS if g == "attn_q" else KV)
            out[f"blk.{i}.{g}.weight"] = w
    return {k: v.numpy().astype(np.float32) for k, v in out.items()}


def llama_gguf_meta(arch: str = "llama") -> dict[str, Any]:
    return {f"{arch}.embedding_length": HID, f"{arch}.feed_forward_length": FF, f"{arch}.block_count": LAYERS,
            f"{arch}.attention.head_count": HEADS, f"{arch}.attention.head_count_kv": KV,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.vocab_size": VOCAB,
            f"{arch}.context_length": 128, f"{arch}.rope.freq_base": 10000.0}


def write_gguf(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_string(k, str(v))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_well_formed_gguf_loads_and_matches_hf(tmp_path: Path) -> None:
    g = write_gguf(tmp_path / "m.gguf", "llama", llama_gguf_meta(), llama_gguf_tensors())
    d = write_hf(tmp_path / "hf", llama_config(), llama_tensors())
    with torch.no_grad():
        a, b = load(g).model(TOKENS), load(d).model(TOKENS)
    assert (a - b).abs().max().item() < 1e-5


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    g = write_gguf(tmp_path / "mamba.gguf", "mamba", llama_gguf_meta("mamba"), llama_gguf_tensors())
    raises(FormatError, g, str(g), "'mamba'", "not supported", "llama")


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "attention.head_count", "feed_forward_length"])
def test_gguf_missing_metadata(tmp_path: Path, key: str) -> None:
    meta = llama_gguf_meta()
    del meta[f"llama.{key}"]
    g = write_gguf(tmp_path / "m.gguf", "llama", meta, llama_gguf_tensors())
    raises(FormatError, g, str(g), f"'llama.{key}'")


def test_gguf_tensor_with_wrong_shape(tmp_path: Path) -> None:
    t = llama_gguf_tensors()
    t["blk.1.ffn_up.weight"] = np.zeros((FF, HID + 8), dtype=np.float32)
    g = write_gguf(tmp_path / "m.gguf", "llama", llama_gguf_meta(), t)
    raises(ShapeError, g, str(g), "mlp.up_proj.weight", f"[{FF}, {HID + 8}]")


def test_gguf_unknown_or_missing_tensor(tmp_path: Path) -> None:
    t = llama_gguf_tensors() | {"blk.0.attn_mystery.weight": np.zeros((4, 4), dtype=np.float32)}
    g = write_gguf(tmp_path / "a.gguf", "llama", llama_gguf_meta(), t)
    raises(FormatError, g, str(g), "blk.0.attn_mystery.weight")
    t = llama_gguf_tensors()
    del t["blk.0.ffn_gate.weight"]
    g = write_gguf(tmp_path / "b.gguf", "llama", llama_gguf_meta(), t)
    raises(FormatError, g, str(g), "missing", "model.layers.0.mlp.gate_proj.weight")


def test_not_a_gguf_or_truncated(tmp_path: Path) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"this is not a model at all" * 10)
    raises(FormatError, bad, str(bad), "not a GGUF")
    g = write_gguf(tmp_path / "m.gguf", "llama", llama_gguf_meta(), llama_gguf_tensors())
    data = g.read_bytes()
    g.write_bytes(data[: len(data) - 4096])
    raises(FormatError, g, str(g), "truncated")


def test_missing_path(tmp_path: Path) -> None:
    p = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(QuantbenchError, match="no such file") as info:
        load(p)
    assert str(p) in str(info.value)


# --- the context -----------------------------------------------------------------------------


def test_sequence_longer_than_the_cache(tmp_path: Path) -> None:
    model = load(write_hf(tmp_path, llama_config(), llama_tensors())).model
    cache = model.make_cache(6)
    with pytest.raises(InputValueError, match=r"7 tokens exceeds the context length 6"):
        model(TOKENS, cache=cache)
    cache = model.make_cache(8)
    model(TOKENS, cache=cache)
    with pytest.raises(InputValueError, match=r"9 tokens exceeds the context length 8"):
        model(TOKENS[:, :2], cache=cache, start=TOKENS.shape[1])
