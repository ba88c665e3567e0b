"""Which GGML type ``llama-quantize`` gives every tensor of a GGUF for a given ftype.

A port of llama.cpp's ``src/llama-quant.cpp`` type selection (``llama_tensor_get_type`` and its
helpers) at the version quantbench matches. The point is that a quantbench ``Q4_K_M`` file holds
exactly the same per-tensor types as ``llama-quantize model.gguf out.gguf Q4_K_M`` would write,
so the rules below are kept literal, quirks included (see the comments marked "quirk").

The decision for some tensors depends on counters that advance as earlier tensors are visited
(``attn_v`` index, ``ffn_down`` index), so tensors are visited in llama.cpp's loader order: by
layer number (tensors outside ``blk.N.`` first), then by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from quantbench.errors import FormatError, ImatrixError, ShapeError, UnknownTypeError

# ---------------------------------------------------------------------------------------------
# GGML types: block sizes (ggml.c type_traits) and whether ggml calls them quantized.
# ---------------------------------------------------------------------------------------------

_QK_K = 256

BLOCK_SIZES: dict[str, int] = {
    "F32": 1, "F16": 1, "BF16": 1, "F64": 1, "I8": 1, "I16": 1, "I32": 1, "I64": 1,
    "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q8_1": 32,
    "Q1_0": 128, "Q2_0": 64, "MXFP4": 32, "NVFP4": 64, "IQ4_NL": 32,
    "Q2_K": _QK_K, "Q3_K": _QK_K, "Q4_K": _QK_K, "Q5_K": _QK_K, "Q6_K": _QK_K, "Q8_K": _QK_K,
    "IQ2_XXS": _QK_K, "IQ2_XS": _QK_K, "IQ2_S": _QK_K, "IQ3_XXS": _QK_K, "IQ3_S": _QK_K,
    "IQ1_S": _QK_K, "IQ1_M": _QK_K, "IQ4_XS": _QK_K, "TQ1_0": _QK_K, "TQ2_0": _QK_K,
}

_NOT_QUANTIZED = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


def is_quantized(ggml_type: str) -> bool:
    """ggml's ``is_quantized`` trait: block types yes, plain floats and ints no."""
    return _type_name(ggml_type) not in _NOT_QUANTIZED


def _type_name(name: str) -> str:
    key = str(name).upper()
    if key not in BLOCK_SIZES:
        raise UnknownTypeError(f"unknown GGML type {name!r}; known: {', '.join(sorted(BLOCK_SIZES))}")
    return key


# ---------------------------------------------------------------------------------------------
# ftypes: llama.h's LLAMA_FTYPE ids (written as general.file_type) and their default tensor type.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FType:
    """One ``llama-quantize`` file type."""

    name: str
    file_type: int  # LLAMA_FTYPE_* value, stored in the output's ``general.file_type``
    default_type: str  # llama_ftype_get_default_type


FTYPES: dict[str, FType] = {
    f.name: f
    for f in (
        FType("F32", 0, "F32"),
        FType("F16", 1, "F16"),
        FType("Q4_0", 2, "Q4_0"),
        FType("Q4_1", 3, "Q4_1"),
        FType("Q8_0", 7, "Q8_0"),
        FType("Q5_0", 8, "Q5_0"),
        FType("Q5_1", 9, "Q5_1"),
        FType("Q2_K", 10, "Q2_K"),
        FType("Q3_K_S", 11, "Q3_K"),
        FType("Q3_K_M", 12, "Q3_K"),
        FType("Q3_K_L", 13, "Q3_K"),
        FType("Q4_K_S", 14, "Q4_K"),
        FType("Q4_K_M", 15, "Q4_K"),
        FType("Q5_K_S", 16, "Q5_K"),
        FType("Q5_K_M", 17, "Q5_K"),
        FType("Q6_K", 18, "Q6_K"),
        FType("IQ2_XXS", 19, "IQ2_XXS"),
        FType("IQ2_XS", 20, "IQ2_XS"),
        FType("Q2_K_S", 21, "Q2_K"),
        FType("IQ3_XS", 22, "IQ3_S"),
        FType("IQ3_XXS", 23, "IQ3_XXS"),
        FType("IQ1_S", 24, "IQ1_S"),
        FType("IQ4_NL", 25, "IQ4_NL"),
        FType("IQ3_S", 26, "IQ3_S"),
        FType("IQ3_M", 27, "IQ3_S"),
        FType("IQ2_S", 28, "IQ2_XS"),  # quirk: IQ2_S files default to IQ2_XS tensors
        FType("IQ2_M", 29, "IQ2_S"),
        FType("IQ4_XS", 30, "IQ4_XS"),
        FType("IQ1_M", 31, "IQ1_M"),
        FType("BF16", 32, "BF16"),
        FType("TQ1_0", 36, "TQ1_0"),
        FType("TQ2_0", 37, "TQ2_0"),
        FType("MXFP4_MOE", 38, "MXFP4"),
        FType("Q1_0", 40, "Q1_0"),
        FType("Q2_0", 41, "Q2_0"),
    )
}

