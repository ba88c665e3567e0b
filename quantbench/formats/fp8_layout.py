"""FP8 e4m3 checkpoint layouts: DeepSeek-V3 / transformers FineGrainedFP8 and compressed-tensors.

Why two: block-scaled FP8 checkpoints (DeepSeek-V3, Qwen3-FP8, transformers'
``FineGrainedFP8Config``) and llm-compressor's ``float-quantized`` checkpoints (vLLM's FP8
per-tensor / per-channel models) are the two FP8 layouts in the wild. Both store ``X.weight`` as
``float8_e4m3fn`` and a float32 multiplier (``w ≈ code * scale``), which is what our FP8
QTensors hold, so encoding only renames and reshapes.

``fp8`` (FineGrainedFP8)::

    X.weight             float8_e4m3fn [out, in]
    X.weight_scale_inv   float32 [ceil(out/128), ceil(in/128)]
    quantization_config: {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
                          weight_block_size: [128, 128], modules_to_not_convert: [...]}

transformers' FP8 quantizer only converts linears whose dims the block divides and derives the
block from the scale grid on load, so the writer keeps other linears float and lists them
(with the output head) in ``modules_to_not_convert``. The reader also takes DeepSeek's partial
edge blocks (``ceil``) and ``scale_fmt: ue8m0`` power-of-two scales (uint8 E8M0).

``compressed-tensors`` (format ``float-quantized``)::

    X.weight         float8_e4m3fn [out, in]
    X.weight_scale   float32: [1] (strategy tensor), [out, 1] (channel), [ceil(out/bm), ceil(in/bn)] (block)
    quantization_config: {quant_method: compressed-tensors, format: float-quantized,
                          quantization_status: compressed, config_groups: {group_0: {targets: [Linear],
                          weights: {num_bits: 8, type: float, symmetric: true, strategy, ...}}}, ignore: [...]}

Weights only: activation quantization is a run-time setting of the peer; checkpoints with
static activation scales (``activation_scheme: static`` / ``input_activations.dynamic: false``)
are refused rather than run without them.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch

from quantbench.errors import FormatError
from quantbench.formats.checkpoint import Group, is_linear_weight, is_output_head, matches_any, module_of, quantization_config
from quantbench.quant.qtensor import QTensor

BLOCK = 128
E4M3 = torch.float8_e4m3fn


def _e8m0_to_f32(s: torch.Tensor) -> torch.Tensor:
    raw = s.view(torch.uint8) if s.dtype != torch.uint8 else s
    return torch.ldexp(torch.ones_like(raw, dtype=torch.float32), raw.to(torch.int32) - 127)


class _Writer:
    metadata = None

    def __init__(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> None:
        if options:
            raise FormatError(f"FP8 layouts take no options (got {', '.join(sorted(options))})")
        self.scheme, self.cfg, self.skip = scheme, cfg, skip
        self.kept: list[str] = []  # linear modules left in float

    def _linear(self, name: str, t: torch.Tensor) -> bool:
        if not is_linear_weight(name, t.shape, t.dtype):
            return False
        if is_output_head(name) or matches_any(name, self.skip):
            if not is_output_head(name):
                self.kept.append(module_of(name))
            return False
        return True


class BlockWriter(_Writer):
    def target(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        if not self._linear(name, t):
            return None
        if t.shape[0] % BLOCK or t.shape[1] % BLOCK:
            self.kept.append(module_of(name))
            return None
        return t

    def encode(self, name: str, q: QTensor, src: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, q.tensors["weight"]), (f"{module_of(name)}.weight_scale_inv", q.tensors["weight_scale_inv"].to(torch.float32))]

    def config(self) -> dict:
        out = copy.deepcopy(self.cfg)
        out["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": ["lm_head", *self.kept],
        }
        return out


_CT_STRATEGY = {"FP8_TENSOR": "tensor", "FP8": "tensor", "FP8_CHANNEL": "channel", "FP8_BLOCK": "block"}


class CtWriter(_Writer):
    def target(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        return t if self._linear(name, t) else None

    def encode(self, name: str, q: QTensor, src: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        g = q.params["granularity"]
        key = f"{module_of(name)}.weight_scale"
        if g == "mistralrs":
            scale = q.tensors["dequant_w_scale"].reshape(1)
        elif g == "tensor":
            scale = q.tensors["weight_scale"].reshape(1)
        elif g == "channel":
            scale = q.tensors["weight_scale"].reshape(-1, 1)
        else:
            scale = q.tensors["weight_scale_inv"]
        return [(name, q.tensors["weight"]), (key, scale.to(torch.float32))]

    def config(self) -> dict:
        strategy = _CT_STRATEGY[self.scheme]
        weights = {
            "actorder": None, "block_structure": [BLOCK, BLOCK] if strategy == "block" else None,
            "dynamic": False, "group_size": None, "num_bits": 8, "observer": "minmax", "observer_kwargs": {},
            "strategy": strategy, "symmetric": True, "type": "float",
        }
        out = copy.deepcopy(self.cfg)
        out["quantization_config"] = {
            "config_groups": {"group_0": {"format": "float-quantized", "input_activations": None, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": "float-quantized", "global_compression_ratio": None,
            "ignore": ["lm_head", *self.kept], "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
        }
        return out


def _read_weight(g: Group, name: str) -> torch.Tensor:
    w = g.get(name)
    if w.dtype != E4M3:
        raise FormatError(f"{g.where(name)}: FP8 weight must be float8_e4m3fn, got {w.dtype}")
    if w.ndim != 2:
        raise FormatError(f"{g.where(name)}: FP8 weight must be 2-D, got shape {list(w.shape)}")
    return w


def decode_block(g: Group, name: str, scale_key: str, block: tuple[int, int]) -> QTensor:
    """A block-scaled FP8 weight: ``scale_key`` holds the ``[ceil(out/b), ceil(in/b)]`` multipliers."""
    w = _read_weight(g, name)
    s = g.get(scale_key, needed_by=name)
    bm, bn = block
    if bm != bn:
        raise FormatError(f"{g.where(name)}: non-square weight block {list(block)} is not supported (square blocks only)")
    out, inn = w.shape
    want = (-(-out // bm), -(-inn // bn))
    if tuple(s.shape) != want:
        raise FormatError(f"{g.where(scale_key)}: shape {list(s.shape)}, expected {list(want)} for a {out}x{inn} weight in {bm}x{bn} blocks")
    s = _e8m0_to_f32(s) if s.dtype in (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8)) else s.to(torch.float32)
    return QTensor("FP8_BLOCK", (out, inn), {"weight": w, "weight_scale_inv": s},
                   {"granularity": "block", "weight_block_size": [bm, bn]})


def _orphans(g: Group, names: list[str], suffixes: tuple[str, ...]) -> None:
    nameset = set(names)
    for n in names:
        if n.endswith(suffixes) and module_of(n) + ".weight" not in nameset:
            raise FormatError(f"{g.where(n)} belongs to {module_of(n)}.weight, which is not in the checkpoint")


class BlockLayout:
    name = "fp8"
    quant_methods = ("fp8",)
    schemes = frozenset({"FP8_BLOCK"})

    def writer(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> BlockWriter:
        return BlockWriter(scheme, cfg, skip, options)

    def read(self, st, cfg: dict, origin: str) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
        qc = quantization_config(cfg)
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise FormatError(f"{origin}: FP8 fmt {fmt!r} is not supported (e4m3 only)")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise FormatError(f"{origin}: activation_scheme {qc.get('activation_scheme')!r} is not supported "
                              "(static activation scales would be ignored; only 'dynamic')")
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise FormatError(f"{origin}: weight_block_size must be two positive integers, got {block!r}")
        g = Group(st)
        names = st.names()
        _orphans(g, names, (".weight_scale_inv", ".activation_scale", ".input_scale"))
        for name in names:
            if name.endswith((".weight_scale_inv", ".activation_scale", ".input_scale")):
                continue
            info = st.info(name)
            if name.endswith(".weight") and info.torch_dtype == E4M3:
                yield name, decode_block(g, name, f"{module_of(name)}.weight_scale_inv", tuple(block))
            else:
                yield name, st.read(name)


def _ct_strategies(qc: dict, origin: str) -> dict[str, Any]:
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{origin}: compressed-tensors quantization_config has no config_groups")
    out: dict[str, Any] = {}
    for gname, grp in groups.items():
        gfmt = grp.get("format") or fmt
        if gfmt != "float-quantized":
            raise FormatError(f"{origin}: compressed-tensors format {gfmt!r} (config_groups.{gname}) is not supported "
                              "(float-quantized only)")
        wt = grp.get("weights") or {}
        if wt.get("type") != "float" or wt.get("num_bits") != 8:
            raise FormatError(f"{origin}: config_groups.{gname}.weights must be 8-bit float, got "
                              f"type {wt.get('type')!r} num_bits {wt.get('num_bits')!r}")
        if not wt.get("symmetric", True):
            raise FormatError(f"{origin}: config_groups.{gname}: asymmetric FP8 weights are not supported")
        strat = wt.get("strategy")
        if strat not in ("tensor", "channel", "block"):
            raise FormatError(f"{origin}: config_groups.{gname}.weights.strategy {strat!r} is not supported (tensor, channel, block)")
        act = grp.get("input_activations")
        if act is not None and not act.get("dynamic", False):
            raise FormatError(f"{origin}: config_groups.{gname} has static input activation scales, which are not supported")
        out[strat] = wt.get("block_structure")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise FormatError(f"{origin}: quantization_status {qc.get('quantization_status')!r}: only compressed checkpoints are read")
    return out


def decode_ct(g: Group, name: str, strategies: dict[str, Any]) -> QTensor:
    w = _read_weight(g, name)
    key = f"{module_of(name)}.weight_scale"
    s = g.get(key, needed_by=name)
    out, inn = w.shape
    if s.numel() == 1 and "tensor" in strategies:
        return QTensor("FP8_TENSOR", (out, inn), {"weight": w, "weight_scale": s.reshape(()).to(torch.float32)},
                       {"granularity": "tensor"})
    if tuple(s.shape) in ((out, 1), (out,)) and "channel" in strategies:
        return QTensor("FP8_CHANNEL", (out, inn), {"weight": w, "weight_scale": s.reshape(out, 1).to(torch.float32)},
                       {"granularity": "channel"})
    if "block" in strategies:
        return decode_block(g, name, key, tuple(strategies["block"] or (BLOCK, BLOCK)))
    raise FormatError(f"{g.where(key)}: shape {list(s.shape)} fits none of the config's strategies {sorted(strategies)}")


class CompressedTensorsLayout:
    name = "compressed-tensors"
    quant_methods = ("compressed-tensors",)
    schemes = frozenset({"FP8_TENSOR", "FP8_CHANNEL", "FP8", "FP8_BLOCK"})

    def writer(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> CtWriter:
        return CtWriter(scheme, cfg, skip, options)

    def read(self, st, cfg: dict, origin: str) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
        strategies = _ct_strategies(quantization_config(cfg), origin)
        g = Group(st)
        names = st.names()
        _orphans(g, names, (".weight_scale", ".weight_zero_point", ".input_scale"))
        for name in names:
            if name.endswith((".weight_scale", ".input_scale")):
                continue
            if name.endswith(".weight_zero_point"):
                raise FormatError(f"{g.where(name)}: zero points (asymmetric FP8) are not supported")
            info = st.info(name)
            if name.endswith(".weight") and info.torch_dtype == E4M3:
                yield name, decode_ct(g, name, strategies)
            else:
                yield name, st.read(name)


BLOCK_LAYOUT = BlockLayout()
CT_LAYOUT = CompressedTensorsLayout()
