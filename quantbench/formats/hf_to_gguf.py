"""HF model directory → GGUF, as llama.cpp's ``convert_hf_to_gguf.py`` does for the engine's
architectures (llama/mistral/mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3, phi3).

What llama.cpp's converter does, and so what this does (facts from its ``conversion/`` package):

* metadata: ``general.*``, the ``<arch>.*`` hyper-parameters its ``set_gguf_parameters`` writes
  for each class (Gemma 2 writes no rope base; Mistral's sliding window is not written; Llama
  adds ``vocab_size`` and ``rope.dimension_count``...), rope scaling (linear → keys, llama3 →
  a ``rope_freqs`` tensor, longrope → ``rope_factors_long/short`` + ``rope.scaling.attn_factor``).
* tensors: renamed (``blk.N.attn_q.weight``...), Llama-family Q/K rows (and biases) permuted for
  its interleaved rope, ``+1`` on Gemma norm weights, per-expert tensors stacked into
  ``ffn_*_exps``, Gemma 3's embedding cut to the real vocabulary. 1-D tensors, ``*_norm``,
  biases and the MoE router stay F32; the other matrices take the output type (``auto``: the
  checkpoint's 16-bit type, F16 for F32 checkpoints).
* tokenizer: ``tokenizer.model`` → SentencePiece (``llama``) vocabulary with scores and types;
  otherwise ``tokenizer.json`` byte-level BPE → ``gpt2`` with merges and the ``pre`` name
  found by hashing the ids of llama.cpp's check text (its table), else by matching the
  pre-tokenizer regexes; special ids, add-BOS/EOS flags and the chat template as gguf-py's
  ``SpecialVocab`` reads them.

Tensors are declared up front from the safetensors headers and streamed one at a time (a MoE
projection's experts together), so memory stays at one tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from quantbench.engine import gguf_names
from quantbench.errors import FormatError, InputValueError
from quantbench.formats.gguf import KV, GGUFStreamWriter
from quantbench.formats.safetensors_dir import SafetensorsModel

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}
OUTTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32)}  # ggml type, LlamaFileType
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's convert_hf_to_gguf_update.py check text and the hashes of its ids for the
# tokenizers of the supported model families (a subset of its table: same values).
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 '
          '33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на '
          'Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure '
          'I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # DeepSeek-R1-Distill-Qwen-1.5B
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen3.5-9B-Instruct
}

_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_ALIAS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------
# metadata


class Meta:
    """Ordered GGUF key-values with their GGUF value types."""

    def __init__(self) -> None:
        import gguf

        self.T = gguf.GGUFValueType
        self.items: dict[str, KV] = {}

    def u32(self, k: str, v: Any) -> None:
        self.items[k] = KV(int(v), self.T.UINT32)

    def f32(self, k: str, v: Any) -> None:
        self.items[k] = KV(float(v), self.T.FLOAT32)

    def s(self, k: str, v: Any) -> None:
        self.items[k] = KV(str(v), self.T.STRING)

    def b(self, k: str, v: Any) -> None:
        self.items[k] = KV(bool(v), self.T.BOOL)

    def arr(self, k: str, v: list, sub) -> None:
        self.items[k] = KV(list(v), self.T.ARRAY, sub)


def _rope_params(cfg: dict) -> dict:
    """HF rope settings in one dict (v4 ``rope_theta``/``rope_scaling`` or v5 ``rope_parameters``),
    as llama.cpp's TextModel.__init__ gathers them."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        return rp
    local = next((cfg[k] for k in ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                   "rope_local_base_freq") if k in cfg), None)
    if local is not None:
        rp["sliding_attention"] = {"rope_theta": local}
    theta = next((cfg[k] for k in ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                   "rotary_emb_base") if k in cfg), None)
    if "rope_theta" not in rp and theta is not None:
        rp["rope_theta"] = theta
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    if "original_max_position_embeddings" not in rp and "original_max_position_embeddings" in cfg:
        rp["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return rp


def hparams_metadata(cfg: dict, args, arch: str, file_type: int, name: str, origin: str) -> Meta:
    """``general.*`` and ``<arch>.*`` keys in llama.cpp's order for this model class."""
    m = Meta()
    a = GGUF_ARCH[args.arch]
    m.s("general.architecture", a)
    m.s("general.type", "model")
    m.s("general.name", name)
    rp = _rope_params(cfg)
    full = rp.get("full_attention", rp)
    if args.arch == "gemma2":
        m.u32(f"{a}.context_length", cfg["max_position_embeddings"])
        m.u32(f"{a}.embedding_length", cfg["hidden_size"])
        m.u32(f"{a}.block_count", args.num_layers)
        m.u32(f"{a}.feed_forward_length", cfg["intermediate_size"])
        m.u32(f"{a}.attention.head_count", cfg["num_attention_heads"])
        m.u32(f"{a}.attention.head_count_kv", cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        m.f32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
        m.u32(f"{a}.attention.key_length", cfg["head_dim"])
        m.u32(f"{a}.attention.value_length", cfg["head_dim"])
        m.u32("general.file_type", file_type)
        m.f32(f"{a}.attn_logit_softcapping", cfg["attn_logit_softcapping"])
        m.f32(f"{a}.final_logit_softcapping", cfg["final_logit_softcapping"])
        m.u32(f"{a}.attention.sliding_window", cfg["sliding_window"])
        return m
    if args.arch == "phi3":
        n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
        orig = rp.get("original_max_position_embeddings")
        if orig is None:
            raise FormatError(f"{origin}: Phi-3 config lacks original_max_position_embeddings")
        rope_dims = int(rp.get("partial_rotary_factor", 1.0) * n_embd) // n_head
        m.u32(f"{a}.context_length", cfg.get("n_positions", cfg.get("max_position_embeddings")))
        m.u32(f"{a}.rope.scaling.original_context_length", orig)
        m.u32(f"{a}.embedding_length", n_embd)
        m.u32(f"{a}.feed_forward_length", cfg["intermediate_size"])
        m.u32(f"{a}.block_count", args.num_layers)
        m.u32(f"{a}.attention.head_count", n_head)
        m.u32(f"{a}.attention.head_count_kv", cfg["num_key_value_heads"])
        m.f32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
        m.u32(f"{a}.rope.dimension_count", rope_dims)
        m.f32(f"{a}.rope.freq_base", full["rope_theta"])
        m.u32("general.file_type", file_type)
        m.u32(f"{a}.attention.sliding_window", cfg.get("sliding_window") or 0)
        return m
    # TextModel.set_gguf_parameters
    m.u32(f"{a}.block_count", args.num_layers)
    if "max_position_embeddings" in cfg:
        m.u32(f"{a}.context_length", cfg["max_position_embeddings"])
    m.u32(f"{a}.embedding_length", cfg["hidden_size"])
    m.u32(f"{a}.feed_forward_length", cfg["intermediate_size"])
    m.u32(f"{a}.attention.head_count", cfg["num_attention_heads"])
    if "num_key_value_heads" in cfg:
        m.u32(f"{a}.attention.head_count_kv", cfg["num_key_value_heads"])
    kind = full.get("rope_type")
    if kind is not None:
        if kind == "linear" and full.get("factor") is not None:
            m.s(f"{a}.rope.scaling.type", "linear")
            m.f32(f"{a}.rope.scaling.factor", full["factor"])
        elif kind in ("su", "longrope"):
            m.s(f"{a}.rope.scaling.type", "longrope")
        elif kind not in ("default", "llama3"):
            raise FormatError(f"{origin}: rope type {kind!r} is not supported")
    if full.get("rope_theta") is not None:
        m.f32(f"{a}.rope.freq_base", full["rope_theta"])
    if rp.get("sliding_attention", {}).get("rope_theta") is not None:
        m.f32(f"{a}.rope.freq_base_swa", rp["sliding_attention"]["rope_theta"])
    if "rms_norm_eps" in cfg:
        m.f32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    n_exp = next((cfg[k] for k in ("num_local_experts", "num_experts") if k in cfg), None)
    if n_exp is not None:
        m.u32(f"{a}.expert_count", n_exp)
    if "num_experts_per_tok" in cfg:
        m.u32(f"{a}.expert_used_count", cfg["num_experts_per_tok"])
    if cfg.get("head_dim") is not None:
        m.u32(f"{a}.attention.key_length", cfg["head_dim"])
        m.u32(f"{a}.attention.value_length", cfg["head_dim"])
    m.u32("general.file_type", file_type)
    if a == "llama":
        m.u32(f"{a}.vocab_size", cfg["vocab_size"])
        m.u32(f"{a}.rope.dimension_count", cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    elif a == "qwen3moe" and cfg.get("moe_intermediate_size") is not None:
        m.u32(f"{a}.expert_feed_forward_length", cfg["moe_intermediate_size"])
    elif a == "gemma3":
        m.u32(f"{a}.context_length", cfg.get("max_position_embeddings", 131072))
        m.u32(f"{a}.attention.head_count", cfg.get("num_attention_heads", 8))
        m.f32(f"{a}.attention.layer_norm_rms_epsilon", cfg.get("rms_norm_eps", 1e-6))
        m.u32(f"{a}.attention.key_length", cfg.get("head_dim", 256))
        m.u32(f"{a}.attention.value_length", cfg.get("head_dim", 256))
        m.f32(f"{a}.rope.freq_base", full.get("rope_theta", 1_000_000.0))
        if cfg.get("final_logit_softcapping"):
            m.f32(f"{a}.final_logit_softcapping", cfg["final_logit_softcapping"])
        if cfg.get("sliding_window_pattern") != 1 and cfg.get("sliding_window") is not None:
            m.u32(f"{a}.attention.sliding_window", cfg["sliding_window"])
        m.u32(f"{a}.attention.head_count_kv", cfg.get("num_key_value_heads", 4))
    return m


# ---------------------------------------------------------------------------------------------
# extra tensors from the config


def llama3_rope_factors(rp: dict, head_dim: int) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` for HF's ``llama3`` rope scaling."""
    base = rp.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    # float32 arithmetic element by element, as llama.cpp (its loop runs over 0-d float32 tensors)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old / high, torch.ones_like(freqs),
                      torch.where(wavelen > old / low, torch.full_like(freqs, float(factor)), mid))
    return out.to(torch.float32)


def phi3_longrope(cfg: dict, rp: dict, meta: Meta, origin: str) -> list[tuple[str, torch.Tensor]]:
    long_f, short_f = rp.get("long_factor"), rp.get("short_factor")
    if not long_f:
        return []
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    max_pos = cfg.get("n_positions", cfg.get("max_position_embeddings"))
    orig = rp["original_max_position_embeddings"]
    rope_dims = int(rp.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    scale = max_pos / orig
    kind = str(rp.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise FormatError(f"{origin}: Phi-3 rope scaling type {kind!r} is not supported")
    meta.f32("phi3.rope.scaling.attn_factor", attn)
    if short_f is None or len(long_f) != len(short_f) or len(long_f) != rope_dims / 2:
        raise FormatError(f"{origin}: rope long/short factors must both have {rope_dims // 2} entries")
    return [("rope_factors_long.weight", torch.tensor(long_f, dtype=torch.float32)),
            ("rope_factors_short.weight", torch.tensor(short_f, dtype=torch.float32))]


# ---------------------------------------------------------------------------------------------
# tokenizer


def _looks_special(t: str) -> bool:
    """llama.cpp's ``does_token_look_special``."""
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<｜") and t.endswith("｜>")) or (t.startswith("<unused") and t.endswith(">")))


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: unreadable JSON ({e})") from None


def _pre_regexes(pre: dict | None, origin: str) -> list[str] | None:
    """The pre-tokenizer of ``tokenizer.json`` as llama.cpp's chain of regexes (None: unknown)."""
    from quantbench.engine.tokenizer import _GPT2

    if pre is None:
        return None
    kind = pre.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for p in pre.get("pretokenizers", []):
            r = _pre_regexes(p, origin)
            if r is None:
                return None
            out += r
        return out
    if kind == "Split":
        pat = pre.get("pattern", {})
        if "Regex" not in pat:
            return None
        return [pat["Regex"].replace(_HF_CONTRACTIONS, "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")]
    if kind == "Digits":
        return [r"\p{N}" if pre.get("individual_digits") else r"\p{N}+"]
    if kind == "ByteLevel":
        return [_GPT2] if pre.get("use_regex", True) else []
    return None


def detect_pre(directory: Path, tj: dict, origin: str) -> str:
    """``tokenizer.ggml.pre``: llama.cpp's hash of the check text's ids, else the entry of its
    pre-tokenizer table whose regexes (and ignore_merges) equal this tokenizer's."""
    from quantbench.engine.tokenizer import PRE_TOKENIZERS, Tokenizer

    ids = Tokenizer.from_hf_dir(directory).encode(CHKTXT, add_special=True)
    h = hashlib.sha256(str(ids).encode()).hexdigest()
    if h in PRE_HASHES:
        return PRE_HASHES[h]
    regexes = _pre_regexes(tj.get("pre_tokenizer"), origin)
    ignore = bool(tj.get("model", {}).get("ignore_merges", False))
    if regexes is not None:
        for name, p in PRE_TOKENIZERS.items():
            if name != "default" and p.regexes == regexes and p.ignore_merges == ignore:
                return name
    raise FormatError(f"{origin}: BPE pre-tokenizer not recognized (check-text hash {h}); "
                      "llama.cpp would refuse it too")


@dataclass
class Vocab:
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None


def spm_vocab(directory: Path, vocab_size: int | None) -> Vocab:
    """llama.cpp's ``_create_vocab_sentencepiece``: pieces, scores and types from
    ``tokenizer.model``, overridden by ``added_tokens.json`` and ``added_tokens_decoder``."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    path = directory / "tokenizer.model"
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:
        raise FormatError(f"{path}: not a SentencePiece model ({e})") from None
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [TT_UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (TT_UNKNOWN if sp.IsUnknown(i) else TT_CONTROL if sp.IsControl(i) else
                    TT_UNUSED if sp.IsUnused(i) else TT_BYTE if sp.IsByte(i) else TT_NORMAL)
    added = directory / "added_tokens.json"
    if added.is_file():
        for text, i in _read_json(added).items():
            if i < n:
                tokens[i], scores[i], types[i] = text, -1000.0, TT_USER_DEFINED
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        for i, d in _read_json(tc).get("added_tokens_decoder", {}).items():
            i = int(i)
            if i >= n:
                continue
            text = d["content"]
            if d.get("special") or _looks_special(text):
                types[i] = TT_CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[i] = TT_USER_DEFINED
            tokens[i], scores[i] = text, -1000.0
    return Vocab("llama", "default", tokens, types, scores)


def bpe_vocab(directory: Path, vocab_size: int | None, origin: str) -> Vocab:
    """llama.cpp's ``get_vocab_base`` + merges: a ``tokenizer.json`` byte-level BPE as ``gpt2``;
    a byte-fallback BPE (SentencePiece converted by transformers or by quantbench) as ``llama``,
    with scores that rank tokens in merge order."""
    tj = _read_json(directory / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise FormatError(f"{directory / 'tokenizer.json'}: tokenizer model {model.get('type')!r} is not supported "
                          "(byte-level BPE or a tokenizer.model SentencePiece file)")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    n = vocab_size or (max(vocab.values()) + 1)
    if max(vocab.values()) >= n:
        raise FormatError(f"{origin}: tokenizer has token id {max(vocab.values())} but vocab_size is {n}")
    rev = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(TT_UNUSED)
            continue
        t = rev[i]
        if t in added:
            if added[t].get("special") or _looks_special(t):
                types.append(TT_CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(TT_USER_DEFINED)
        else:
            types.append(TT_NORMAL)
        tokens.append(t)
    raw = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                                    for part in m) for m in raw]
    if model.get("byte_fallback"):
        # SentencePiece-style: llama.cpp merges by token score, so rank tokens by their first merge
        scores = [0.0] * n
        for rank, m in reversed(list(enumerate(merges))):
            a, _, b = m.partition(" ")
            j = vocab.get(a + b)
            if j is not None:
                scores[j] = -float(rank)
        for i, t in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                types[i] = TT_BYTE
            elif t == model.get("unk_token"):
                types[i] = TT_UNKNOWN
        return Vocab("llama", "default", tokens, types, scores)
    return Vocab("gpt2", detect_pre(directory, tj, origin), tokens, types, merges=merges)


def special_tokens(directory: Path, n_vocab: int) -> tuple[dict[str, int], dict[str, bool], Any]:
    """gguf-py's ``SpecialVocab``: ids of bos/eos/unk/sep/pad/cls/mask, add-BOS/EOS flags, chat template."""
    types = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    tj = _read_json(directory / "tokenizer.json") if (directory / "tokenizer.json").is_file() else None
    tc = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else None
    added = (tj or {}).get("added_tokens", [])

    def put(typ: str, tid: Any) -> None:
        if isinstance(tid, int) and 0 <= tid < n_vocab and typ not in ids:
            ids[typ] = tid

    def text(v: Any) -> str | None:
        return v if isinstance(v, str) else v.get("content") if isinstance(v, dict) else None

    if tj:
        bos, eos = text((tc or {}).get("bos_token")), text((tc or {}).get("eos_token"))
        pp = tj.get("post_processor") or {}
        for proc in pp.get("processors", [pp]) if pp else []:
            kind = proc.get("type")
            if kind == "ByteLevel":
                add.setdefault("bos", False)
                add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                add.update(bos=True, eos=True, sep=True)
            elif kind == "TemplateProcessing":
                single = proc.get("single", [])
                if len(single) > 1:
                    first = single[0].get("SpecialToken", {}).get("id")
                    last = single[-1].get("SpecialToken", {}).get("id")
                    if first:
                        if not tc:
                            bos = first
                        add["bos"] = first == bos
                    if last:
                        if not tc:
                            eos = last
                        add["eos"] = last == eos
    if tc:
        for typ in types:
            flag = tc.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in add:
                add[typ] = flag
            content = text(tc.get(f"{typ}_token"))
            if content is not None:
                put(typ, next((a.get("id") for a in added if a.get("content") == content), None))
    cfg = directory / "config.json"
    if cfg.is_file():
        c = _read_json(cfg)
        for typ in types:
            put(typ, c.get(f"{typ}_token_id", (c.get("text_config") or {}).get(f"{typ}_token_id")))
    template = None
    if tc is not None:
        alt = None
        if (directory / "chat_template.jinja").is_file():
            alt = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif (directory / "chat_template.json").is_file():
            alt = _read_json(directory / "chat_template.json").get("chat_template")
        template = tc.get("chat_template", alt)
    return ids, add, template


def tokenizer_metadata(m: Meta, directory: Path, arch: str, vocab_size: int, origin: str) -> Vocab:
    """Add ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` as llama.cpp's ``set_vocab`` would."""
    T = m.T
    tc = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    spm = (directory / "tokenizer.model").is_file()
    if arch in ("llama", "mistral", "mixtral") and tc.get("add_prefix_space") is not None:
        m.b("tokenizer.ggml.add_space_prefix", tc["add_prefix_space"])
    if spm and arch not in ("qwen3_moe",):
        v = spm_vocab(directory, vocab_size)
    elif (directory / "tokenizer.json").is_file():
        if arch == "gemma2":
            raise FormatError(f"{origin}: Gemma 2 conversion needs tokenizer.model (as llama.cpp's converter)")
        v = bpe_vocab(directory, vocab_size, origin)
    else:
        raise FormatError(f"{origin}: no tokenizer.model or tokenizer.json")
    m.s("tokenizer.ggml.model", v.model)
    m.s("tokenizer.ggml.pre", v.pre)
    m.arr("tokenizer.ggml.tokens", v.tokens, T.STRING)
    if v.scores is not None:
        m.arr("tokenizer.ggml.scores", v.scores, T.FLOAT32)
    m.arr("tokenizer.ggml.token_type", v.types, T.INT32)
    ids, add, template = special_tokens(directory, len(v.tokens))
    if v.merges:
        m.arr("tokenizer.ggml.merges", v.merges, T.STRING)
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
             "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}
    for typ, tid in ids.items():
        m.u32(f"tokenizer.ggml.{names[typ]}", tid)
    for typ, flag in add.items():
        if typ in ("bos", "eos", "sep"):
            m.b(f"tokenizer.ggml.add_{typ}_token", flag)
    if template is not None:
        if isinstance(template, list):
            for t in template:
                nm = t.get("name")
                m.s("tokenizer.chat_template" if nm == "default" else f"tokenizer.chat_template.{nm}", t["template"])
        else:
            m.s("tokenizer.chat_template", template)
    if arch in ("gemma2",) or (arch == "gemma3" and spm):
        m.b("tokenizer.ggml.add_space_prefix", False)
    return v


# ---------------------------------------------------------------------------------------------
# tensors


@dataclass
class Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order
    ggml: str
    produce: Callable[[], torch.Tensor]


def _resolve_outtype(outtype: str, model: SafetensorsModel) -> str:
    if outtype != "auto":
        if outtype not in OUTTYPES:
            raise InputValueError(f"outtype {outtype!r}: choose f32, f16, bf16 or auto")
        return outtype
    for n in model.names():
        info = model.info(n)
        if len(info.shape) < 2:
            continue
        if info.dtype == "BF16":
            return "bf16"
        if info.dtype == "F16":
            return "f16"
        break
    return "f16"


def _tensor_type(gguf_name: str, ndim: int, out: str) -> str:
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or ".ffn_gate_inp." in gguf_name \
            or not gguf_name.endswith(".weight"):
        return "F32"
    return OUTTYPES[out][0]


def _work(t: torch.Tensor) -> torch.Tensor:
    """llama.cpp keeps F16/F32 tensors as they are and makes everything else F32 before editing."""
    return t if t.dtype in (torch.float16, torch.float32) else t.float()


def tensor_plan(model: SafetensorsModel, args, mod, cfg: dict, out: str, n_vocab_real: int | None,
                origin: str) -> list[Planned]:
    table = gguf_names.block_table(args.sandwich_norm, args.fused_gate_up, args.moe_block_name)
    shifted = bool(getattr(mod, "GGUF_NORM_SHIFTED", False))
    plan: list[Planned] = []
    experts: dict[tuple[str, str], dict[int, str]] = {}
    n_exp = args.num_experts

    def gguf_name(hf: str) -> str:
        g = gguf_names.hf_to_gguf(hf, table)
        if g is None and args.moe_block_name != "mlp" and (".mlp.gate." in hf or ".mlp.experts." in hf):
            g = gguf_names.hf_to_gguf(hf.replace(".mlp.", f".{args.moe_block_name}.", 1), table)
        if g is None:
            raise FormatError(f"{origin}: cannot map tensor {hf!r} of a {args.arch} model to a GGUF name")
        return g

    def single(hf: str, load: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> None:
        g = gguf_name(hf)
        heads = None
        if mod.GGUF_PERMUTES_QK and hf.endswith(("q_proj.weight", "q_proj.bias")):
            heads = args.num_heads
        elif mod.GGUF_PERMUTES_QK and hf.endswith(("k_proj.weight", "k_proj.bias")):
            heads = args.num_kv_heads
        shift = shifted and hf.endswith("norm.weight")
        trim = n_vocab_real if (args.arch == "gemma3" and "embed_tokens.weight" in hf) else None
        if trim is not None:
            shape = (min(trim, shape[0]), *shape[1:])

        def produce() -> torch.Tensor:
            t = _work(load())
            if trim is not None:
                t = t[:trim]
            if heads is not None:
                t = gguf_names.permute_rows(t, heads)
            if shift:
                t = t + 1
            return t

        plan.append(Planned(g, tuple(shape), _tensor_type(g, len(shape), out), produce))

    for name in model.names():
        if name.endswith(_SKIP_SUFFIXES):
            continue
        info = model.info(name)
        hf = name.replace("language_model.", "") if "language_model." in name else name
        if args.arch == "gemma2" and hf == "lm_head.weight":
            continue  # llama.cpp's Gemma 2 converter drops it (the head is tied)
        m = _PER_EXPERT.match(hf)
        if m:
            which = _EXPERT_ALIAS.get(m.group(3), m.group(3))
            slot = experts.setdefault((m.group(1), which), {})
            slot[int(m.group(2))] = name
            if len(slot) == n_exp:
                names = [slot[e] for e in range(n_exp)]
                shp = (n_exp, *info.shape)
                single(f"{m.group(1)}.{which}.weight",
                       lambda names=names: torch.stack([_work(model.read(n)) for n in names]), shp)
            continue
        if hf.endswith((".experts.gate_up_proj", ".experts.gate_up_proj.weight")):
            base = hf[: hf.index(".experts.") + len(".experts")]
            E, two_ff, h = info.shape
            for k, which in enumerate(("gate_proj", "up_proj")):
                single(f"{base}.{which}.weight",
                       lambda name=name, k=k: model.read(name).chunk(2, dim=1)[k].contiguous(), (E, two_ff // 2, h))
            continue
        if hf.endswith(".experts.down_proj"):
            hf += ".weight"
        single(hf, lambda name=name: model.read(name), tuple(info.shape))
    left = {k: len(v) for k, v in experts.items() if len(v) != n_exp}
    if left:
        (prefix, which), got = next(iter(left.items()))
        raise FormatError(f"{origin}: expert weights {prefix}.N.{which}: found {got} of {n_exp} experts")
    return plan


def _as_bytes(t: torch.Tensor, ggml: str) -> np.ndarray:
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[ggml]
    return t.to(dt).contiguous().reshape(-1).view(torch.uint8).numpy()


def _real_vocab(directory: Path, vocab: Vocab) -> int:
    """Gemma 3's embedding rows kept by llama.cpp: the SentencePiece size, else the
    ``tokenizer.json`` vocabulary plus its added tokens."""
    if (directory / "tokenizer.model").is_file():
        return len(vocab.tokens)
    tj = _read_json(directory / "tokenizer.json")
    return len(tj["model"]["vocab"]) + len(tj.get("added_tokens", []))


def convert_hf_to_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], outtype: str = "auto",
                       name: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Write the GGUF llama.cpp's converter would write for the HF model dir ``src``; returns
    the number of tensors. The file appears at ``dst`` only when complete."""
    from quantbench.engine.loader import hf_args, read_hf_config
    from quantbench.engine.models import module_for_hf

    directory = Path(src)
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a model directory")
    origin = str(directory)
    cfg_full = read_hf_config(directory)
    cfg = {**_read_json(directory / "config.json"), **cfg_full}
    if cfg_full["model_type"] in ("llama", "mistral") and cfg.get("head_dim") is None:
        # llama.cpp reads hparams through transformers' AutoConfig, whose Llama/Mistral configs
        # always carry head_dim (hidden // heads), so its converter writes key/value_length
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    args = hf_args(directory, cfg_full)
    mod = module_for_hf(cfg_full["model_type"], origin)
    if args.arch not in GGUF_ARCH:
        raise FormatError(f"{origin}: no GGUF conversion for {args.arch}")
    with SafetensorsModel(directory) as model:
        out = _resolve_outtype(outtype, model)
        meta = hparams_metadata(cfg, args, args.arch, OUTTYPES[out][1], name or directory.name, origin)
        rp = _rope_params(cfg)
        full = rp.get("full_attention", rp)
        extra: list[tuple[str, torch.Tensor]] = []
        if GGUF_ARCH[args.arch] == "llama" and str(full.get("rope_type", "")).lower() == "llama3":
            extra.append(("rope_freqs.weight", llama3_rope_factors(full, cfg.get("head_dim") or args.hidden_size // args.num_heads)))
        if args.arch == "phi3":
            extra += phi3_longrope(cfg, rp, meta, origin)
        meta.u32("general.quantization_version", 2)
        vocab = tokenizer_metadata(meta, directory, args.arch, int(cfg["vocab_size"]), origin)
        plan = [Planned(n, tuple(t.shape), "F32", (lambda t=t: t)) for n, t in extra]
        plan += tensor_plan(model, args, mod, cfg, out, _real_vocab(directory, vocab), origin)
        seen: set[str] = set()
        for p in plan:
            if p.name in seen:
                raise FormatError(f"{origin}: two tensors map to GGUF name {p.name}")
            seen.add(p.name)
        with GGUFStreamWriter(dst, GGUF_ARCH[args.arch]) as w:
            for k, kv in meta.items.items():
                w.add_kv(k, kv)
            for p in plan:
                w.add_tensor(p.name, p.shape, p.ggml)
            for i, p in enumerate(plan):
                t = p.produce()
                if tuple(t.shape) != p.shape:
                    raise FormatError(f"{origin}: tensor {p.name} has shape {list(t.shape)}, expected {list(p.shape)}")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise InputValueError(f"{origin}: tensor {p.name} contains NaN or inf values")
                w.write_tensor(p.name, _as_bytes(t, p.ggml))
                if progress:
                    progress(p.name, i + 1, len(plan))
    return len(plan)
