"""mistral.rs ISQ planning: type names, numeric shorthand, which modules get quantized, the
embedding/lm_head promotion and the GGML shape fallbacks.

Every rule here mirrors mistral.rs 0.9.5 (``mistralrs-core/src/pipeline/isq.rs``
``parse_isq_value``, ``mistralrs-quant`` ``IsqType::promote_for_sensitive_tensor``,
``utils/isq.rs`` ``get_fallback``/``get_quantization_behaviour``, the llama loader's
``promoted_isq_predicates``) and was checked against what the ``mistralrs`` wheel writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from quantbench.errors import QuantbenchError, UnknownTypeError


@dataclass(frozen=True)
class IsqType:
    """One mistral.rs ISQ type.

    ``label`` is mistral.rs's ``Display`` name (``q4k``, ``q8_0``, ``hqq4``, ``fp8``...): the UQFF
    file stem and the ``quant``/``stored`` strings of ``uqff_report.json``. ``family`` picks the
    UQFF layer format; ``ggml`` is quantbench's GGML registry name for the ``gguf`` family;
    ``bits`` the width for HQQ/AFQ.
    """

    name: str  # the spelling mistral.rs's error message lists (Q4K, Q8_0, FP8, ...)
    label: str
    family: str  # gguf | hqq | fp8 | afq | f8q8 | mxfp4
    ggml: str | None = None
    bits: int | None = None


_ALL = [
    IsqType("Q4_0", "q4_0", "gguf", "Q4_0"),
    IsqType("Q4_1", "q4_1", "gguf", "Q4_1"),
    IsqType("Q5_0", "q5_0", "gguf", "Q5_0"),
    IsqType("Q5_1", "q5_1", "gguf", "Q5_1"),
    IsqType("Q8_0", "q8_0", "gguf", "Q8_0"),
    IsqType("Q8_1", "q8_1", "gguf", "Q8_1"),
    IsqType("Q2K", "q2k", "gguf", "Q2_K"),
    IsqType("Q3K", "q3k", "gguf", "Q3_K"),
    IsqType("Q4K", "q4k", "gguf", "Q4_K"),
    IsqType("Q5K", "q5k", "gguf", "Q5_K"),
    IsqType("Q6K", "q6k", "gguf", "Q6_K"),
    IsqType("Q8K", "q8k", "gguf", "Q8_K"),
    IsqType("HQQ8", "hqq8", "hqq", bits=8),
    IsqType("HQQ4", "hqq4", "hqq", bits=4),
    IsqType("FP8", "fp8", "fp8"),
    IsqType("AFQ8", "afq8", "afq", bits=8),
    IsqType("AFQ6", "afq6", "afq", bits=6),
    IsqType("AFQ4", "afq4", "afq", bits=4),
    IsqType("AFQ3", "afq3", "afq", bits=3),
    IsqType("AFQ2", "afq2", "afq", bits=2),
    IsqType("F8Q8", "f8q8", "f8q8"),
    IsqType("MXFP4", "mxfp4", "mxfp4"),
]
ISQ_TYPES: dict[str, IsqType] = {t.label: t for t in _ALL}
_BY_GGML = {t.ggml: t for t in _ALL if t.ggml}

# IsqBits::resolve on CPU and CUDA (Metal would pick AFQ; quantbench never targets Metal).
NUMERIC_SHORTHAND = {"2": "q2k", "3": "q3k", "4": "q4k", "5": "q5k", "6": "q6k", "8": "q8_0"}

DEVICES = ("cpu", "cuda")


def _choices() -> str:
    return ", ".join(["2", "3", "4", "5", "6", "8"] + [t.name for t in _ALL])


def parse_isq(spec: str, device: str = "cpu") -> IsqType:
    """``--isq`` value -> type, case-insensitive, as mistral.rs's ``parse_isq_value``.

    ``2/3/4/5/6/8`` resolve to Q2K/Q3K/Q4K/Q5K/Q6K/Q8_0 (mistral.rs's CPU/CUDA choice);
    ``fp8`` is mistral.rs's F8E4M3. F8Q8 is CPU-only in mistral.rs and refused for ``cuda``.
    """
    s = str(spec).strip().lower()
    s = NUMERIC_SHORTHAND.get(s, s)
    if s == "f8e4m3":
        s = "fp8"
    t = ISQ_TYPES.get(s)
    if t is None:
        raise UnknownTypeError(f"ISQ type {spec!r} unknown, choose one of {_choices()}")
    if t.label == "f8q8" and device == "cuda":
        raise UnknownTypeError("F8Q8 is CPU-only in mistral.rs; choose fp8 or another accelerator ISQ type")
    return t


def parse_isq_list(specs: Iterable[str] | str, device: str = "cpu") -> list[IsqType]:
    """``--isq a,b`` (or repeated ``--isq``) -> distinct types, in order; a repeat is an error
    as in mistral.rs (``Duplicate UQFF output type``)."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[IsqType] = []
    for item in specs:
        for part in str(item).split(","):
            if not part.strip():
                continue
            t = parse_isq(part, device)
            if t in out:
                raise QuantbenchError(f"--isq: type {t.name} requested twice (as {part.strip()!r})")
            out.append(t)
    if not out:
        raise UnknownTypeError(f"--isq: no type given; choose one of {_choices()}")
    return out


def promote_for_sensitive_tensor(t: IsqType) -> IsqType:
    """mistral.rs's default-type promotion for embeddings and the output head."""
    if t.label in ("afq2", "afq3", "afq4"):
        return ISQ_TYPES["afq6"]
    if t.label in ("afq6", "afq8"):
        return ISQ_TYPES["afq8"]
    if t.label in ("q2k", "q3k", "q4k", "q4_0", "q4_1"):
        return ISQ_TYPES["q6k"]
    if t.label in ("q5k", "q6k", "q8k", "q5_0", "q5_1", "q8_0", "q8_1"):
        return ISQ_TYPES["q8_0"]
    return t


# ``get_fallback`` in mistralrs-quant/src/utils/isq.rs: the K-quant a row length cannot take
# falls back to a 32-wide legacy type; anything else that does not fit stays unquantized (F32).
GGML_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q4_1", "Q5_K": "Q5_0", "Q6_K": "Q5_1", "Q8_K": "Q8_1"}
GGML_BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q8_1": 32,
              "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q8_K": 256}


