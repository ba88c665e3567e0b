"""GPU kernels for the engine's packed weights (Triton), behind checks that keep CPU installs working.

Triton is imported only when a kernel is about to run on CUDA, so a CPU-only torch without
Triton never touches it; :func:`has_dequant_kernel` answers False there and the caller keeps the
torch reference path.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch

from quantbench.errors import ShapeError
from quantbench.quant.qtensor import QTensor

# GGML types with a Triton kernel in :mod:`.ggml_dequant` (kept here so asking costs no import).
DEQUANT_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4",
                           "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# QUANTBENCH_TRITON=0 keeps CUDA weights on the torch reference path (to compare, or to rule the
# kernels out when chasing a bug); :func:`set_enabled` does the same at run time.
_enabled = os.environ.get("QUANTBENCH_TRITON", "1") != "0"


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def has_dequant_kernel(q: QTensor, dtype: torch.dtype) -> bool:
    """Whether :func:`dequantize` can unpack ``q`` to ``dtype`` on its device."""
    return (_enabled and q.qtype in DEQUANT_TYPES and dtype in OUT_DTYPES and "data" in q.tensors
            and q.data.is_cuda and triton_available())


def _rows(q: QTensor) -> tuple[torch.Tensor, int, int]:
    """``q``'s packed bytes checked against its shape: (contiguous data, rows, row length ``k``)."""
    from quantbench.engine.kernels.ggml_dequant import TYPES

    kt = TYPES[q.qtype]
    if not q.shape or q.shape[-1] % kt.block_size:
        raise ShapeError(f"{q.qtype} tensor of shape {tuple(q.shape)}: the last dimension must be a "
                         f"multiple of the block size {kt.block_size}")
    k = q.shape[-1]
    rows = q.numel // k if k else 0
    row_bytes = k // kt.block_size * kt.type_size
    data = q.data
    if data.dtype != torch.uint8 or data.numel() != rows * row_bytes:
        raise ShapeError(f"{q.qtype} tensor of shape {tuple(q.shape)}: packed data holds {data.numel()} "
                         f"{data.dtype} values, expected {rows * row_bytes} uint8 ({rows} rows of {row_bytes} bytes)")
    return data.contiguous(), rows, k


class _Prepared:
    """A weight's checked launch plan, kept per packed tensor: decode calls every layer every
    token, and redoing the checks and shape arithmetic in Python cost as much as the launch."""

    __slots__ = ("ref", "data", "plan", "table", "gemv_cfg")

    def __init__(self, q: QTensor) -> None:
        from quantbench.engine.kernels import ggml_dequant as gd

        data, rows, k = _rows(q)
        self.ref = weakref.ref(q.data)
        # a copy made by .contiguous() is kept here; the common case (contiguous) keeps nothing extra
        self.data = None if data is q.data else data
        self.plan = gd.plan(q.qtype, rows, k)
        self.table = gd._table(q.qtype, gd.TYPES[q.qtype], data.device)
        self.gemv_cfg = _gemv_config(q.qtype, self.plan.rows, k, self.plan.n_tiles, self.plan.kt.sub_b)


_PREPARED: dict[int, _Prepared] = {}


def _prepared(q: QTensor) -> tuple[_Prepared, torch.Tensor]:
    data = q.data
    p = _PREPARED.get(id(data))
    if p is None or p.ref() is not data:
        if len(_PREPARED) > 8192:  # per-call views (expert slices) would otherwise pile up
            _PREPARED.clear()
        p = _Prepared(q)
        _PREPARED[id(data)] = p
    return p, (data if p.data is None else p.data)


def dequantize(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """``quantbench.quant.dequantize(q).to(dtype)`` in one Triton launch (same values, bit for bit)."""
    from quantbench.engine.kernels.ggml_dequant import run_dequant

    p, data = _prepared(q)
    out = run_dequant(p.plan, data, p.table, dtype)
    return out if len(q.shape) == 2 else out.reshape(q.shape)


# Decode GEMV launch shape: (rows per program, K splits, tiles issued per loop step, warps).
GemvConfig = tuple[int, int, int, int]
_GEMV_OVERRIDES: dict[tuple[str, int, int], GemvConfig] = {}


def set_gemv_config(qtype: str, rows: int, k: int, cfg: GemvConfig | None) -> None:
    """Pin the GEMV launch shape for one weight shape (benchmarks install measured bests).

    Takes effect for weights first seen afterwards (launch plans are kept per weight)."""
    if cfg is None:
        _GEMV_OVERRIDES.pop((qtype, rows, k), None)
    else:
        _GEMV_OVERRIDES[(qtype, rows, k)] = tuple(int(v) for v in cfg)  # type: ignore[assignment]
    _PREPARED.clear()


def _gemv_config(qtype: str, rows: int, k: int, n_tiles: int, tile_b: int) -> GemvConfig:
    """Launch shape picked from the H100 sweep in benchmarks/NOTES.md ("engine CUDA dequant").

    16x16 tiles (Q2_K/Q3_K/Q6_K) did best with 8 rows a program, 8x32 tiles (Q4_K and the
    rest) with 16; wide matrices want no K split, short ones a split to fill the 132 SMs.
    """
    cfg = _GEMV_OVERRIDES.get((qtype, rows, k))
    if cfg is not None:
        return cfg
    small_tiles = tile_b == 16
    br = 8 if small_tiles else 16
    if rows >= 8192 or n_tiles < 16:
        return br, 1, 1, 4
    if rows >= 2048:
        if n_tiles < 32:
            return br, 1, 1, 4
        return (br, 2, 1, 4) if small_tiles else (br, 4, 2, 4)
    return br, 4, 4, 4


def can_gemv(x: torch.Tensor, q: QTensor) -> bool:
    """Whether :func:`gemv` takes ``F.linear(x, q)``: one input row, a 2-D packed CUDA weight."""
    return (_enabled and x.is_cuda and x.numel() == x.shape[-1] and x.dtype in OUT_DTYPES and len(q.shape) == 2
            and q.qtype in DEQUANT_TYPES and "data" in q.tensors and q.data.is_cuda
            and x.shape[-1] == q.shape[1] and triton_available())


def gemv(x: torch.Tensor, q: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(q), bias)`` for a single input row without materializing the weight."""
    from quantbench.engine.kernels.ggml_dequant import run_gemv

    p, data = _prepared(q)
    br, split, unroll, warps = p.gemv_cfg
    xv = x.reshape(-1)
    if not xv.is_contiguous():
        xv = xv.contiguous()
    y = run_gemv(p.plan, data, p.table, xv, bias, br, split, warps, unroll)
    return y.view(*x.shape[:-1], p.plan.rows)