# llama-quantize's command-line aliases.
FTYPE_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def get_ftype(ftype: str | int) -> FType:
    """Look up an ftype by name (any case, aliases allowed) or by its LLAMA_FTYPE id (as
    llama-quantize does, a numeric string counts as an id)."""
    if isinstance(ftype, str) and ftype.strip().isdigit():
        ftype = int(ftype.strip())
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        for f in FTYPES.values():
            if f.file_type == ftype:
                return f
    else:
        key = str(ftype).strip().upper()
        key = FTYPE_ALIASES.get(key, key)
        if key in FTYPES:
            return FTYPES[key]
    names = sorted(FTYPES) + sorted(FTYPE_ALIASES)
    raise UnknownTypeError(f"unknown ftype {ftype!r}; valid: {', '.join(names)}")


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the GGUF header describes it; ``shape`` is in ggml ``ne`` order (row length first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str


@dataclass(frozen=True)
class TensorPlan:
    """What llama-quantize does with one tensor.

    ``quantized`` is llama.cpp's main-loop ``quantize`` flag: the data is rewritten as
    ``target_type``. When False the tensor is copied untouched and ``target_type`` equals the
    source type. ``fallback`` marks the tensors counted in llama.cpp's ``n_fallback``.
    """

    name: str
    target_type: str
    quantized: bool
    reason: str
    fallback: bool = False


def n_fallback(plans: Iterable[TensorPlan]) -> int:
    """llama.cpp's ``qs.n_fallback``: tensors whose row length did not fit the chosen type."""
    return sum(1 for p in plans if p.fallback)


# ---------------------------------------------------------------------------------------------
# Model hyper-parameters that the rules read (llama_model::load_hparams, the parts that matter)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HParams:
    n_layer_all: int
    n_expert: int
    n_head: int  # layer 0
    n_head_kv: int  # layer 0
    is_70b: bool

    @property
    def n_gqa(self) -> int:
        return 0 if self.n_head_kv == 0 else self.n_head // self.n_head_kv


def _meta_int(metadata: Mapping[str, Any], key: str, default: int | None) -> int | None:
    if key not in metadata:
        return default
    v = metadata[key]
    if isinstance(v, (list, tuple)):
        # per-layer arrays (get_key_or_arr); the quantizer only ever asks for layer 0
        if not v:
            raise FormatError(f"metadata key {key} is an empty array")
        v = v[0]
    try:
        return int(v)
    except (TypeError, ValueError) as e:
        raise FormatError(f"metadata key {key} is not an integer: {v!r}") from e


def _hparams(arch: str, metadata: Mapping[str, Any]) -> _HParams:
    n_layer_all = _meta_int(metadata, f"{arch}.block_count", None)
    if n_layer_all is None:
        raise FormatError(f"metadata lacks {arch}.block_count, which llama-quantize requires")
    n_nextn = _meta_int(metadata, f"{arch}.nextn_predict_layers", 0) or 0
    n_expert = _meta_int(metadata, f"{arch}.expert_count", 0) or 0
    if arch in ("hunyuan_vl", "hunyuan-dense") and n_expert <= 1:
        n_expert = 0
    n_head = _meta_int(metadata, f"{arch}.attention.head_count", 0) or 0
    n_head_kv = _meta_int(metadata, f"{arch}.attention.head_count_kv", n_head)
    assert n_head_kv is not None
    n_layer = n_layer_all - n_nextn
    # llm_type detection: LLM_TYPE_70B is the only size the quantizer looks at
    if arch == "llama":
        is_70b = n_expert != 8 and n_layer == 80 and n_head != n_head_kv
    elif arch in ("qwen2", "deci", "olmo"):
        is_70b = n_layer == 80
    elif arch == "jais2":
        is_70b = n_layer == 68
    else:
        is_70b = False
    return _HParams(n_layer_all, n_expert, n_head, n_head_kv, is_70b)


# ---------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------

_BLK = re.compile(r"blk\.[ \t\n\v\f\r]*([+-]?[0-9]+)")  # sscanf(name, "blk.%d.", ...)


def _layer_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def loader_order_key(name: str) -> tuple[int, bytes]:
    """llama_model_loader's weight_name_comparer: layer number (-1 outside blocks), then name.

    llama-quantize visits and writes tensors in this order, so its counters and its output
    files follow it."""
    layer = _layer_of(name)
    return (-1 if layer is None else layer, name.encode("utf-8"))


OUTPUT, TOKEN_EMBD, ATTN_Q, ATTN_V, ATTN_K, ATTN_QKV, ATTN_KV_B, ATTN_OUTPUT = (
    "output", "token_embd", "attn_q", "attn_v", "attn_k", "attn_qkv", "attn_kv_b", "attn_output")
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "ffn_up", "ffn_gate", "ffn_down", "other"


def _category(name: str) -> str:
    """tensor_get_category: first match wins, substring tests as in llama.cpp."""
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for needle, cat in (
        ("attn_qkv.weight", ATTN_QKV),
        ("attn_kv_b.weight", ATTN_KV_B),
        ("attn_v.weight", ATTN_V),
        ("attn_k.weight", ATTN_K),
        ("attn_q.weight", ATTN_Q),
        ("attn_output.weight", ATTN_OUTPUT),
        ("ffn_up", FFN_UP),
        ("ffn_gate", FFN_GATE),
        ("ffn_down", FFN_DOWN),
    ):
        if needle in name:
            return cat
    return OTHER


def _is_attn_v_like(cat: str) -> bool:
    return cat in (ATTN_V, ATTN_QKV, ATTN_KV_B)


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


_NEVER_SUBSTRINGS: tuple[tuple[str, str], ...] = (
    ("_norm.weight", "norm"),
    ("ffn_gate_inp.weight", "expert gating"),
    ("ffn_gate_tid2eid.weight", "token-to-expert table"),
    ("altup", "altup (tiny)"),
    ("laurel", "laurel (tiny)"),
    ("per_layer_model_proj", "per_layer_model_proj"),
)
_NEVER_SUBSTRINGS_2: tuple[tuple[str, str], ...] = (
    ("ssm_conv1d", "conv1d"),
    ("shortconv.conv.weight", "conv1d"),
    ("indexer.k_proj.weight", "indexer projection"),
    ("indexer.q_proj.weight", "indexer projection"),
)
_GLM5_NEXT_SUBSTRINGS = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
    "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
    "attn_v_b.weight",
)
_RWKV_SUBSTRINGS = tuple(
    f"time_mix_{s}.weight"
    for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
              "decay_w1", "decay_w2", "lerp_fused")
)
_MULTIMODAL_SUBSTRINGS = (
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)


