"""AFQ: MLX's affine group quantization, in MLX's (and mistral.rs's ``AfqLayer``) layout.

Why MLX's exact rule: mistral.rs ports MLX's kernels, and MLX checkpoints (``weight`` /
``scales`` / ``biases``) are this same triple, so one implementation serves UQFF type 4 and the
MLX checkpoint layout.

Rule, per group of ``group_size`` consecutive elements along the last dim (MLX
``fast::Quantize::eval_cpu``, float32 arithmetic)::

    n_bins = 2^bits - 1
    side   = |min| > |max|                     # the edge with the larger magnitude
    scale  = max((max - min) / n_bins, 1e-7);  scale = side ? scale : -scale
    edge   = side ? min : max
    q0     = rint(edge / scale)
    if q0 != 0: scale = edge / q0; bias = edge   # "edge snapping": 0 lands exactly on code -q0
    else:       bias = 0
    q      = clamp(rint((w - bias) / scale), 0, n_bins)
    w'     = scale * q + bias

The codes are quantized with the float32 scale; ``scales``/``biases`` are then stored in
``scale_dtype`` (MLX and mistral.rs keep the weight's dtype; default here: the input's dtype when
it is float16/bfloat16/float32). An all-zero group gets ``scale=-1e-7, bias=0`` and decodes to 0.

``rule="mistralrs"`` is mistral.rs's own AFQ ISQ on CPU (``afq/ops.rs`` ``cpu_backend``), which
UQFF files must reproduce to give mistral.rs's text: plain min/max, no sign trick or snapping::

    scale = (max - min) / n_bins   (1.0 when max - min < 1e-12);  bias = min
    q     = clamp(round_half_away((w - bias) / scale), 0, n_bins)

Packing: each row is one little-endian LSB-first bitstream — element ``j`` occupies bits
``j*bits .. j*bits+bits-1`` — stored as ``uint32 [.., in * bits / 32]``. For 2/4/8 bits this is
MLX's "element k of a word at shift k*bits"; for 3/5/6 bits it is byte-for-byte MLX's 3/5-byte
packs viewed as uint32 (checked against ``mlx`` in the tests).

QTensor tensors (mistral.rs ``AfqLayer`` fields; MLX / UQFF names in brackets):
``w_q`` [``weight``] uint32 ``[*lead, in*bits/32]``; ``scales`` [``scales``] and ``biases``
[``biases``] ``[*lead, in/group_size]``. ``params``: ``bits``, ``group_size``.
mistral.rs's UQFF AFQ serializer knows 2/3/4/6/8 bits and groups 32/64/128; 5 bits is MLX-only.
"""

from __future__ import annotations

import torch

from quantbench.errors import ShapeError, UnknownTypeError
from quantbench.quant.ggml.common import roundf
from quantbench.quant.qtensor import QTensor

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUPS = (32, 64, 128)
MISTRALRS_BITS = (2, 3, 4, 6, 8)
EPS = 1e-7
RULES = ("mlx", "mistralrs")


