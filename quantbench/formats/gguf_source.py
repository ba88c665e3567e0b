"""A GGUF file seen as a Hugging Face checkpoint: ``config.json``, tensors under HF names, tokenizer.

Why: converting GGUF → HF directory and quantizing a GGUF to UQFF both need the model the way
transformers/mistral.rs see it. The engine already parses GGUF metadata into ``ModelArgs`` and
maps tensor names; this module turns those back into a ``config.json`` and undoes what
llama.cpp's converter did to the tensors (Q/K row permutation of the Llama family, the ``+1`` on
Gemma norm weights, stacked experts), one tensor at a time so memory stays bounded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from quantbench.engine import gguf_names
from quantbench.errors import FormatError, InputValueError
from quantbench.formats.gguf import GGUFFile, GGUFTensor, read_gguf

FLOAT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# engine arch -> (HF model_type, HF architectures class)
HF_CLASSES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
}
# per-expert names in HF checkpoints (transformers 4 layout, which v5 still loads)
EXPERT_NAMES = {
    "mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
    "qwen3_moe": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
}


def open_gguf(src: str | os.PathLike[str] | GGUFFile) -> GGUFFile:
    return src if isinstance(src, GGUFFile) else read_gguf(src)


def _args(gf: GGUFFile):
    from quantbench.engine.loader import gguf_args

    return gguf_args(gf)


def _meta(gf: GGUFFile, key: str, default: Any = None) -> Any:
    kv = gf.metadata.get(key)
    return default if kv is None else kv.value


def _token_id(gf: GGUFFile, what: str) -> int | None:
    v = _meta(gf, f"tokenizer.ggml.{what}_token_id")
    if v is None or int(v) in (-1, 0xFFFFFFFF):
        return None
    return int(v)


# ---------------------------------------------------------------------------------------------
# config.json


def llama3_rope_from_factors(factors: torch.Tensor, head_dim: int, theta: float, origin: str) -> dict:
    """Recover HF's ``llama3`` rope_scaling from llama.cpp's ``rope_freqs`` tensor.

    The factors depend on (old_ctx, low, high) only through a = old_ctx/(high-low) and
    b = low/(high-low) (plus ``factor``), so any triple with the same a, b is the same model: we
    fit a, b on the smoothly interpolated entries, take low = 1, and check that the formula
    reproduces every factor before trusting it.
    """
    f = factors.double().reshape(-1)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    factor = float(f.max())
    smooth = (f > 1 + 1e-6) & (f < factor - 1e-6 * factor)
    candidates: list[tuple[float, float, float]] = []
    if int(smooth.sum()) >= 2:
        # 1/f = (1-s)/factor + s  ->  s = (1/f - 1/factor) / (1 - 1/factor); s = a/wavelen - b
        s = (1 / f[smooth] - 1 / factor) / (1 - 1 / factor)
        x = 1 / wavelen[smooth]
        A = torch.stack([x, -torch.ones_like(x)], dim=1)
        a, b = torch.linalg.lstsq(A, s.unsqueeze(1)).solution.reshape(-1).tolist()
        if b > 0:
            low = 1.0
            high = round(1.0 + 1.0 / b, 4)
            candidates.append((float(round(a * (high - low))), low, high))
    # fewer than two smooth entries cannot pin (a, b): assume Llama 3's low=1, high=4 and solve
    # the context length from a smooth entry, or try powers of two
    if int(smooth.sum()) >= 1:
        i = int(torch.nonzero(smooth)[0])
        s1 = (1 / float(f[i]) - 1 / factor) / (1 - 1 / factor)
        candidates.append((float(round(float(wavelen[i]) * (3 * s1 + 1))), 1.0, 4.0))
    candidates += [(float(2 ** k), 1.0, 4.0) for k in range(4, 18)]
    for old, low, high in candidates:
        want = _llama3_factors(wavelen, factor, low, high, old)
        if torch.allclose(want, f, rtol=1e-5, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": int(round(old))}
    raise FormatError(f"{origin}: rope_freqs.weight does not follow Llama 3 rope scaling; cannot write a HF config for it")


def _llama3_factors(wavelen: torch.Tensor, factor: float, low: float, high: float, old: float) -> torch.Tensor:
    lo_w, hi_w = old / low, old / high
    s = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - s) / factor + s)
    return torch.where(wavelen < hi_w, torch.ones_like(wavelen), torch.where(wavelen > lo_w, torch.full_like(wavelen, factor), mid))


def hf_config_from_gguf(src: str | os.PathLike[str] | GGUFFile, dtype: str | None = None) -> dict:
    """A ``config.json`` dict transformers (and the engine) accept for the GGUF's model.

    ``dtype`` is the ``torch_dtype`` to declare (``f32``/``bf16``/``f16``); by default the one
    :func:`default_dtype` picks.
    """
    gf = open_gguf(src)
    args, mod = _args(gf)
    origin = str(gf.path)
    model_type, cls = HF_CLASSES[args.arch]
    embd = next((t for t in gf.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise FormatError(f"{origin}: no token_embd.weight tensor")
    dt = FLOAT_DTYPES[dtype] if dtype else default_dtype(gf)
    cfg: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "vocab_size": int(embd.shape[0]),
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": bool(args.tie_word_embeddings),
        "hidden_act": args.hidden_act,
        "torch_dtype": TORCH_DTYPE_NAMES[dt],
    }
    if f"{gf.architecture}.attention.key_length" in gf.metadata or args.head_dim * args.num_heads != args.hidden_size:
        cfg["head_dim"] = args.head_dim
    for what in ("bos", "eos", "pad"):
        i = _token_id(gf, what)
        if i is not None:
            cfg[f"{what}_token_id"] = i
    rope = _hf_rope_scaling(gf, args)
    if rope is not None:
        cfg["rope_scaling"] = rope
    _arch_keys(cfg, args, gf)
    return cfg


def _hf_rope_scaling(gf: GGUFFile, args) -> dict | None:
    if args.rope_freq_factors is not None:
        return llama3_rope_from_factors(torch.as_tensor(args.rope_freq_factors), args.head_dim, args.rope_theta,
                                        str(gf.path))
    rs = args.rope_scaling
    if rs is None:
        return None
    if rs.get("rope_type") == "longrope":
        out = {"rope_type": "longrope", "long_factor": list(rs["long_factor"]), "short_factor": list(rs["short_factor"])}
        return out
    if rs.get("rope_type") == "linear":
        return {"rope_type": "linear", "factor": float(rs["factor"])}
    raise FormatError(f"{gf.path}: rope scaling {rs.get('rope_type')!r} has no HF config equivalent here")


def _arch_keys(cfg: dict, args, gf: GGUFFile) -> None:
    arch = args.arch
    if arch in ("llama", "mistral", "mixtral"):
        if args.sliding_window and arch == "llama":
            cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
        if args.sliding_window:
            cfg["sliding_window"] = int(args.sliding_window)
        if arch == "llama" and not args.sliding_window:
            cfg["attention_bias"] = bool(args.qkv_bias)
            cfg["mlp_bias"] = bool(args.mlp_bias)
            if args.qkv_bias != args.o_bias:
                raise FormatError(f"{gf.path}: q/k/v biases without an output bias cannot be expressed in a Llama config")
        elif args.qkv_bias or args.o_bias:
            raise FormatError(f"{gf.path}: attention biases are not supported by the {cfg['model_type']} HF config")
        if args.num_experts:
            cfg["num_local_experts"] = args.num_experts
            cfg["num_experts_per_tok"] = args.experts_per_tok
    elif arch == "qwen2":
        cfg["use_sliding_window"] = False
    elif arch == "qwen3":
        cfg["attention_bias"] = bool(args.qkv_bias)
        cfg["use_sliding_window"] = False
    elif arch == "qwen3_moe":
        cfg.update(num_experts=args.num_experts, num_experts_per_tok=args.experts_per_tok,
                   moe_intermediate_size=args.moe_intermediate_size, norm_topk_prob=bool(args.norm_topk_prob),
                   decoder_sparse_step=1, use_sliding_window=False,
                   mlp_only_layers=[i for i in range(args.num_layers) if not args.is_moe(i)])
    elif arch in ("gemma2", "gemma3"):
        cfg["hidden_activation"] = args.hidden_act
        cfg["query_pre_attn_scalar"] = args.query_pre_attn_scalar or args.head_dim
        cfg["final_logit_softcapping"] = args.final_softcap
        cfg["attention_bias"] = False
        if arch == "gemma2":
            cfg["attn_logit_softcapping"] = args.attn_softcap
        else:
            cfg["rope_local_base_freq"] = args.rope_local_theta if args.rope_local_theta is not None else 10000.0
        cfg["sliding_window"] = int(args.sliding_window) if args.sliding_window else None
        cfg["layer_types"] = [("sliding_attention" if args.is_sliding(i) else "full_attention")
                              for i in range(args.num_layers)]
    elif arch == "phi3":
        cfg["sliding_window"] = int(args.sliding_window) if args.sliding_window else None
        orig = _meta(gf, "phi3.rope.scaling.original_context_length")
        if args.rope_scaling is not None:
            orig = args.rope_scaling["original_max_position_embeddings"]
        if orig is not None:
            cfg["original_max_position_embeddings"] = int(orig)


def default_dtype(gf: GGUFFile) -> torch.dtype:
    """The float type a dequantized checkpoint is written in: the GGUF's own when every matrix
    is F16 (or BF16), else float32, which holds every quantized value exactly."""
    kinds = {t.ggml_type for t in gf.tensors if len(t.shape) >= 2}
    if kinds == {"F16"}:
        return torch.float16
    if kinds == {"BF16"}:
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# tensors


@dataclass
class HFTensor:
    """One tensor of the HF checkpoint: its name, shape and a loader reading it from the GGUF."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def hf_tensor_plan(src: str | os.PathLike[str] | GGUFFile, per_expert: bool = True) -> list[HFTensor]:
    """Every HF tensor the GGUF holds, in file order, as lazy loaders of float32 values.

    ``per_expert``: split stacked experts into the per-expert names HF checkpoints use (each
    loader then reads only its expert's rows); otherwise keep the engine's ``[E, out, in]`` stacks.
    """
    gf = open_gguf(src)
    args, mod = _args(gf)
    shifted = bool(getattr(mod, "GGUF_NORM_SHIFTED", False))
    plan: list[HFTensor] = []
    for t, hf in gguf_names.model_tensors(gf, args):
        heads = gguf_names.permuted_heads(hf, args.num_heads, args.num_kv_heads, mod.GGUF_PERMUTES_QK)
        shift = shifted and hf.endswith("norm.weight")
        if per_expert and ".experts." in hf and len(t.shape) == 3:
            E, rows = t.shape[0], t.shape[1]
            which = hf.rsplit(".", 2)[-2]  # gate_proj | up_proj | down_proj
            prefix = hf[: hf.index(".experts.") + len(".experts")]
            alias = EXPERT_NAMES.get(args.arch, EXPERT_NAMES["qwen3_moe"])[which]
            for e in range(E):
                plan.append(HFTensor(f"{prefix}.{e}.{alias}.weight", (rows, t.shape[2]),
                                     _loader(t, e * rows, (e + 1) * rows, (rows, t.shape[2]), None, False)))
            continue
        plan.append(HFTensor(hf, tuple(t.shape), _loader(t, 0, t.nrows, tuple(t.shape), heads, shift)))
    return plan