def ggml_for_row_length(ggml: str, n_per_row: int) -> tuple[str | None, str]:
    """The GGML type mistral.rs actually stores for rows of ``n_per_row``, and why.

    ``None`` means "not quantizable": mistral.rs keeps such a layer as a GGUF F32 tensor
    (report label ``f32``, reason ``tensor is not quantizable``).
    """
    t: str | None = ggml
    reasons: list[str] = []
    while t is not None and n_per_row % GGML_BLOCK[t]:
        nxt = GGML_FALLBACK.get(t)
        reasons.append(f"row length {n_per_row} is not a multiple of {t}'s block of {GGML_BLOCK[t]}")
        t = nxt
    if t is None:
        return None, "tensor is not quantizable (" + "; ".join(reasons) + ")"
    return t, "; ".join(reasons)


def isq_label_for_ggml(ggml: str) -> str:
    """Report label (``stored``) of a GGML type: ``Q4_K`` -> ``q4k``; floats -> ``f32``/``f16``/``bf16``."""
    if ggml in _BY_GGML:
        return _BY_GGML[ggml].label
    return ggml.lower()


# ----------------------------------------------------------------------------------------------
# Which modules are quantized

# Linear layers mistral.rs's text loaders register for ISQ (attention, MLP, experts, head) and
# the token embedding (its quantizable embedding layer). Matched on the module name, i.e. the
# weight name without ``.weight``.
_LINEAR_SUFFIXES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense",
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_attn", "c_proj", "c_fc",
    "w1", "w2", "w3", "wq", "wk", "wv", "wo",
)
_EMBED_RE = re.compile(r"(^|\.)embed_tokens$")
_HEAD_RE = re.compile(r"(^|\.)lm_head$")
# Routed experts, per-expert in HF checkpoints: <prefix>.experts.<i>.<proj>.weight
EXPERT_RE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# mistral.rs stores stacked experts under <prefix>.experts.{gate,up,down}_proj
EXPERT_PROJ_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
                     "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# promoted_isq_predicates: exact checkpoint paths of the embedding and the untied head.