def check_config(shape: tuple[int, ...], bits: int, group_size: int, name: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise UnknownTypeError(f"{name}: AFQ supports {SUPPORTED_BITS} bits, not {bits}")
    if group_size not in SUPPORTED_GROUPS:
        raise UnknownTypeError(f"{name}: AFQ supports group sizes {SUPPORTED_GROUPS}, not {group_size}")
    if len(shape) < 1 or shape[-1] % group_size:
        raise ShapeError(f"{name}: AFQ group size {group_size} does not divide the row length {shape[-1] if shape else 0}")


def pack_lsb(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes ``[R, K]`` into LSB-first uint32 words ``[R, K*bits/32]``.

    Works in packs of 32 codes (= ``bits`` words), so a code may straddle two words.
    """
    r, k = codes.shape
    c = codes.to(torch.int64).reshape(r, k // 32, 32)
    words = torch.zeros((r, k // 32, bits), dtype=torch.int64, device=codes.device)
    for j in range(32):
        off = j * bits
        w0, sh = divmod(off, 32)
        words[:, :, w0] |= (c[:, :, j] << sh) & 0xFFFFFFFF
        if sh + bits > 32:
            words[:, :, w0 + 1] |= c[:, :, j] >> (32 - sh)
    words = words.reshape(r, k * bits // 32)
    signed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return signed.view(torch.uint32)


def unpack_lsb(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_lsb`: int64 codes ``[R, K]``."""
    r = words.shape[0]
    w = (words.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF).reshape(r, k // 32, bits)
    mask = (1 << bits) - 1
    out = torch.empty((r, k // 32, 32), dtype=torch.int64, device=words.device)
    for j in range(32):
        off = j * bits
        w0, sh = divmod(off, 32)
        v = w[:, :, w0] >> sh
        if sh + bits > 32:
            v = v | (w[:, :, w0 + 1] << (32 - sh))
        out[:, :, j] = v & mask
    return out.reshape(r, k)


def _default_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def quantize(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int = 64,
    scale_dtype: torch.dtype | None = None,
    rule: str = "mlx",
    name: str = "tensor",
) -> QTensor:
    """MLX ``mx.quantize(w, group_size, bits)`` (affine mode), or mistral.rs's ISQ variant of it
    (``rule="mistralrs"``), on any device."""
    shape = tuple(w.shape)
    check_config(shape, bits, group_size, name)
    if rule not in RULES:
        raise UnknownTypeError(f"{name}: AFQ rule must be one of {RULES}, not {rule!r}")
    sdt = scale_dtype or _default_scale_dtype(w.dtype)
    k = shape[-1]
    x = w.to(torch.float32).reshape(-1, group_size)
    mn = x.amin(dim=1, keepdim=True)
    mx = x.amax(dim=1, keepdim=True)
    n_bins = float(2**bits - 1)
    if rule == "mistralrs":
        span = mx - mn
        scale = torch.where(span.abs() < 1e-12, torch.ones_like(span), span / n_bins)
        bias = mn
        q = roundf((x - bias) / scale).clamp(0.0, n_bins)  # Rust f32::round = C roundf
    else:
        side = mn.abs() > mx.abs()
        scale = torch.clamp_min((mx - mn) / n_bins, EPS)
        scale = torch.where(side, scale, -scale)
        edge = torch.where(side, mn, mx)
        q0 = torch.round(edge / scale)
        snap = q0 != 0
        scale = torch.where(snap, edge / torch.where(snap, q0, torch.ones_like(q0)), scale)
        bias = torch.where(snap, edge, torch.zeros_like(edge))
        q = torch.round((x - bias) / scale).clamp(0.0, n_bins)
    lead = shape[:-1]
    rows = x.shape[0] * group_size // k
    w_q = pack_lsb(q.reshape(rows, k), bits).reshape(*lead, k * bits // 32)
    g = k // group_size
    tensors = {
        "w_q": w_q,
        "scales": scale.reshape(*lead, g).to(sdt),
        "biases": bias.reshape(*lead, g).to(sdt),
    }
    return QTensor("", shape, tensors, {"bits": bits, "group_size": group_size})


def dequantize(q: QTensor) -> torch.Tensor:
    """``scale * q + bias`` per group, float32 in the logical shape."""
    bits, gs = q.params["bits"], q.params["group_size"]
    k = q.shape[-1]
    words = q.tensors["w_q"].reshape(-1, k * bits // 32)
    codes = unpack_lsb(words, bits, k).to(torch.float32).reshape(-1, gs)
    s = q.tensors["scales"].to(torch.float32).reshape(-1, 1)
    b = q.tensors["biases"].to(torch.float32).reshape(-1, 1)
    return (codes * s + b).reshape(q.shape)


def scale_bytes(weight_dtype: torch.dtype) -> int:
    """Bytes per stored scale/bias when the scales take the weight's dtype (the default)."""
    return _default_scale_dtype(weight_dtype).itemsize


def bits_per_weight(shape: tuple[int, ...], bits: int, group_size: int, scale_bytes: int = 2) -> float:
    """Codes plus one scale and one bias per group (``scale_bytes`` each: 2 for bf16/f16)."""
    return bits + 8.0 * 2 * scale_bytes / group_size
