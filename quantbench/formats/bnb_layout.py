"""The transformers + bitsandbytes checkpoint layout (NF4 / FP4, double quant, LLM.int8).

Why these exact names: transformers' bnb loader (``Bnb4bitDeserialize`` →
``Params4bit.from_prequantized``; ``Bnb8bitDeserialize``) collects them by suffix, and they are
``bitsandbytes==0.50.2``'s own ``QuantState.as_dict(packed=True)`` keys, which our bnb scheme
reproduces byte for byte. Per quantized linear ``X`` (``X.weight`` in the float model):

4-bit::

    X.weight                                   uint8 [ceil(n/2), 1]  (high nibble = even element)
    X.weight.absmax                            float32 [n_blocks]  (uint8 codes with double quant)
    X.weight.quant_map                         float32 [16]
    X.weight.nested_absmax                     float32 [ceil(n_blocks/256)]   (double quant only)
    X.weight.nested_quant_map                  float32 [256]                  (double quant only)
    X.weight.quant_state.bitsandbytes__nf4     uint8: json.dumps({quant_type, blocksize, dtype,
                                               shape[, nested_blocksize, nested_dtype, nested_offset]})

LLM.int8::

    X.weight         int8 [out, in]   (CB)
    X.SCB            float32 [out]
    X.weight_format  uint8 scalar 0   (row-major; bnb's other formats are GPU tile layouts)

``config.json`` gets transformers' ``BitsAndBytesConfig.to_dict()`` as ``quantization_config``.
transformers converts every ``nn.Linear`` except the output head; embeddings stay float.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch

from quantbench.errors import FormatError
from quantbench.formats.checkpoint import Group, is_linear_weight, is_output_head, json_tensor, matches_any, module_of, tensor_json
from quantbench.quant.qtensor import QTensor

STATE_PREFIX = ".quant_state.bitsandbytes__"
SUFFIXES_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QUANT_TYPES = ("nf4", "fp4")
QUANT_STORAGE = {"uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32}


def bnb_config(scheme: str, compute_dtype: str, skip_modules: list[str] | None) -> dict:
    """``BitsAndBytesConfig(...).to_dict()`` as transformers 5 writes it, key for key."""
    four = scheme != "INT8"
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": scheme.split("_")[0].lower() if four else "fp4",
        "bnb_4bit_use_double_quant": scheme.endswith("_DQ"),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


class BnbWriter:
    """Encodes one scheme's QTensors under transformers' names and builds the config."""

    metadata = None

    def __init__(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> None:
        self.scheme, self.cfg, self.skip = scheme, cfg, skip
        unknown = set(options) - {"compute_dtype"}
        if unknown:
            raise FormatError(f"bnb layout: unknown option(s) {', '.join(sorted(unknown))} (known: compute_dtype)")
        src_dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        self.compute_dtype = options.get("compute_dtype") or (src_dtype if src_dtype in ("float16", "bfloat16") else "float32")

    def target(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        if not is_linear_weight(name, t.shape, t.dtype) or is_output_head(name) or matches_any(name, self.skip):
            return None
        return t

    def encode(self, name: str, q: QTensor, src: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return encode(name, q)

    def config(self) -> dict:
        out = copy.deepcopy(self.cfg)
        skip = (["lm_head", *self.skip]) if self.skip else None
        out["quantization_config"] = bnb_config(self.scheme, self.compute_dtype, skip)
        return out


def encode(name: str, q: QTensor) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of one quantized ``X.weight`` (``name``)."""
    if q.qtype == "INT8":
        mod = module_of(name)
        return [(name, q.tensors["CB"]), (f"{mod}.SCB", q.tensors["SCB"]),
                (f"{mod}.weight_format", torch.zeros((), dtype=torch.uint8))]
    from quantbench.quant.bnb import quant_state_fields

    t = q.tensors
    parts = [(name, t["weight"]), (f"{name}.absmax", t["absmax"]), (f"{name}.quant_map", t["quant_map"])]
    if q.params.get("double_quant"):
        parts += [(f"{name}.nested_absmax", t["nested_absmax"]), (f"{name}.nested_quant_map", t["nested_quant_map"])]
    parts.append((f"{name}{STATE_PREFIX}{q.params['quant_type']}", json_tensor(quant_state_fields(q))))
    return parts


