"""The MLX / mlx-lm checkpoint layout: affine (AFQ) and mxfp4 weights.

Why: mlx-lm's ``convert --quantize`` output is an HF-named directory where each quantized
``nn.Linear`` / ``nn.Embedding`` ``X`` holds (mlx ``QuantizedLinear`` parameters)::

    X.weight   uint32 [*lead, in * bits / 32]   LSB-first bitstream of codes per row
    X.scales   [*lead, in / group_size]         the weight's dtype (affine); uint8 E8M0 (mxfp4)
    X.biases   [*lead, in / group_size]         affine only

and ``config.json`` has ``quantization: {group_size, bits, mode}`` with a copy under
``quantization_config`` (mlx-lm's ``save_config``); per-module overrides are extra keys of
``quantization`` named by module path (a dict of the same fields, or ``false``). Our AFQ scheme
is MLX's rule and packing, so ``w_q``/``scales``/``biases`` are written as they are (checked
byte for byte against mlx-lm). ``mode: "mxfp4"`` (group 32, 4 bits) holds E2M1 nibbles (low
nibble first, i.e. our MXFP4 ``blocks`` bytes viewed as uint32) and E8M0 scales; MLX picks its
own scale exponent, but dequantization (``E2M1 * 2^(s-127)``) is the same for any exponent, so
our MXFP4 QTensors round-trip.

mlx-lm quantizes every layer whose last dimension the group size divides, embeddings and the
output head included; the rest stay float and need no config entry (mlx-lm 0.32 looks for
``X.scales``). Safetensors metadata is ``{"format": "mlx"}`` as mlx writes.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch

from quantbench.errors import FormatError
from quantbench.formats.checkpoint import Group, is_embedding, matches_any, module_of
from quantbench.quant.qtensor import QTensor

AFQ_BITS = (2, 3, 4, 5, 6, 8)
AFQ_GROUPS = (32, 64, 128)
MODES = ("affine", "mxfp4")


def scheme_params(scheme: str) -> dict[str, Any]:
    """``{group_size, bits, mode}`` of a scheme name as MLX spells them."""
    if scheme.startswith("MXFP4"):
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    from quantbench.quant.schemes import get_scheme

    f = get_scheme(scheme).fixed
    return {"group_size": f["group_size"], "bits": f["bits"], "mode": "affine"}


def qtype_for(bits: int, group_size: int, mode: str, where: str) -> str:
    if mode == "mxfp4":
        if (bits, group_size) != (4, 32):
            raise FormatError(f"{where}: mxfp4 needs bits 4 and group_size 32, got bits {bits}, group_size {group_size}")
        return "MXFP4_OCP"
    if mode != "affine":
        raise FormatError(f"{where}: MLX quantization mode {mode!r} is not supported (affine or mxfp4)")
    if bits not in AFQ_BITS:
        raise FormatError(f"{where}: MLX affine bits {bits} is not supported ({', '.join(map(str, AFQ_BITS))})")
    if group_size not in AFQ_GROUPS:
        raise FormatError(f"{where}: MLX group_size {group_size} is not supported ({', '.join(map(str, AFQ_GROUPS))})")
    return f"AFQ{bits}" if group_size == 64 else f"AFQ{bits}_G{group_size}"


class MlxWriter:
    metadata = {"format": "mlx"}

    def __init__(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> None:
        if options:
            raise FormatError(f"mlx layout takes no options (got {', '.join(sorted(options))})")
        self.scheme, self.cfg, self.skip = scheme, cfg, skip
        self.params = scheme_params(scheme)

    def target(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        if not (name.endswith(".weight") and t.ndim == 2 and t.is_floating_point()):
            return None
        if t.shape[-1] % self.params["group_size"] or matches_any(name, self.skip):
            return None
        if is_embedding(name) and "embed_tokens" not in name:
            return None  # position / type embeddings are not nn.Embedding layers mlx-lm quantizes
        return t

    def encode(self, name: str, q: QTensor, src: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return encode(name, q)

    def config(self) -> dict:
        out = copy.deepcopy(self.cfg)
        out.pop("quantization_config", None)
        out["quantization"] = dict(self.params)
        out["quantization_config"] = dict(self.params)
        return out


def encode(name: str, q: QTensor) -> list[tuple[str, torch.Tensor]]:
    mod = module_of(name)
    t = q.tensors
    if q.qtype.startswith("MXFP4"):
        blocks = t["blocks"].contiguous()
        words = blocks.reshape(*blocks.shape[:-1], blocks.shape[-1] // 4, 4).view(torch.uint32).squeeze(-1)
        return [(name, words), (f"{mod}.scales", t["scales"])]
    return [(name, t["w_q"]), (f"{mod}.scales", t["scales"]), (f"{mod}.biases", t["biases"])]


def _module_params(quant: dict, mod: str, where: str) -> dict | None:
    """The effective ``{group_size, bits, mode}`` for ``mod``; ``None`` when marked ``false``."""
    own = quant.get(mod)
    if own is False:
        return None
    base = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}
    if isinstance(own, dict):
        base.update(own)
    for k in ("group_size", "bits"):
        if not isinstance(base.get(k), int):
            raise FormatError(f"{where}: quantization.{k} must be an integer for {mod}, got {base.get(k)!r}")
    base.setdefault("mode", "affine")
    return base


def decode(g: Group, name: str, p: dict, where_cfg: str) -> QTensor:
    mod = module_of(name)
    bits, gs, mode = p["bits"], p["group_size"], p["mode"]
    qtype = qtype_for(bits, gs, mode, f"{where_cfg} (module {mod})")
    w = g.get(name)
    scales = g.get(f"{mod}.scales", needed_by=name)
    if w.dtype not in (torch.uint32, torch.int32):
        raise FormatError(f"{g.where(name)}: quantized MLX weight must be uint32, got {w.dtype}")
    w = w.view(torch.uint32)
    if w.ndim < 1 or (w.shape[-1] * 32) % bits:
        raise FormatError(f"{g.where(name)}: {w.shape[-1]} words per row do not hold whole {bits}-bit codes")
    k = w.shape[-1] * 32 // bits
    lead = tuple(w.shape[:-1])
    if tuple(scales.shape) != (*lead, k // gs) or k % gs:
        raise FormatError(f"{g.where(mod + '.scales')}: shape {list(scales.shape)}, expected {[*lead, k // gs]} "
                          f"for {k} inputs in groups of {gs}")
    shape = (*lead, k)
    if mode == "mxfp4":
        if scales.dtype != torch.uint8:
            raise FormatError(f"{g.where(mod + '.scales')}: mxfp4 scales must be uint8 E8M0, got {scales.dtype}")
        blocks = w.contiguous().view(torch.uint8).reshape(*lead, k // 2)
        return QTensor(qtype, shape, {"blocks": blocks, "scales": scales}, {"rule": "ocp", "block_size": 32})
    biases = g.get(f"{mod}.biases", needed_by=name)
    if tuple(biases.shape) != tuple(scales.shape):
        raise FormatError(f"{g.where(mod + '.biases')}: shape {list(biases.shape)} differs from scales {list(scales.shape)}")
    if not scales.is_floating_point():
        raise FormatError(f"{g.where(mod + '.scales')}: affine scales must be floating point, got {scales.dtype}")
    return QTensor(qtype, shape, {"w_q": w, "scales": scales, "biases": biases}, {"bits": bits, "group_size": gs})


class MlxLayout:
    name = "mlx"
    quant_methods: tuple[str, ...] = ()  # detected by config["quantization"]
    schemes = frozenset(
        [f"AFQ{b}" + ("" if g == 64 else f"_G{g}") for b in AFQ_BITS for g in AFQ_GROUPS] + ["MXFP4_OCP", "MXFP4_ISQ"]
    )

    def writer(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> MlxWriter:
        return MlxWriter(scheme, cfg, skip, options)

    def read(self, st, cfg: dict, origin: str) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
        quant = cfg.get("quantization")
        if quant is None:
            quant = cfg.get("quantization_config")
        if not isinstance(quant, dict):
            raise FormatError(f"{origin}: MLX 'quantization' must be an object, got {quant!r}")
        g = Group(st)
        names = st.names()
        nameset = set(names)
        for name in names:
            if name.endswith((".scales", ".biases")):
                owner = module_of(name) + ".weight"
                if owner not in nameset:
                    raise FormatError(f"{g.where(name)} belongs to {owner}, which is not in the checkpoint")
                continue
            mod = module_of(name)
            if name.endswith(".weight") and f"{mod}.scales" in nameset:
                p = _module_params(quant, mod, origin)
                if p is None:
                    raise FormatError(f"{g.where(name)}: has scales but quantization marks {mod} as not quantized")
                yield name, decode(g, name, p, origin)
                continue
            t = st.read(name)
            if name.endswith(".weight") and t.dtype == torch.uint32:
                raise FormatError(f"{g.where(name)}: packed uint32 weight without {mod}.scales")
            yield name, t


LAYOUT = MlxLayout()