PROMOTED = (re.compile(r"^model\.embed_tokens\.weight$"), re.compile(r"^lm_head\.(weight|bias)$"))
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Module:
    """A quantizable module: its UQFF key, and the source tensors that make it up.

    Dense modules have one source weight; stacked experts list ``E`` per-expert weights in
    expert order, stored as one ``[E, out, in]`` tensor.
    """

    key: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]  # stored shape: [out, in] or [E, out, in]
    bias: str | None = None
    is_expert: bool = False

    @property
    def weight_name(self) -> str:
        return f"{self.key}.weight"

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.search(self.key + ".")
        return int(m.group(1)) if m else None

    @property
    def promoted(self) -> bool:
        return any(p.search(self.weight_name) for p in PROMOTED)


def find_modules(shapes: Mapping[str, tuple[int, ...]], organization: str | None = None) -> list[Module]:
    """Quantizable modules of a checkpoint given ``{tensor name: shape}``, sorted by key (the
    order mistral.rs writes them in).

    ``organization="moqe"`` (mistral.rs ``IsqOrganization::MoeExpertsOnly``) keeps only the
    routed experts; a checkpoint without routed experts is an error then.
    """
    org = (organization or "default").lower()
    if org not in ("default", "moqe"):
        raise QuantbenchError(f"--isq-organization: expected 'default' or 'moqe', got {organization!r}")
    modules: dict[str, Module] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name, shape in shapes.items():
        m = EXPERT_RE.match(name)
        if m and len(shape) == 2:
            proj = EXPERT_PROJ_NAMES[m.group("proj")]
            experts.setdefault((m.group("prefix"), proj), {})[int(m.group("idx"))] = name
            continue
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        key = name[: -len(".weight")]
        last = key.rsplit(".", 1)[-1]
        if last in _LINEAR_SUFFIXES or _EMBED_RE.search(key) or _HEAD_RE.search(key):
            bias = f"{key}.bias" if f"{key}.bias" in shapes else None
            modules[key] = Module(key, (name,), tuple(shape), bias)
    stacked: dict[str, Module] = {}
    for (prefix, proj), by_idx in experts.items():
        idx = sorted(by_idx)
        if idx != list(range(len(idx))):
            raise QuantbenchError(f"{prefix}: expert indices {idx[:8]}... are not 0..{len(idx) - 1}")
        srcs = tuple(by_idx[i] for i in idx)
        shape0 = tuple(shapes[srcs[0]])
        bad = [s for s in srcs if tuple(shapes[s]) != shape0]
        if bad:
            raise QuantbenchError(f"{prefix}.{proj}: experts differ in shape ({bad[0]} is {tuple(shapes[bad[0]])}, expert 0 is {shape0})")
        key = f"{prefix}.{proj}"
        stacked[key] = Module(key, srcs, (len(srcs), *shape0), None, True)
    if org == "moqe":
        if not stacked:
            raise QuantbenchError("--isq-organization moqe quantizes routed experts only, and this model has none")
        return sorted(stacked.values(), key=lambda m: m.key)
    return sorted([*modules.values(), *stacked.values()], key=lambda m: m.key)


@dataclass(frozen=True)
class LayerPlan:
    """What one module becomes in one UQFF output."""

    module: Module
    default: IsqType  # the output's --isq type
    resolved: IsqType  # after topology and promotion
    stored: str  # report label of what is written: q4k, q4_1, f32, unquant, hqq4...
    ggml: str | None  # GGML type written for the gguf family (F32 for "not quantizable")
    reason: str  # why stored differs from resolved ("" when it does not)


def resolve_type(module: Module, default: IsqType, topology=None) -> IsqType:
    """Topology (regex, then layer range) beats promotion; promotion applies to the default only."""
    if topology is not None:
        explicit = topology.isq_for(module.weight_name, module.layer)
        if explicit is not None:
            return explicit
    return promote_for_sensitive_tensor(default) if module.promoted else default


def plan_layer(module: Module, default: IsqType, topology=None) -> LayerPlan:
    """Resolve a module's type and the storage its shape allows (GGML families only; other
    families' shape rules live with their quantizers and are applied by the job)."""
    t = resolve_type(module, default, topology)
    if t.family != "gguf":
        return LayerPlan(module, default, t, t.label, None, "")
    ggml, why = ggml_for_row_length(t.ggml, module.shape[-1])
    if ggml is None:
        return LayerPlan(module, default, t, "f32", "F32", why)
    return LayerPlan(module, default, t, isq_label_for_ggml(ggml), ggml, why)