def _decode_4bit(g: Group, name: str, qt: str, storage: torch.dtype) -> QTensor:
    state_key = f"{name}{STATE_PREFIX}{qt}"
    where = g.where(state_key)
    st = tensor_json(g.get(state_key), where)
    for k in ("quant_type", "blocksize", "dtype", "shape"):
        if k not in st:
            raise FormatError(f"{where}: quant_state lacks {k!r}")
    if st["quant_type"] != qt:
        raise FormatError(f"{where}: quant_state says quant_type {st['quant_type']!r} under a bitsandbytes__{qt} key")
    shape = tuple(int(s) for s in st["shape"])
    n = 1
    for s in shape:
        n *= s
    bs = int(st["blocksize"])
    nb = -(-n // bs)
    w = g.get(name)
    if w.dtype != storage:
        raise FormatError(f"{g.where(name)}: 4-bit weight has dtype {w.dtype}, config's bnb_4bit_quant_storage says {storage}")
    packed = w.contiguous().view(torch.uint8).reshape(-1, 1)
    if packed.shape[0] != -(-n // 2):
        raise FormatError(f"{g.where(name)}: {packed.shape[0]} packed bytes, quant_state shape {list(shape)} needs {-(-n // 2)}")
    absmax = g.get(f"{name}.absmax", needed_by=name)
    qmap = g.get(f"{name}.quant_map", needed_by=name)
    if absmax.numel() != nb or qmap.numel() != 16:
        raise FormatError(f"{g.where(name)}: absmax has {absmax.numel()} values (expected {nb}), quant_map {qmap.numel()} (expected 16)")
    double = "nested_offset" in st
    tensors = {"weight": packed, "absmax": absmax.reshape(-1), "quant_map": qmap.reshape(-1).to(torch.float32)}
    params: dict[str, Any] = {"quant_type": qt, "blocksize": bs, "dtype": st["dtype"], "double_quant": double}
    if double:
        tensors["nested_absmax"] = g.get(f"{name}.nested_absmax", needed_by=name).reshape(-1).to(torch.float32)
        tensors["nested_quant_map"] = g.get(f"{name}.nested_quant_map", needed_by=name).reshape(-1).to(torch.float32)
        params.update({"nested_blocksize": int(st.get("nested_blocksize", 256)),
                       "nested_dtype": st.get("nested_dtype", "float32"), "nested_offset": float(st["nested_offset"])})
        if absmax.dtype != torch.uint8:
            raise FormatError(f"{g.where(name + '.absmax')}: double-quantized absmax must be uint8, got {absmax.dtype}")
    else:
        tensors["absmax"] = tensors["absmax"].to(torch.float32)
    qtype = qt.upper() + ("_DQ" if double else "")
    return QTensor(qtype, shape, tensors, params)


def _decode_int8(g: Group, name: str) -> QTensor:
    mod = module_of(name)
    cb = g.get(name)
    scb = g.get(f"{mod}.SCB", needed_by=name)
    if cb.ndim != 2 or scb.numel() != cb.shape[0]:
        raise FormatError(f"{g.where(name)}: int8 weight {list(cb.shape)} does not match SCB with {scb.numel()} values")
    fmt_key = f"{mod}.weight_format"
    if g.has(fmt_key):
        fmt = int(g.get(fmt_key).reshape(-1)[0])
        if fmt != 0:
            raise FormatError(f"{g.where(fmt_key)}: weight_format {fmt} is a GPU tile layout; only row-major (0) is supported")
    return QTensor("INT8", tuple(cb.shape), {"CB": cb, "SCB": scb.reshape(-1).to(torch.float32)}, {"threshold": 6.0})


class BnbLayout:
    name = "bnb"
    quant_methods = ("bitsandbytes",)
    schemes = frozenset({"NF4", "NF4_DQ", "FP4", "FP4_DQ", "INT8"})

    def writer(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> BnbWriter:
        return BnbWriter(scheme, cfg, skip, options)

    def read(self, st, cfg: dict, origin: str) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
        """Items of a bnb checkpoint: 4-bit and int8 weights as QTensors, the rest as stored."""
        from quantbench.formats.checkpoint import quantization_config

        qc = quantization_config(cfg)
        four = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
        eight = bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))
        if four == eight:
            raise FormatError(f"{origin}: bitsandbytes quantization_config must set exactly one of load_in_4bit / load_in_8bit")
        qt = qc.get("bnb_4bit_quant_type", "fp4")
        if four and qt not in QUANT_TYPES:
            raise FormatError(f"{origin}: bnb_4bit_quant_type {qt!r} is not supported (nf4 or fp4)")
        storage_name = qc.get("bnb_4bit_quant_storage", "uint8")
        if storage_name not in QUANT_STORAGE:
            raise FormatError(f"{origin}: bnb_4bit_quant_storage {storage_name!r} is not supported")
        storage = QUANT_STORAGE[storage_name]
        g = Group(st)
        names = st.names()
        nameset = set(names)
        for name in names:
            if STATE_PREFIX in name or name.endswith(SUFFIXES_4BIT) or name.endswith((".SCB", ".weight_format")):
                owner = name.split(STATE_PREFIX)[0] if STATE_PREFIX in name else None
                if owner is None:
                    for suf in SUFFIXES_4BIT:
                        if name.endswith(suf):
                            owner = name[: -len(suf)]
                    if owner is None:
                        owner = module_of(name) + ".weight"
                if owner not in nameset:
                    raise FormatError(f"{g.where(name)} belongs to {owner}, which is not in the checkpoint")
                continue
            if four and f"{name}{STATE_PREFIX}{qt}" in nameset:
                yield name, _decode_4bit(g, name, qt, storage)
            elif four and any(f"{name}{STATE_PREFIX}{o}" in nameset for o in QUANT_TYPES):
                raise FormatError(f"{g.where(name)}: its quant_state is not bitsandbytes__{qt} as the config says")
            elif eight and name.endswith(".weight") and g.has(f"{module_of(name)}.SCB"):
                yield name, _decode_int8(g, name)
            else:
                t = st.read(name)
                if name.endswith(".weight") and not t.is_floating_point() and t.ndim >= 1:
                    what = "quant_state" if four else "SCB"
                    raise FormatError(f"{g.where(name)}: quantized ({t.dtype}) weight without its {what} tensor")
                yield name, t


LAYOUT = BnbLayout()
