"""Registry of quantization types keyed by name, with their block geometry in one table.

Block math lives in the scheme modules; this file only knows how to find a type and how to
move between a logical tensor and its rows of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from quantbench.errors import ShapeError, UnknownTypeError, InputValueError, ImatrixError
from quantbench.quant.qtensor import QTensor

QuantizeRows = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
DequantizeBlocks = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GGMLType:
    """A GGML tensor type.

    ``quantize_rows(x, qw)`` takes float32 ``[rows, n_per_row]`` and the optional per-column
    importance ``[n_per_row]`` and returns uint8 ``[rows, n_per_row // block_size * type_size]``,
    exactly as ``ggml_quantize_chunk`` would. ``dequantize_blocks`` maps uint8
    ``[nblocks, type_size]`` to float32 ``[nblocks, block_size]``.
    """

    name: str
    ggml_id: int
    block_size: int
    type_size: int
    quantize_rows: QuantizeRows
    dequantize_blocks: DequantizeBlocks
    uses_imatrix: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size


_TYPES: dict[str, GGMLType] = {}
_BY_ID: dict[int, GGMLType] = {}


def register(t: GGMLType) -> GGMLType:
    if t.name in _TYPES:
        raise ValueError(f"type {t.name} registered twice")
    _TYPES[t.name] = t
    _BY_ID[t.ggml_id] = t
    return t


def _ensure_loaded() -> None:
    # Importing the package registers every GGML type module.
    import quantbench.quant.ggml  # noqa: F401


def get_type(name: str) -> GGMLType:
    _ensure_loaded()
    key = name.upper()
    if key not in _TYPES:
        raise UnknownTypeError(f"unknown quantization type {name!r}; known: {', '.join(sorted(_TYPES))}")
    return _TYPES[key]


def get_type_by_id(ggml_id: int) -> GGMLType:
    _ensure_loaded()
    if ggml_id not in _BY_ID:
        raise UnknownTypeError(f"GGML type id {ggml_id} is not supported by quantbench")
    return _BY_ID[ggml_id]


def all_types() -> list[GGMLType]:
    _ensure_loaded()
    return list(_TYPES.values())


def is_ggml_type(name: str) -> bool:
    """Whether ``name`` is a GGML type (the rest belong to :mod:`quantbench.quant.schemes`)."""
    _ensure_loaded()
    return name.upper() in _TYPES


def quantize(
    weight: torch.Tensor,
    qtype: str,
    imatrix: torch.Tensor | None = None,
    *,
    name: str = "tensor",
    **params,
) -> QTensor:
    """Quantize ``weight`` (any float dtype, any device) to ``qtype``, rows along the last dim.

    ``imatrix`` holds one importance value per column (``weight.shape[-1]``), as llama.cpp's
    ``quant_weights``; types whose quantizer ignores it in llama.cpp ignore it here too.
    Names that are not GGML types go to the data-free schemes (:mod:`quantbench.quant.schemes`),
    which take no importance matrix and accept their scheme's tunable ``params``.
    """
    if not is_ggml_type(qtype):
        from quantbench.quant import schemes

        if schemes.is_scheme(qtype):
            if imatrix is not None:
                raise ImatrixError(f"{name}: {qtype.upper()} is data-free and does not use an importance matrix")
            return schemes.quantize(weight, qtype, name=name, **params)
        known = sorted(_TYPES) + sorted(sc.name for sc in schemes.all_schemes())
        raise UnknownTypeError(f"{name}: unknown quantization type {qtype!r}; known: {', '.join(known)}")
    if params:
        raise UnknownTypeError(f"{name}: GGML type {qtype} takes no options ({', '.join(sorted(params))})")
    t = get_type(qtype)
    if weight.ndim == 0:
        raise ShapeError(f"{name}: cannot quantize a scalar")
    n_per_row = weight.shape[-1]
    if n_per_row % t.block_size:
        raise ShapeError(
            f"{name}: row length {n_per_row} is not a multiple of {t.name}'s block size {t.block_size}"
        )
    x = weight.reshape(-1, n_per_row).to(torch.float32)
    if t.block_size > 1 and not torch.isfinite(x).all():
        raise InputValueError(f"{name}: contains NaN or inf values; {t.name} cannot represent them")
    qw = None
    if imatrix is not None:
        qw = imatrix.reshape(-1).to(device=x.device, dtype=torch.float32)
        if qw.numel() != n_per_row:
            raise ImatrixError(f"{name}: importance matrix has {qw.numel()} values, tensor rows have {n_per_row}")
    data = quantize_rows(t, x.contiguous(), qw)
    return QTensor(t.name, tuple(weight.shape), {"data": data})


def quantize_rows(t: GGMLType, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """``t.quantize_rows`` on whatever device ``x`` lives on: the one entry point jobs call.

    Block types on CUDA go through cached CUDA graphs (same kernels, same bytes, one launch:
    see :mod:`quantbench.quant.cuda_graphs`).
    """
    if x.is_cuda and t.block_size > 1:
        from quantbench.quant import cuda_graphs

        return cuda_graphs.quantize_rows(t, x, qw)
    return t.quantize_rows(x, qw)


def dequantize(q: QTensor) -> torch.Tensor:
    """Float32 tensor of ``q``'s logical shape, on ``q``'s device."""
    if not is_ggml_type(q.qtype):
        from quantbench.quant import schemes

        if schemes.is_scheme(q.qtype):
            return schemes.dequantize(q)
    t = get_type(q.qtype)
    blocks = q.data.reshape(-1, t.type_size)
    return t.dequantize_blocks(blocks).reshape(q.shape)
