"""HQQ: half-quadratic zero-point optimisation, laid out exactly as mistral.rs's ``HqqLayer``.

Why this layout: a UQFF HQQ record (serde type 2) is nothing but these tensors, so the UQFF
writer only has to name and serialize them.

Grouping ("strided groups"). The whole tensor is flattened row-major and reshaped to
``[group_size, numel // group_size]`` for ``axis=0`` (mistral.rs's ISQ setting): column ``j`` of
that matrix is one group and holds elements ``j, j + N, j + 2N, ...`` of the flat tensor, with
``N = numel // group_size``. ``axis=1`` reshapes to ``[numel // group_size, group_size]`` (each
row a group of consecutive elements). Min/max, scale and zero are taken along ``axis``.

Quantization (mistral.rs ``HqqLayer::quantize`` → ``optimize_weights_proximal_legacy``, which
follows hqq's ``Quantizer.quantize``): ``scale = clamp((2^b - 1) / (max - min), 0, 2e4)`` (an
inverse scale: ``q = round(w * scale + zero)``), ``zero = -min * scale`` (optionally rounded),
then the proximal solver refines the zero-point only::

    repeat steps times:
        wq = clamp(round(w * scale + zero), 0, 2^b - 1);  wr = (wq - zero) / scale
        we = shrink_lp(w - wr, beta, p)      # sign(x) * relu(|x| - |x|^(p-1) / beta)
        zero = mean(wq - (w - we) * scale, axis)
        beta *= kappa                        # mistral.rs; hqq 0.2.8's legacy solver keeps beta
        stop after this update once mean|w - wr| stops decreasing

with p = 0.7, beta = 10, kappa = 1.01; mistral.rs ISQ runs 10 steps (``None``/0 means 20).
The solver is written without host syncs (a boolean "still running" tensor instead of
``break``), which gives the same numbers on CPU and CUDA.

QTensor tensors (names = mistral.rs fields; UQFF keys in brackets):

* ``w_q`` [``{prefix}.weight``]: the packed codes, packed along dim 0 of the grouped matrix
  (hqq ``BitPack``): 8-bit ``uint8 [rows, N]``; 4-bit ``uint8 [rows/2, N]`` with
  ``(row i << 4) | row i + rows/2``; 2-bit ``uint8 [rows/4, N]`` with quarters at shifts
  6, 4, 2, 0; 1-bit ``uint8 [rows/8, N]``, eighths at shifts 7..0; 3-bit ``int32
  [ceil(rows/10), N]``: rows zero-padded to a multiple of 10, tenths at shifts 27, 24, ..., 0.
* ``scales`` [``{prefix}.weight.scales``]: float32, the stored inverse of the solver scale
  (the dequant multiplier), shape ``[1, N]`` (axis 0) or ``[numel/group_size, 1]`` (axis 1).
* ``zeros`` [``{prefix}.weight.zeros``]: float32, same shape; ``w = (q - zero) * scale``.

``params``: ``bits``, ``group_size``, ``axis``, ``optimization_steps`` (0 = None, as UQFF
stores it), ``round_zeros``, ``channel_wise`` (always True here), ``beta_schedule``; ``shape``
is the QTensor's own (UQFF ``{prefix}.weight.shape``).
"""

from __future__ import annotations

import torch

from quantbench.errors import ShapeError, UnknownTypeError
from quantbench.quant.qtensor import QTensor

SUPPORTED_BITS = (2, 3, 4, 8)
ISQ_GROUP_SIZE = 64
ISQ_OPT_STEPS = 10
DEFAULT_OPT_STEPS = 20  # mistral.rs's OPTIMIZER_HQQ_DEFAULT_STEPS, used when steps is None/0
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
SCALE_CLAMP = 2e4