def _why_not_quantizable(spec: TensorSpec, arch: str, quantize_output_tensor: bool) -> str | None:
    """tensor_allows_quantization, returning the first rule that keeps the tensor as it is."""
    name = spec.name
    if _n_dims(spec.shape) < 2:
        return "1-D tensor"
    # quirk: llama.cpp tests rfind("weight") == size() - 6 in size_t; for a 5-character name
    # both sides are npos, so such a name counts as ending in "weight"
    if not (name.endswith("weight") or len(name) == 5):
        return "name does not end in 'weight'"
    for needle, why in _NEVER_SUBSTRINGS:
        if needle in name:
            return why
    if not quantize_output_tensor and name == "output.weight":
        return "output.weight left as is (--leave-output-tensor)"
    if name in ("position_embd.weight", "token_types.weight"):
        return "position / token-type embedding"
    for needle, why in _NEVER_SUBSTRINGS_2:
        if needle in name:
            return why
    if arch == "glm5-next":
        for needle in _GLM5_NEXT_SUBSTRINGS:
            if needle in name:
                return f"glm5-next {needle}"
    for needle in _RWKV_SUBSTRINGS:
        if needle in name:
            return "RWKV small 2-D weight"
    if "attn_rel_b.weight" in name:
        return "relative position bias"
    for needle in _MULTIMODAL_SUBSTRINGS:
        if needle in name:
            return f"multimodal {needle}"
    return None


