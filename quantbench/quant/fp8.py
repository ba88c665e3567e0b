"""FP8 e4m3fn weights: per-tensor, per-output-channel, 128x128 blocks, and mistral.rs's FP8 ISQ.

Why several: checkpoints in the wild use all three scale granularities, and mistral.rs's ISQ
"FP8" (IsqType ``F8E4M3``, UQFF serde type 3 ``FP8Linear``) has its own rounding path that a
UQFF file must reproduce. Every variant stores the codes as ``torch.float8_e4m3fn`` (max 448,
no infinities) and a float32 *dequantization multiplier* (``w ≈ code * scale``), the meaning of
compressed-tensors' ``weight_scale`` and DeepSeek-V3's ``weight_scale_inv`` alike.

Casting: values are clamped to ±448 and rounded to nearest even (``torch``'s float8 cast), which
is what the ``float8`` crate's saturating ``F8E4M3::from_f32`` does.

Variants (``params["granularity"]``):

* ``tensor``: ``scale = amax / 448`` (1.0 if the tensor is all zeros); tensors ``weight``
  e4m3 ``[out, in]``, ``weight_scale`` float32 0-d.
* ``channel``: one scale per output row: ``weight_scale`` float32 ``[out, 1]``
  (compressed-tensors ``channel`` strategy).
* ``block``: ``weight_block_size = [128, 128]``: ``weight_scale_inv`` float32
  ``[ceil(out/128), ceil(in/128)]``, edge blocks partial (DeepSeek-V3 / transformers
  FineGrainedFP8). Arithmetic as transformers' ``Fp8Quantize``: codes ``e4m3(w * (448/amax))``,
  ``weight_scale_inv = 1 / (448/amax)`` (1 for an all-zero block).
* ``tensor`` / ``channel`` divide by the stored scale instead (compressed-tensors' convention).
* ``mistralrs`` (mistral.rs ``FP8Linear::quantize``, the 0.9.5 wheel's bytes): the weight is
  first cast to bfloat16; ``scale = bf16(M / amax)`` clamped to at most ``M``, codes
  ``e4m3(bf16(w_bf16 * scale))``, where ``M = 416`` is the ``float8`` crate's ``F8E4M3::MAX``
  (bits 0x7D; the true e4m3fn maximum is 448). So tensors with amax < 1 all get scale 416 and
  none uses the top of the FP8 range — mistral.rs's behaviour, reproduced byte for byte.
  Tensors named after ``FP8Linear``'s fields, serialized by UQFF in this order: ``weight`` e4m3
  ``[out, in]``, ``dequant_w_scale`` = float32 ``1/scale`` (0-d), ``dequant_x_scale`` (same
  value: mistral.rs stores the weight's), ``quant_scale`` = scale (float32 0-d);
  ``params["dtype"] = "F8E4M3"``.
"""

from __future__ import annotations

import torch

from quantbench.errors import ShapeError, UnknownTypeError
from quantbench.quant.qtensor import QTensor

E4M3_MAX = 448.0
# mistral.rs's F8E4M3::MAX (float8 crate): the bound of its FP8 ISQ scale and F8Q8 block scales
MISTRALRS_E4M3_MAX = 416.0
BLOCK = 128
GRANULARITIES = ("tensor", "channel", "block", "mistralrs")


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast to float8_e4m3fn."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _safe_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _block_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    out, inn = w.shape
    bo, bi = -(-out // block), -(-inn // block)
    padded = torch.zeros((bo * block, bi * block), dtype=w.dtype, device=w.device)
    padded[:out, :inn] = w.abs()
    return padded.reshape(bo, block, bi, block).amax(dim=(1, 3))


def _expand_blocks(s: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    out, inn = shape
    return s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out, :inn]


def quantize(w: torch.Tensor, *, granularity: str, block_size: int = BLOCK, name: str = "tensor") -> QTensor:
    """FP8 e4m3 quantization of a 2-D ``[out, in]`` weight (any float dtype/device)."""
    if granularity not in GRANULARITIES:
        raise UnknownTypeError(f"{name}: FP8 granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if w.ndim != 2 and granularity in ("channel", "block"):
        raise ShapeError(f"{name}: FP8 {granularity} scales need a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    shape = tuple(w.shape)
    if granularity == "mistralrs":
        return _quantize_mistralrs(w)
    x = w.to(torch.float32)
    if granularity == "tensor":
        scale = _safe_scale(x.abs().amax())
        return QTensor("", shape, {"weight": to_e4m3(x / scale), "weight_scale": scale},
                       {"granularity": "tensor"})
    if granularity == "channel":
        scale = _safe_scale(x.abs().amax(dim=1, keepdim=True))
        return QTensor("", shape, {"weight": to_e4m3(x / scale), "weight_scale": scale},
                       {"granularity": "channel"})
    if block_size <= 0:
        raise ShapeError(f"{name}: FP8 block size must be positive, not {block_size}")
    amax = _block_amax(x, block_size)
    fwd = torch.where(amax > 0, E4M3_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    codes = to_e4m3(x * _expand_blocks(fwd, shape, block_size))
    return QTensor("", shape, {"weight": codes, "weight_scale_inv": 1.0 / fwd},
                   {"granularity": "block", "weight_block_size": [block_size, block_size]})


def _quantize_mistralrs(w: torch.Tensor) -> QTensor:
    data = w.to(torch.bfloat16)
    m = torch.tensor(MISTRALRS_E4M3_MAX, dtype=torch.bfloat16, device=w.device)
    scale = (m / data.abs().amax()).clamp(max=MISTRALRS_E4M3_MAX)  # bf16 division; amax 0 -> inf -> 416
    codes = to_e4m3((data * scale).to(torch.float32))
    qs = scale.to(torch.float32)
    inv = 1.0 / qs
    tensors = {"weight": codes, "dequant_w_scale": inv, "dequant_x_scale": inv.clone(), "quant_scale": qs}
    return QTensor("", tuple(w.shape), tensors, {"granularity": "mistralrs", "dtype": "F8E4M3"})


def dequantize(q: QTensor) -> torch.Tensor:
    """``code * scale`` (the scale broadcast per tensor / row / block), float32."""
    g = q.params["granularity"]
    codes = q.tensors["weight"].to(torch.float32)
    if g == "mistralrs":
        return (codes * q.tensors["dequant_w_scale"].to(torch.float32)).reshape(q.shape)
    if g in ("tensor", "channel"):
        return (codes * q.tensors["weight_scale"].to(torch.float32)).reshape(q.shape)
    bs = q.params["weight_block_size"][0]
    s = _expand_blocks(q.tensors["weight_scale_inv"].to(torch.float32), tuple(q.shape), bs)
    return codes * s


def bits_per_weight(shape: tuple[int, ...], granularity: str, block_size: int = BLOCK) -> float:
    numel = 1
    for s in shape:
        numel *= s
    if granularity == "tensor":
        scale_bytes = 4
    elif granularity == "mistralrs":
        scale_bytes = 12
    elif granularity == "channel":
        scale_bytes = 4 * shape[0]
    else:
        scale_bytes = 4 * (-(-shape[0] // block_size)) * (-(-shape[1] // block_size))
    return 8.0 + 8.0 * scale_bytes / numel
