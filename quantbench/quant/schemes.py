"""Registry of the data-free, non-GGML schemes: HQQ, AFQ, FP8, F8Q8, MXFP4, bitsandbytes.

Why a second registry: GGML types are rows of fixed-size byte blocks, these schemes are sets of
named tensors with their own layouts (documented in each module). ``quantbench.quant.quantize``
and ``quantbench.quant.dequantize`` send every name that is not a GGML type here.

Names follow mistral.rs's ISQ spelling where it has one (``HQQ4``, ``HQQ8``, ``AFQ2``..``AFQ8``,
``FP8``, ``F8Q8``); mistral.rs's ``MXFP4`` ISQ is ``MXFP4_ISQ`` here because ``MXFP4`` is already
GGML's type (``Scheme.isq_name`` keeps mistral.rs's spelling). Group-size variants of AFQ are
``AFQ<b>_G32`` / ``AFQ<b>_G128`` (plain ``AFQ<b>`` is group 64, mistral.rs's default).

Every scheme checks its input once, here: finite values only (``InputValueError`` naming the
tensor), at least one element; shape constraints are checked by the scheme module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from quantbench.errors import InputValueError, ShapeError, UnknownTypeError
from quantbench.quant import afq, bnb, f8q8, fp8, hqq, mxfp4_ocp
from quantbench.quant.qtensor import QTensor

# mistral.rs QuantizedSerdeType values (UQFF record type).
UQFF_HQQ, UQFF_FP8, UQFF_AFQ, UQFF_F8Q8, UQFF_MXFP4 = 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Scheme:
    """One named quantization type.

    ``fixed`` are the parameters the name stands for (bits, group size, ...); ``quantize`` may be
    given only the scheme's ``tunable`` keywords on top (e.g. HQQ's ``optimization_steps``).
    """

    name: str
    family: str
    fixed: dict[str, Any]
    constraints: str
    _quantize: Callable[..., QTensor]
    _dequantize: Callable[[QTensor], torch.Tensor]
    _bpw: Callable[[tuple[int, ...], torch.dtype], float]
    tunable: tuple[str, ...] = ()
    isq_name: str | None = None
    uqff_type: int | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def quantize(self, w: torch.Tensor, *, name: str = "tensor", **params: Any) -> QTensor:
        """Quantize ``w`` (``[out, in]`` or any shape the scheme allows), on ``w``'s device."""
        unknown = sorted(set(params) - set(self.tunable))
        if unknown:
            raise UnknownTypeError(
                f"{name}: {self.name} does not take {', '.join(unknown)}; tunable: {', '.join(self.tunable) or 'nothing'}"
            )
        if not torch.is_tensor(w) or not (w.is_floating_point()):
            raise InputValueError(f"{name}: {self.name} quantizes floating-point tensors, got {getattr(w, 'dtype', type(w))}")
        if w.ndim == 0 or w.numel() == 0:
            raise ShapeError(f"{name}: cannot quantize an empty or scalar tensor (shape {tuple(w.shape)})")
        if not bool(torch.isfinite(w).all()):
            raise InputValueError(f"{name}: contains NaN or inf values; {self.name} cannot represent them")
        q = self._quantize(w, name=name, **self.fixed, **params)
        return dataclasses.replace(q, qtype=self.name)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """Float32 tensor of ``q``'s logical shape, on ``q``'s device."""
        return self._dequantize(q)

    def bits_per_weight(self, shape: tuple[int, ...], weight_dtype: torch.dtype = torch.bfloat16) -> float:
        """Storage bits per weight for a tensor of ``shape``, counting every scale/zero/map byte.

        ``weight_dtype`` matters only where the scales take the weight's dtype (AFQ).
        """
        return self._bpw(tuple(shape), weight_dtype)


_SCHEMES: dict[str, Scheme] = {}


def _add(s: Scheme) -> None:
    if s.name in _SCHEMES:
        raise ValueError(f"scheme {s.name} registered twice")
    _SCHEMES[s.name] = s