def _grouped_shape(numel: int, group_size: int, axis: int) -> tuple[int, int]:
    return (group_size, numel // group_size) if axis == 0 else (numel // group_size, group_size)


def check_config(shape: tuple[int, ...], bits: int, group_size: int, axis: int, name: str) -> None:
    """Raise a typed error for any HQQ configuration mistral.rs (or the packing) would reject."""
    if bits not in SUPPORTED_BITS:
        raise UnknownTypeError(f"{name}: HQQ supports {SUPPORTED_BITS} bits, not {bits}")
    if axis not in (0, 1):
        raise ShapeError(f"{name}: HQQ axis must be 0 or 1, not {axis}")
    numel = 1
    for s in shape:
        numel *= s
    if group_size <= 0 or numel % group_size:
        raise ShapeError(f"{name}: HQQ group size {group_size} does not divide the tensor's {numel} elements")
    rows = _grouped_shape(numel, group_size, axis)[0]
    per_byte = {1: 8, 2: 4, 4: 2}.get(bits, 1)
    if rows % per_byte:
        raise ShapeError(f"{name}: HQQ {bits}-bit packing needs the {rows} grouped rows to be a multiple of {per_byte}")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-threshold for the l_p norm (p < 1): the proximal step of HQQ."""
    a = x.abs()
    if p == 1.0:
        return torch.sign(x) * torch.relu(a - 1.0 / beta)
    return torch.sign(x) * torch.relu(a - (1.0 / beta) * a.pow(p - 1.0))


def optimize_zero(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    max_v: float,
    axis: int,
    steps: int,
    *,
    lp_norm: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
    beta_schedule: bool = True,
) -> torch.Tensor:
    """Run the proximal zero-point solver; returns the final zero (scale is not changed)."""
    best = torch.tensor(float("inf"), device=w.device)
    running = torch.tensor(True, device=w.device)
    b = beta  # data-independent, so it stays a host float (1/beta rounds to float32 once, as in both peers)
    for _ in range(steps):
        wq = torch.round(w * scale + zero).clamp(0.0, max_v)
        wr = (wq - zero) / scale
        we = shrink_lp(w - wr, b, lp_norm)
        new_zero = torch.mean(wq - (w - we) * scale, dim=axis, keepdim=True)
        zero = torch.where(running, new_zero, zero)
        if beta_schedule:
            b = b * kappa
        err = (w - wr).abs().mean()
        improved = err < best
        best = torch.where(running & improved, err, best)
        running = running & improved
    return zero


def _pack(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """hqq/mistral.rs bit packing along dim 0 of the grouped code matrix."""
    rows = wq.shape[0]
    if bits == 8:
        return wq.to(torch.uint8)
    if bits == 3:
        padded = -(-rows // 10) * 10
        v = torch.zeros((padded, wq.shape[1]), dtype=torch.int32, device=wq.device)
        v[:rows] = wq.to(torch.int32)
        step = padded // 10
        out = torch.zeros((step, wq.shape[1]), dtype=torch.int32, device=wq.device)
        for i in range(10):
            out |= v[i * step : (i + 1) * step] << (27 - 3 * i)
        return out
    per = 8 // bits
    step = rows // per
    v = wq.to(torch.uint8)
    out = torch.zeros((step, wq.shape[1]), dtype=torch.uint8, device=wq.device)
    for i in range(per):
        out |= v[i * step : (i + 1) * step] << (8 - bits * (i + 1))
    return out


def _unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: float32 codes ``[rows, N]``."""
    if bits == 8:
        return packed.to(torch.float32)
    if bits == 3:
        p = packed.to(torch.int32)
        parts = [(p >> (27 - 3 * i)) & 0x7 for i in range(10)]
        return torch.cat(parts, dim=0)[:rows].to(torch.float32)
    per = 8 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.uint8)
    parts = [(p >> (8 - bits * (i + 1))) & mask for i in range(per)]
    return torch.cat(parts, dim=0).to(torch.float32)


def quantize(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int = ISQ_GROUP_SIZE,
    axis: int = 0,
    optimization_steps: int | None = ISQ_OPT_STEPS,
    round_zeros: bool = False,
    beta_schedule: bool = True,
    name: str = "tensor",
) -> QTensor:
    """HQQ-quantize ``w`` (any float dtype/device) the way mistral.rs's ISQ does."""
    shape = tuple(w.shape)
    check_config(shape, bits, group_size, axis, name)
    wf = w.to(torch.float32).reshape(_grouped_shape(w.numel(), group_size, axis))
    mn = wf.amin(dim=axis, keepdim=True)
    mx = wf.amax(dim=axis, keepdim=True)
    max_v = float(round(2**bits - 1))
    scale = (max_v / (mx - mn)).clamp(0.0, SCALE_CLAMP)
    zero = -mn * scale
    if round_zeros:
        zero = torch.round(zero)
    steps = optimization_steps if optimization_steps else DEFAULT_OPT_STEPS
    zero = optimize_zero(wf, scale, zero, max_v, axis, steps, beta_schedule=beta_schedule)
    wq = torch.round(wf * scale + zero).clamp(0.0, max_v)
    tensors = {"w_q": _pack(wq, bits), "scales": 1.0 / scale, "zeros": zero}
    params = {
        "bits": bits,
        "group_size": group_size,
        "axis": axis,
        "optimization_steps": int(optimization_steps or 0),
        "round_zeros": bool(round_zeros),
        "channel_wise": True,
        "beta_schedule": bool(beta_schedule),
    }
    return QTensor("", shape, tensors, params)


def dequantize(q: QTensor) -> torch.Tensor:
    """``(q - zero) * scale`` per group, back to the logical shape, float32."""
    p = q.params
    numel = q.numel
    rows, _ = _grouped_shape(numel, p["group_size"], p["axis"])
    codes = _unpack(q.tensors["w_q"], p["bits"], rows)
    w = (codes - q.tensors["zeros"].to(torch.float32)) * q.tensors["scales"].to(torch.float32)
    return w.reshape(q.shape)


def bits_per_weight(shape: tuple[int, ...], bits: int, group_size: int = ISQ_GROUP_SIZE, axis: int = 0) -> float:
    """Packed codes plus float32 scale and zero per group, per weight."""
    numel = 1
    for s in shape:
        numel *= s
    rows, cols = _grouped_shape(numel, group_size, axis)
    if bits == 3:
        code_bytes = -(-rows // 10) * cols * 4
    else:
        code_bytes = rows * bits // 8 * cols
    groups = numel // group_size
    return 8.0 * (code_bytes + 2 * 4 * groups) / numel