# ---------------------------------------------------------------------------------------------
# The mixture rules
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _cmod(a: int, b: int) -> int:
    return a - b * _cdiv(a, b)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (
        i_layer < _cdiv(n_layers, 8)
        or i_layer >= _cdiv(7 * n_layers, 8)
        or _cmod(i_layer - _cdiv(n_layers, 8), 3) == 2
    )


_IQ_LOW = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})


@dataclass
class _State:
    """quantize_state_impl: counters advanced as tensors are visited in loader order."""

    arch: str
    hp: _HParams
    has_imatrix: bool
    has_tied_embeddings: bool
    n_attention_wv: int
    output_tensor_type: str | None
    token_embedding_type: str | None
    overrides: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    @property
    def n_ffn(self) -> int:
        return self.hp.n_layer_all


def _layer_info(st: _State, counter: int, name: str) -> tuple[int, int]:
    """Layer index of an FFN tensor: its visiting order, or for MoE models its ``blk.N`` name."""
    n_layer = st.n_ffn
    if max(1, st.hp.n_expert) > 1:
        i_layer = _layer_of(name)
        if i_layer is None:
            raise FormatError(f"Failed to determine layer for tensor {name}")
        if i_layer < 0 or i_layer >= n_layer:
            raise FormatError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
        return i_layer, n_layer
    return counter, n_layer


