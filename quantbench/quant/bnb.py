"""bitsandbytes NF4 / FP4 (optionally double-quantized) and LLM.int8 weights, bnb's own layout.

Why byte-for-byte bnb: transformers checkpoints (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``, ``SCB``) are
these tensors, so a checkpoint writer only names them. The tests compare against
``bitsandbytes==0.50.2`` on CPU.

4-bit (``bitsandbytes.functional.quantize_4bit``, CPU "default" kernel). The tensor is flattened;
blocks of ``blocksize`` (64) elements, the last one possibly short::

    absmax_b = max|x| over the block                       (float32)
    s        = clamp(x * (1 / max(absmax_b, 1e-38)), -1, 1)
    code     = bucketize(s, midpoints of the sorted code)  # ties go to the lower code value
    weight   = (code[2i] << 4) | code[2i+1]                # high nibble = even element

stored as ``uint8 [ceil(n/2), 1]``. NF4 codes index the NF4 table directly; FP4 indices come
through bnb's value-sorted order of its FP4 table, which maps small positive values to the -0
code (0x8) — reproduced as is. Double quantization (``compress_statistics``): ``offset =
mean(absmax)``, then ``absmax - offset`` is 8-bit blockwise-quantized with the signed dynamic map
in blocks of 256 through bnb's CPU lookup table (see :func:`quantize_blockwise_8bit`).

QTensor tensors: ``weight`` uint8 ``[ceil(n/2), 1]``; ``absmax`` (float32 ``[n_blocks]``, or
uint8 codes with double quant); ``quant_map`` float32 ``[16]``; with double quant also
``nested_absmax`` float32 ``[ceil(n_blocks/256)]`` and ``nested_quant_map`` float32 ``[256]``.
``params``: ``quant_type`` ("nf4"/"fp4"), ``blocksize``, ``dtype`` (bnb's name of the input dtype,
e.g. "bfloat16"), ``double_quant``, and with it ``nested_blocksize``, ``nested_dtype``
("float32"), ``nested_offset`` (a Python float holding the float32 offset). :func:`quant_state_fields`
gives the JSON dict bnb packs into ``quant_state.bitsandbytes__<type>``.

LLM.int8 (``Int8Params._quantize`` → ``int8_vectorwise_quant``): the weight is cast to float16
first (as bnb does), ``SCB = max|row|`` (float32 ``[out]``), ``CB = round(w * (127 / SCB))``
int8 ``[out, in]``; dequantization ``CB * SCB / 127``. All-zero rows give zeros (bnb would divide
by zero there). Tensors ``CB`` and ``SCB``; the outlier threshold (6.0) is a run-time matmul
setting, kept in ``params["threshold"]``.
"""

from __future__ import annotations

import torch