def _register_all() -> None:
    for bits in hqq.SUPPORTED_BITS:
        _add(Scheme(
            name=f"HQQ{bits}", family="hqq",
            fixed={"bits": bits, "group_size": hqq.ISQ_GROUP_SIZE, "axis": 0},
            tunable=("optimization_steps", "round_zeros", "beta_schedule"),
            constraints=f"numel divisible by {hqq.ISQ_GROUP_SIZE}",
            _quantize=hqq.quantize, _dequantize=hqq.dequantize,
            _bpw=lambda shape, dt, b=bits: hqq.bits_per_weight(shape, b, hqq.ISQ_GROUP_SIZE, 0),
            isq_name=f"HQQ{bits}" if bits in (4, 8) else None, uqff_type=UQFF_HQQ,
            description=f"HQQ {bits}-bit, group 64 along axis 0, {hqq.ISQ_OPT_STEPS} proximal steps (mistral.rs ISQ)",
        ))
    for bits in afq.SUPPORTED_BITS:
        for gs in afq.SUPPORTED_GROUPS:
            nm = f"AFQ{bits}" if gs == 64 else f"AFQ{bits}_G{gs}"
            _add(Scheme(
                name=nm, family="afq", fixed={"bits": bits, "group_size": gs}, tunable=("scale_dtype", "rule"),
                constraints=f"last dim divisible by {gs}",
                _quantize=afq.quantize, _dequantize=afq.dequantize,
                _bpw=lambda shape, dt, b=bits, g=gs: afq.bits_per_weight(shape, b, g, afq.scale_bytes(dt)),
                isq_name=nm if (gs == 64 and bits in afq.MISTRALRS_BITS) else None,
                uqff_type=UQFF_AFQ if bits in afq.MISTRALRS_BITS else None,
                description=f"MLX affine {bits}-bit, group {gs}, bf16/f16 scales+biases (rule=mistralrs: mistral.rs ISQ)",
            ))
    fp8_variants = (
        ("FP8", "mistralrs", "FP8", UQFF_FP8, "mistral.rs FP8 ISQ: per-tensor e4m3 via bf16, scale 416/amax clamped to 416"),
        ("FP8_TENSOR", "tensor", None, None, "e4m3 with one float32 scale (amax/448)"),
        ("FP8_CHANNEL", "channel", None, None, "e4m3 with one float32 scale per output row"),
        ("FP8_BLOCK", "block", None, None, "e4m3 with float32 weight_scale_inv per 128x128 block (DeepSeek-V3)"),
    )
    for nm, gran, isq, uq, desc in fp8_variants:
        _add(Scheme(
            name=nm, family="fp8", fixed={"granularity": gran},
            constraints="2-D weight" if gran in ("channel", "block") else "any shape",
            _quantize=fp8.quantize, _dequantize=fp8.dequantize,
            _bpw=lambda shape, dt, g=gran: fp8.bits_per_weight(shape, g),
            isq_name=isq, uqff_type=uq, description=desc,
        ))
    _add(Scheme(
        name="F8Q8", family="f8q8", fixed={}, constraints="any shape (flattened, zero-padded to 32)",
        _quantize=f8q8.quantize, _dequantize=f8q8.dequantize, _bpw=lambda shape, dt: f8q8.bits_per_weight(shape),
        isq_name="F8Q8", uqff_type=UQFF_F8Q8, description="33-byte blocks of 32: e4m3 scale (x416) + 32 int8",
    ))
    for nm, rule, isq, uq, desc in (
        ("MXFP4_ISQ", "mistralrs", "MXFP4", UQFF_MXFP4, "mistral.rs MXFP4 ISQ: E8M0 = floor(log2(amax/6)), ties up"),
        ("MXFP4_OCP", "ocp", None, UQFF_MXFP4, "OCP MX: E8M0 = floor(log2(amax)) - 2, saturating RNE E2M1"),
    ):
        _add(Scheme(
            name=nm, family="mxfp4", fixed={"rule": rule}, constraints="last dim divisible by 32",
            _quantize=mxfp4_ocp.quantize, _dequantize=mxfp4_ocp.dequantize, _bpw=lambda shape, dt: mxfp4_ocp.bits_per_weight(shape),
            isq_name=isq, uqff_type=uq, description=desc,
        ))
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            nm = qt.upper() + ("_DQ" if dq else "")
            _add(Scheme(
                name=nm, family="bnb", fixed={"quant_type": qt, "blocksize": 64, "double_quant": dq},
                constraints="any shape (flattened, blocks of 64)",
                _quantize=bnb.quantize_4bit, _dequantize=bnb.dequantize_4bit,
                _bpw=lambda shape, dt, d=dq: bnb.bits_per_weight_4bit(shape, 64, d),
                description=f"bitsandbytes {qt.upper()} blocksize 64" + (", absmax double-quantized (256)" if dq else ""),
            ))
    _add(Scheme(
        name="INT8", family="bnb", fixed={}, tunable=("threshold",), constraints="2-D weight, float16 range",
        _quantize=bnb.quantize_int8, _dequantize=bnb.dequantize_int8, _bpw=lambda shape, dt: bnb.bits_per_weight_int8(shape),
        description="bitsandbytes LLM.int8: row-wise absmax int8 (CB) + float32 SCB; outlier threshold 6.0 at run time",
    ))


_register_all()


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name`` (case-insensitive)."""
    key = name.upper()
    if key not in _SCHEMES:
        raise UnknownTypeError(f"unknown quantization scheme {name!r}; known: {', '.join(sorted(_SCHEMES))}")
    return _SCHEMES[key]


def is_scheme(name: str) -> bool:
    return name.upper() in _SCHEMES


def all_schemes() -> list[Scheme]:
    return list(_SCHEMES.values())


def quantize(w: torch.Tensor, qtype: str, *, name: str = "tensor", **params: Any) -> QTensor:
    return get_scheme(qtype).quantize(w, name=name, **params)


def dequantize(q: QTensor) -> torch.Tensor:
    return get_scheme(q.qtype).dequantize(q)


def reconstruction_error(w: torch.Tensor, q: QTensor | torch.Tensor) -> dict[str, float]:
    """How far the dequantized tensor is from ``w``: rmse, relative rmse (‖Δ‖/‖w‖), max |Δ|, mean |Δ|.

    ``q`` may be a QTensor of any registered type (GGML included, through the public dispatcher)
    or an already dequantized tensor.
    """
    if isinstance(q, QTensor):
        from quantbench.quant.registry import dequantize as any_dequantize

        r = any_dequantize(q)
    else:
        r = q
    ref = w.to(torch.float32)
    d = (r.to(device=ref.device, dtype=torch.float32) - ref).reshape(-1)
    norm = float(ref.norm())
    return {
        "rmse": float(d.pow(2).mean().sqrt()),
        "rel_rmse": float(d.norm()) / norm if norm > 0 else float(d.norm()),
        "max_abs": float(d.abs().max()),
        "mae": float(d.abs().mean()),
    }