def _mixture(st: _State, new_type: str, spec: TensorSpec, ftype: str, cat: str) -> tuple[str, str]:
    """llama_tensor_get_type_impl: the type the ftype's mixture picks, and why."""
    name, arch, hp = spec.name, st.arch, st.hp
    default = (new_type, "ftype default")

    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new_type not in ("F32", "BF16", "F16"):
            return "Q8_0", "glm5-next: attention q / eh_proj kept at Q8_0"

    if cat == OUTPUT or (st.has_tied_embeddings and cat == TOKEN_EMBD):
        what = "output" if cat == OUTPUT else "token_embd tied to output"
        if st.output_tensor_type is not None:
            return st.output_tensor_type, f"{what}: --output-tensor-type"
        nx = spec.shape[0]
        qk = BLOCK_SIZES[new_type]
        if ftype == "MXFP4_MOE":
            return "Q8_0", f"{what}: MXFP4_MOE"
        if arch == "falcon":
            return "Q8_0", f"{what}: falcon"
        if nx % qk != 0:
            return "Q8_0", f"{what}: {nx} % {qk} != 0"
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K", f"{what}: low-bit IQ ftype"
        if new_type != "Q8_0":
            return "Q6_K", what
        return new_type, f"{what}: already Q8_0"

    if ftype == "MXFP4_MOE":
        # experts (3-D) -> MXFP4, everything else -> Q8_0
        is_bailing_expert = arch == "bailingmoe3" and cat in (FFN_UP, FFN_GATE, FFN_DOWN)
        ne2 = spec.shape[2] if len(spec.shape) > 2 else 1
        if ne2 > 1 and (arch != "bailingmoe3" or is_bailing_expert):
            return "MXFP4", "MXFP4_MOE: expert tensor"
        return "Q8_0", "MXFP4_MOE: non-expert tensor"

    if cat == TOKEN_EMBD:
        if st.token_embedding_type is not None:
            return st.token_embedding_type, "--token-embedding-type"
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K", "token_embd: low-bit IQ ftype"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S", "token_embd: low-bit IQ ftype"
        if ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            return "Q4_K", "token_embd: ternary / Q2_0 ftype"
        return default

    if ftype in _IQ_LOW:
        iq2s_m = ftype in ("IQ2_S", "IQ2_M")
        if _is_attn_v_like(cat):
            if hp.n_gqa >= 4 or hp.n_expert >= 4:
                out = ("Q4_K", "attn_v: n_gqa >= 4 or n_expert >= 4")
            else:
                out = ("IQ3_S" if iq2s_m else "Q2_K", "attn_v: low-bit IQ ftype")
            st.i_attention_wv += 1
            return out
        if hp.n_expert == 8 and cat == ATTN_K:
            return "Q4_K", "attn_k: 8 experts"
        if cat == FFN_DOWN:
            out = default
            if st.i_ffn_down < _cdiv(st.n_ffn, 8):
                out = ("IQ3_S" if iq2s_m else "Q2_K", f"ffn_down: first {_cdiv(st.n_ffn, 8)} layers")
            st.i_ffn_down += 1
            return out
        if cat == ATTN_OUTPUT:
            if hp.n_expert == 8:
                return "Q5_K", "attn_output: 8 experts"
            if ftype in ("IQ1_S", "IQ1_M"):
                return "IQ2_XXS", "attn_output: IQ1 ftype"
            if iq2s_m:
                return "IQ3_S", "attn_output: IQ2_S/IQ2_M ftype"
        return default

    if _is_attn_v_like(cat):
        gqa4 = hp.n_gqa >= 4
        out = default
        i, n = st.i_attention_wv, st.n_attention_wv
        if ftype == "Q2_K":
            out = ("Q4_K", "attn_v: n_gqa >= 4") if gqa4 else ("Q3_K", "attn_v: Q2_K")
        elif ftype == "Q2_K_S" and gqa4:
            out = ("Q4_K", "attn_v: n_gqa >= 4")
        elif ftype == "IQ3_XXS":
            if gqa4:
                out = ("Q4_K", "attn_v: n_gqa >= 4")
            elif not st.has_imatrix:
                out = ("IQ3_S", "attn_v: IQ3_XXS without imatrix")
            else:
                out = ("IQ3_XXS", "attn_v: IQ3_XXS with imatrix")
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa4:
            out = ("Q4_K", "attn_v: n_gqa >= 4")
        elif ftype == "IQ3_M":
            out = ("Q4_K", "attn_v: IQ3_M")
        elif ftype == "Q3_K_M":
            out = ("Q5_K", "attn_v: first 2") if i < 2 else ("Q4_K", "attn_v: Q3_K_M")
        elif ftype == "Q3_K_L":
            out = ("Q5_K", "attn_v: Q3_K_L")
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa4:
            out = ("Q5_K", "attn_v: n_gqa >= 4")
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            out = ("Q6_K", f"use_more_bits (attn_v {i} of {n})")
        elif ftype == "Q4_K_S" and i < 4:
            out = ("Q5_K", "attn_v: first 4")
        if hp.is_70b and out[0] in ("Q3_K", "Q4_K"):
            out = ("Q5_K", "attn_v: 70B model")
        if hp.n_expert == 8:
            out = ("Q8_0", "attn_v: 8 experts")
        st.i_attention_wv += 1
        return out

    if cat == ATTN_K:
        if hp.n_expert == 8:
            return "Q8_0", "attn_k: 8 experts"
        if ftype == "IQ3_XS":
            return "IQ3_XXS", "attn_k: IQ3_XS"
        if ftype == "IQ3_XXS":
            return "IQ2_S", "attn_k: IQ3_XXS"
        return default

    if cat == ATTN_Q:
        if ftype == "IQ3_XS":
            return "IQ3_XXS", "attn_q: IQ3_XS"
        if ftype == "IQ3_XXS":
            return "IQ2_S", "attn_q: IQ3_XXS"
        return default

    if cat == FFN_DOWN:
        i_layer, n_layer = _layer_info(st, st.i_ffn_down, name)
        n8, n16 = _cdiv(n_layer, 8), _cdiv(n_layer, 16)
        falcon = arch == "falcon"
        umb = _use_more_bits(i_layer, n_layer)
        umb_why = f"use_more_bits (ffn_down layer {i_layer} of {n_layer})"
        out = default
        if ftype == "Q2_K":
            out = ("Q3_K", "ffn_down: Q2_K")
        elif ftype == "Q2_K_S":
            if i_layer < n8:
                out = ("Q4_K", f"ffn_down: first {n8} layers")
        elif ftype == "IQ3_XXS" and not st.has_imatrix:
            out = ("Q4_K", f"ffn_down: first {n8} layers") if i_layer < n8 else (
                "Q3_K", "ffn_down: IQ3_XXS without imatrix")
        elif ftype == "Q3_K_M":
            if i_layer < n16:
                out = ("Q5_K", f"ffn_down: first {n16} layers")
            elif not falcon or umb:
                out = ("Q4_K", "ffn_down: Q3_K_M")
            else:
                out = ("Q3_K", "ffn_down: falcon Q3_K_M")
        elif ftype == "IQ3_M" and (i_layer < n8 or (hp.n_expert == 8 and umb)):
            out = ("Q4_K", "ffn_down: IQ3_M first layers / use_more_bits")
        elif ftype == "Q3_K_L":
            out = ("Q4_K", "ffn_down: falcon Q3_K_L") if falcon else ("Q5_K", "ffn_down: Q3_K_L")
        elif ftype == "Q4_K_M":
            if falcon:
                if i_layer < n16:
                    out = ("Q6_K", f"ffn_down: falcon first {n16} layers")
                elif umb:
                    out = ("Q5_K", umb_why)
                else:
                    out = ("Q4_K", "ffn_down: falcon Q4_K_M")
            elif umb:
                out = ("Q6_K", umb_why)
        elif i_layer < n8 and ftype in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
            out = ("Q5_K", f"ffn_down: first {n8} layers without imatrix")
        elif ftype == "Q5_K_M" and umb:
            out = ("Q6_K", umb_why)
        elif ftype == "Q4_K_S" and not falcon and i_layer < n8:
            out = ("Q5_K", f"ffn_down: first {n8} layers")
        elif ftype in ("Q4_0", "Q5_0") and st.has_imatrix and i_layer < n8:
            out = ("Q4_1" if ftype == "Q4_0" else "Q5_1", f"ffn_down: first {n8} layers with imatrix")
        st.i_ffn_down += 1
        return out

    if cat == ATTN_OUTPUT:
        if arch != "falcon":
            if hp.n_expert == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                             "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"):
                    return "Q5_K", "attn_output: 8 experts"
            else:
                bump = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                        "IQ3_M": "Q4_K"}
                if ftype in bump:
                    return bump[ftype], f"attn_output: {ftype}"
        elif ftype == "Q3_K_L":
            return "Q4_K", "attn_output: falcon Q3_K_L"
        return default

    # quirk: llama.cpp has an ATTENTION_QKV branch here, but attn_qkv already took the attn_v
    # branch above (category_is_attn_v), so that branch never runs and is not ported.

    if cat in (FFN_GATE, FFN_UP):
        counter = st.i_ffn_gate if cat == FFN_GATE else st.i_ffn_up
        i_layer, n_layer = _layer_info(st, counter, name)
        out = default
        if ftype == "IQ3_XS" and _cdiv(n_layer, 8) <= i_layer < _cdiv(7 * n_layer, 8):
            out = ("IQ3_XXS", f"{cat}: IQ3_XS middle layers")
        if cat == FFN_GATE:
            st.i_ffn_gate += 1
        else:
            st.i_ffn_up += 1
        return out

    return default