def _loader(t: GGUFTensor, start: int, stop: int, shape: tuple[int, ...], heads: int | None,
            shift: bool) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        x = t.float_rows(start, stop).reshape(shape)
        if heads is not None:
            x = gguf_names.unpermute_rows(x, heads)
        if shift:
            x = x - 1.0  # llama.cpp's converter stores Gemma's (1 + w)
        return x

    return load


def iter_hf_tensors(src: str | os.PathLike[str] | GGUFFile, dequantize: bool = True,
                    per_expert: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, float32 tensor), one at a time.

    Only ``dequantize=True`` exists: a HF checkpoint holds float tensors (packed GGML blocks
    go through :func:`quantbench.engine.loader.gguf_items` instead).
    """
    if not dequantize:
        raise InputValueError("iter_hf_tensors yields float tensors; use engine.loader.gguf_items for packed ones")
    for h in hf_tensor_plan(src, per_expert=per_expert):
        yield h.name, h.load()


# ---------------------------------------------------------------------------------------------
# tokenizer and generation config


def write_tokenizer_files(src: str | os.PathLike[str] | GGUFFile, directory: str | os.PathLike[str]) -> list[Path]:
    """``tokenizer.json`` + ``tokenizer_config.json`` rebuilt from ``tokenizer.ggml.*`` (ids equal
    llama.cpp's), written into ``directory``; for a SentencePiece (``llama``) vocabulary also a
    ``tokenizer.model`` carrying the exact pieces, scores and types, which llama.cpp's converter
    (and transformers' slow tokenizer) read."""
    from quantbench.engine.tokenizer import Tokenizer

    gf = open_gguf(src)
    files = Tokenizer.from_gguf(gf).to_hf_files(directory)
    if _meta(gf, "tokenizer.ggml.model") == "llama":
        files.append(write_spm_model(gf, Path(directory) / "tokenizer.model"))
    return files


def write_spm_model(gf: GGUFFile, path: Path) -> Path:
    """A SentencePiece ``ModelProto`` (BPE, byte fallback) from the GGUF's pieces/scores/types.

    SentencePiece's piece types use llama.cpp's numbering (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte), so they copy over as they are.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    from quantbench.formats.atomic import atomic_output

    tokens = [str(t) for t in _meta(gf, "tokenizer.ggml.tokens")]
    scores = _meta(gf, "tokenizer.ggml.scores")
    types = _meta(gf, "tokenizer.ggml.token_type")
    if scores is None or types is None or len(scores) < len(tokens) or len(types) < len(tokens):
        raise FormatError(f"{gf.path}: a SentencePiece vocabulary needs scores and token types for every token")
    m = pb.ModelProto()
    for t, sc, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, float(sc), int(ty)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(int(x) == 6 for x in types)
    for field_name, key in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        setattr(ts, field_name, -1 if _token_id(gf, key) is None else _token_id(gf, key))
    if ts.unk_id < 0:
        ts.unk_id = next((i for i, ty in enumerate(types) if int(ty) == 2), 0)
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(_meta(gf, "tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    with atomic_output(path) as tmp:
        tmp.write_bytes(m.SerializeToString())
    return path


def generation_config_from_gguf(src: str | os.PathLike[str] | GGUFFile) -> dict:
    """bos/eos/pad ids; end-of-turn/message ids join eos as transformers lists several."""
    gf = open_gguf(src)
    out: dict[str, Any] = {"_from_model_config": False}
    bos, eos, pad = _token_id(gf, "bos"), _token_id(gf, "eos"), _token_id(gf, "pad")
    extra = [i for i in (_token_id(gf, "eot"), _token_id(gf, "eom")) if i is not None and i != eos]
    if bos is not None:
        out["bos_token_id"] = bos
    if eos is not None:
        out["eos_token_id"] = [eos, *extra] if extra else eos
    if pad is not None:
        out["pad_token_id"] = pad
    return out