from quantbench.errors import InputValueError, ShapeError, UnknownTypeError
from quantbench.quant.qtensor import QTensor

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
INT8_THRESHOLD = 6.0

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bnb's FP4 table in bit-pattern order (sign, 2 exponent bits, 1 mantissa bit), divided by 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# torch.argsort of that table as bnb 0.50.2 computes it on CPU (+0 sorts before -0).
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """bnb ``get_4bit_type``: the 16 code values, float32, normalized to max |v| = 1."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        t = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
        return t / 12.0
    raise UnknownTypeError(f"bnb 4-bit type must be 'nf4' or 'fp4', not {quant_type!r}")


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bnb ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``: 256 sorted values."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """Zero-pad the flat ``x`` to whole blocks; returns ``[n_blocks, blocksize]`` and the pad."""
    n = x.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.reshape(nb, blocksize), pad


def _block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    xb, _ = _blocks(x.abs(), blocksize)
    return xb.amax(dim=1)


LUT_SIZE = 65536


def _code_lut(code: torch.Tensor) -> torch.Tensor:
    """bnb's CPU ``build_quantize_lut``: nearest code index for each of 65536 points of [-1, 1]."""
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)
    val = -1.0 + (2.0 * i) / float(LUT_SIZE - 1)
    return torch.searchsorted(mids, val, right=False)  # count of midpoints strictly below val


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb 0.50's CPU ``quantize_blockwise`` (``quantize_cpu_impl``) on float32 ``x``: codes, absmax.

    Not an exact nearest search: ``x / absmax`` is snapped to a 65536-point grid of [-1, 1]
    (``trunc(((v + 1) * 0.5) * 65535 + 0.5)``) whose points were assigned their nearest code, so
    codes closer together than the grid (those within ~1e-5 of zero) are never chosen. An
    all-zero block gets absmax 0 and code index 0.
    """
    n = x.numel()
    absmax = _block_absmax(x, blocksize)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    inv = (1.0 / safe).repeat_interleave(blocksize)[:n]
    t = (torch.clamp(x * inv, -1.0, 1.0) + 1.0) * 0.5
    pos = torch.trunc(t * float(LUT_SIZE - 1) + 0.5).to(torch.int64)
    idx = _code_lut(code)[pos]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    idx = torch.where(zero_block, torch.zeros_like(idx), idx)
    return idx.to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = q.numel()
    return code[q.to(torch.int64)] * absmax.repeat_interleave(blocksize)[:n]


def quantize_4bit(
    w: torch.Tensor,
    *,
    quant_type: str,
    blocksize: int = 64,
    double_quant: bool = False,
    name: str = "tensor",
) -> QTensor:
    """bnb ``quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type)``."""
    if blocksize not in BLOCKSIZES_4BIT:
        raise ShapeError(f"{name}: bnb 4-bit blocksize must be one of {BLOCKSIZES_4BIT}, not {blocksize}")
    code = code_4bit(quant_type, w.device)
    shape = tuple(w.shape)
    x = w.reshape(-1).to(torch.float32)
    absmax = _block_absmax(x, blocksize)
    n = x.numel()
    inv = (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(blocksize)[:n]
    scaled = torch.clamp(x * inv, -1, 1)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    order = torch.arange(16, device=w.device) if quant_type == "nf4" else torch.tensor(_FP4_ORDER, device=w.device)
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    idx = order[torch.bucketize(scaled, mids)].to(torch.uint8)
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    params: dict = {"quant_type": quant_type, "blocksize": blocksize, "dtype": _dtype_name(w.dtype), "double_quant": bool(double_quant)}
    tensors = {"weight": packed, "quant_map": code}
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map(w.device)
        qabs, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        tensors.update({"absmax": qabs, "nested_absmax": nested_absmax, "nested_quant_map": nested_code})
        params.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": float(offset)})
    else:
        tensors["absmax"] = absmax
    return QTensor("", shape, tensors, params)


def absmax_of(q: QTensor) -> torch.Tensor:
    """The float32 per-block absmax, undoing double quantization if present."""
    t = q.tensors
    if not q.params.get("double_quant"):
        return t["absmax"].to(torch.float32)
    a = dequantize_blockwise_8bit(t["absmax"], t["nested_absmax"], t["nested_quant_map"], q.params["nested_blocksize"])
    return a + torch.tensor(q.params["nested_offset"], dtype=torch.float32, device=a.device)


def dequantize_4bit(q: QTensor) -> torch.Tensor:
    """``code[nibble] * absmax`` in float32 (bnb then casts to ``dtype``; we keep float32)."""
    b = q.tensors["weight"].reshape(-1)
    nib = torch.stack([b >> 4, b & 0x0F], dim=1).reshape(-1).to(torch.int64)
    n = q.numel
    vals = q.tensors["quant_map"].to(torch.float32)[nib[:n]]
    bs = q.params["blocksize"]
    return (vals * absmax_of(q).repeat_interleave(bs)[:n]).reshape(q.shape)


def quant_state_fields(q: QTensor) -> dict:
    """The non-tensor part of bnb's ``QuantState.as_dict()``, in bnb's key order (packed as JSON)."""
    p = q.params
    d = {"quant_type": p["quant_type"], "blocksize": p["blocksize"], "dtype": p["dtype"], "shape": list(q.shape)}
    if p.get("double_quant"):
        d.update({"nested_blocksize": p["nested_blocksize"], "nested_dtype": p["nested_dtype"], "nested_offset": p["nested_offset"]})
    return d


def quantize_int8(w: torch.Tensor, *, threshold: float = INT8_THRESHOLD, name: str = "tensor") -> QTensor:
    """LLM.int8 row-wise absmax quantization of a 2-D weight, as ``Int8Params`` stores it."""
    if w.ndim != 2:
        raise ShapeError(f"{name}: LLM.int8 needs a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    a = w.to(torch.float16)
    if not torch.isfinite(a).all():
        raise InputValueError(f"{name}: values exceed float16's range; LLM.int8 quantizes from float16")
    scb = a.abs().amax(dim=1).float()
    mult = torch.where(scb > 0, 127.0 / torch.where(scb > 0, scb, torch.ones_like(scb)), torch.zeros_like(scb))
    cb = torch.round(a * mult.unsqueeze(-1)).to(torch.int8)
    return QTensor("", tuple(w.shape), {"CB": cb, "SCB": scb}, {"threshold": float(threshold)})


def dequantize_int8(q: QTensor) -> torch.Tensor:
    """bnb ``int8_vectorwise_dequant``: ``CB * SCB * (1/127)``."""
    return q.tensors["CB"].to(torch.float32) * q.tensors["SCB"].to(torch.float32).view(-1, 1) * 7.874015718698502e-3


def bits_per_weight_4bit(shape: tuple[int, ...], blocksize: int = 64, double_quant: bool = False) -> float:
    n = 1
    for s in shape:
        n *= s
    nb = -(-n // blocksize)
    total = -(-n // 2) + 16 * 4
    if double_quant:
        total += nb + 4 * (-(-nb // NESTED_BLOCKSIZE)) + 256 * 4
    else:
        total += 4 * nb
    return 8.0 * total / n


def bits_per_weight_int8(shape: tuple[int, ...]) -> float:
    return 8.0 + 8.0 * 4 * shape[0] / (shape[0] * shape[1])