def _fallback(spec: TensorSpec, target: str) -> tuple[str, str | None]:
    """tensor_type_fallback: a type whose block size divides the row length."""
    ncols = spec.shape[0]
    qk = BLOCK_SIZES[target]
    if ncols % qk == 0:
        return target, None
    if target in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"):
        ret = "IQ4_NL"
    elif target in ("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"):
        ret = "Q4_0"
    elif target == "Q4_K":
        ret = "Q5_0"
    elif target == "Q5_K":
        ret = "Q5_1"
    elif target == "Q6_K":
        ret = "Q8_0"
    elif qk <= 32:
        ret = target  # already a 32-block type: only F16 is left below
    else:
        raise ShapeError(
            f"{spec.name}: row length {ncols} is not a multiple of {qk} and llama.cpp defines "
            f"no fallback for {target}")
    why = f"fallback: {ncols} % {qk} != 0 for {target}"
    if ncols % BLOCK_SIZES[ret] != 0:
        return "F16", why + f", nor % {BLOCK_SIZES[ret]} for {ret}: F16"
    return ret, why


def _requires_imatrix(name: str, dst_type: str, ftype: str) -> bool:
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if dst_type in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"):
        return True
    return dst_type == "Q2_K" and ftype == "Q2_K_S"


def plan_tensors(
    tensors: Sequence[TensorSpec],
    arch: str,
    metadata: Mapping[str, Any],
    ftype: str | int,
    *,
    pure: bool = False,
    has_imatrix: bool = False,
    quantize_output_tensor: bool = True,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_type_overrides: Sequence[tuple[str, str]] = (),
) -> list[TensorPlan]:
    """Per-tensor types of ``llama-quantize [--pure] [--imatrix f] in.gguf out.gguf FTYPE``.

    ``metadata`` holds the GGUF key-values (``{arch}.block_count``, ``.expert_count``,
    ``.attention.head_count[_kv]``). The keyword options mirror llama-quantize's
    ``--leave-output-tensor`` (``quantize_output_tensor=False``), ``--output-tensor-type``,
    ``--token-embedding-type`` and ``--tensor-type REGEX=TYPE`` (first matching regex wins).
    Raises ``ImatrixError`` where llama-quantize would refuse to run without an imatrix.
    Plans come back in the order of ``tensors``.
    """
    ft = get_ftype(ftype)
    default_type = ft.default_type
    specs = [TensorSpec(t.name, tuple(int(d) for d in t.shape), _type_name(t.ggml_type)) for t in tensors]
    st = _State(
        arch=arch,
        hp=_hparams(arch, metadata),
        has_imatrix=has_imatrix,
        has_tied_embeddings=not any(_category(s.name) == OUTPUT for s in specs),
        n_attention_wv=sum(1 for s in specs if _is_attn_v_like(_category(s.name))),
        output_tensor_type=None if output_tensor_type is None else _type_name(output_tensor_type),
        token_embedding_type=None if token_embedding_type is None else _type_name(token_embedding_type),
        overrides=[(re.compile(p), _type_name(t)) for p, t in tensor_type_overrides],
    )

    plans: dict[str, TensorPlan] = {}
    for spec in sorted(specs, key=lambda sp: loader_order_key(sp.name)):
        plan, allowed = _plan_one(st, spec, ft, default_type, pure, quantize_output_tensor)
        plans[spec.name] = plan
        if allowed and not has_imatrix and _requires_imatrix(spec.name, plan.target_type, ft.name):
            raise ImatrixError(
                f"ftype {ft.name} needs an importance matrix: tensor {spec.name} would be "
                f"{plan.target_type}")
    return [plans[s.name] for s in specs]


def _plan_one(
    st: _State, spec: TensorSpec, ft: FType, default_type: str, pure: bool, quantize_output: bool
) -> tuple[TensorPlan, bool]:
    """llama_tensor_get_type plus the main loop's copy-or-quantize decision; and whether the
    tensor passed tensor_allows_quantization."""
    keep = _why_not_quantizable(spec, st.arch, quantize_output)
    if keep is not None:
        return TensorPlan(spec.name, spec.ggml_type, False, f"kept {spec.ggml_type}: {keep}"), False
    cat = _category(spec.name)
    fallback = False
    if st.token_embedding_type is not None and cat == TOKEN_EMBD:
        named = spec.name == "per_layer_token_embd.weight" and any(
            p.search(spec.name) for p, _ in st.overrides)
        target, why = (st.token_embedding_type, "--token-embedding-type")
        if named:
            target, why, fallback = _typed(st, spec, ft, default_type, pure, cat)
    elif st.output_tensor_type is not None and cat == OUTPUT:
        target, why = st.output_tensor_type, "--output-tensor-type"
    else:
        target, why, fallback = _typed(st, spec, ft, default_type, pure, cat)
    if target == spec.ggml_type:
        return TensorPlan(spec.name, target, False, f"{why} (already {target}: copied)", fallback), True
    return TensorPlan(spec.name, target, True, why, fallback), True


def _typed(
    st: _State, spec: TensorSpec, ft: FType, default_type: str, pure: bool, cat: str
) -> tuple[str, str, bool]:
    new_type, why = default_type, "ftype default"
    if not is_quantized(default_type):
        return new_type, why, False
    manual = False
    for pattern, qtype in st.overrides:
        if pattern.search(spec.name):
            new_type, why, manual = qtype, f"--tensor-type {pattern.pattern}", True
            break
    if pure and not manual:
        why = "pure: ftype default"
    if not manual and not pure:
        new_type, why = _mixture(st, new_type, spec, ft.name, cat)
    fb_type, fb_why = _fallback(spec, new_type)
    if fb_why is not None:
        return fb_type, f"{why}; {fb_why} -> {fb_type}", True
    return new_type, why, False


def inputs_from_gguf(path: Any) -> tuple[list[TensorSpec], str, dict[str, Any]]:
    """Read ``plan_tensors``'s inputs (tensors, architecture, metadata) from a GGUF file header."""
    from quantbench.formats.gguf import read_gguf

    g = read_gguf(path)
    return [TensorSpec(t.name, t.ne, t.ggml_type) for t in g.tensors], g.architecture, g.values()