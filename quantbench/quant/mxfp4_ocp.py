"""MXFP4 in the OCP/gpt-oss layout: 32 E2M1 codes share one E8M0 power-of-two scale.

Why this module next to ``quant/ggml/mxfp4.py``: GGML's MXFP4 is its own byte layout (a 17-byte
block, doubled levels, first-nearest search) and must stay byte-identical to llama.cpp. This
module is the layout mistral.rs's ``MXFP4Layer`` (UQFF serde type 6) and gpt-oss checkpoints use.

Layout (mistral.rs ``MXFP4Layer``): ``blocks`` uint8 ``[*lead, in/2]`` — byte ``i`` holds
element ``2i`` in its low nibble and ``2i+1`` in its high nibble (gpt-oss ``*_blocks`` is the same
bytes viewed as ``[*lead, in/32, 16]``); ``scales`` uint8 ``[*lead, in/32]``, E8M0 biased by
127 (value ``2^(s-127)``; 255 is NaN and never produced). UQFF keys: ``{prefix}.weight`` (blocks)
and ``{prefix}.weight.scales``. Nibble = sign bit (8) | E2M1 magnitude index into
``0, 0.5, 1, 1.5, 2, 3, 4, 6``. Requires ``in % 32 == 0``.

Two scale rules (``params["rule"]``):

* ``ocp`` (OCP MX v1.0 / microxcaling): ``e = floor(log2(amax)) - 2`` (2 = emax of E2M1),
  clamped to the E8M0 range [-127, 127]; elements ``x / 2^e`` rounded to nearest E2M1 with ties
  to even and saturated at ±6. The floor is exact (from ``frexp``). An all-zero block gets
  ``e = -127`` (byte 0), as microxcaling does.
* ``mistralrs`` (mistral.rs ISQ ``MXFP4Layer::quantize``): byte
  ``clamp(floor(log2(amax / 6)) + 127, 0, 254)`` (127 for a zero block). Since
  ``2^e <= amax / 6``, ``amax / 2^e`` lies in [6, 12): the block's largest elements saturate at
  6, clipping them by up to half — mistral.rs's behaviour, reproduced, and the reason this rule
  reconstructs worse than ``ocp``. Elements are rounded with midpoints going *up*
  (0.25 → 0.5, 1.25 → 1.5, 5 → 6). ``log2`` is float32 like its ``f32::log2``.

Both rules set the sign bit for every negative input, including values that round to zero.
"""

from __future__ import annotations

import torch

from quantbench.errors import ShapeError, UnknownTypeError
from quantbench.quant.qtensor import QTensor

BLOCK = 32
E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
RULES = ("ocp", "mistralrs")
# Upper edges of magnitude indices 0..6 (index 7 = 6.0 above the last edge). A value exactly on
# an edge goes to the even mantissa for "ocp" and upwards for "mistralrs".
_EDGES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_OCP_TIE_UP = (False, True, False, True, False, True, False)  # tie goes to the even neighbour


def _e2m1_index(a: torch.Tensor, rule: str) -> torch.Tensor:
    """Magnitude index 0..7 of ``a >= 0`` (saturating)."""
    idx = torch.zeros_like(a, dtype=torch.uint8)
    for edge, ocp_up in zip(_EDGES, _OCP_TIE_UP):
        up = (a > edge) | ((a == edge) & (ocp_up if rule == "ocp" else True))
        idx += up.to(torch.uint8)
    return idx


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(x))`` for finite x > 0 (subnormals included), int32."""
    _, e = torch.frexp(x)
    return e.to(torch.int32) - 1


def check_config(shape: tuple[int, ...], rule: str, name: str) -> None:
    if rule not in RULES:
        raise UnknownTypeError(f"{name}: MXFP4 scale rule must be one of {RULES}, not {rule!r}")
    if not shape or shape[-1] % BLOCK:
        raise ShapeError(f"{name}: MXFP4 needs the row length ({shape[-1] if shape else 0}) to be a multiple of {BLOCK}")


def quantize(w: torch.Tensor, *, rule: str = "ocp", name: str = "tensor") -> QTensor:
    shape = tuple(w.shape)
    check_config(shape, rule, name)
    x = w.to(torch.float32).reshape(-1, BLOCK)
    amax = x.abs().amax(dim=1, keepdim=True)
    pos = amax > 0
    safe = torch.where(pos, amax, torch.ones_like(amax))
    if rule == "ocp":
        e = (_floor_log2(safe) - 2).clamp(-127, 127)
        e = torch.where(pos, e, torch.full_like(e, -127))
    else:
        e = torch.floor(torch.log2(safe / 6.0)).to(torch.int32).clamp(-127, 127)
        e = torch.where(pos, e, torch.zeros_like(e))
    scaled = torch.ldexp(x, -e.to(torch.float32))
    mag = _e2m1_index(scaled.abs(), rule)
    nib = mag | ((x < 0).to(torch.uint8) << 3)
    nib = nib.reshape(-1, 2)
    blocks = (nib[:, 0] | (nib[:, 1] << 4)).reshape(*shape[:-1], shape[-1] // 2)
    scales = (e + 127).to(torch.uint8).reshape(*shape[:-1], shape[-1] // BLOCK)
    return QTensor("", shape, {"blocks": blocks, "scales": scales}, {"rule": rule, "block_size": BLOCK})


def dequantize(q: QTensor) -> torch.Tensor:
    """E2M1 level times ``2^(scale - 127)``, float32 in the logical shape."""
    b = q.tensors["blocks"].reshape(-1)
    nib = torch.stack([b & 0x0F, b >> 4], dim=1).reshape(-1, BLOCK).to(torch.int64)
    levels = torch.tensor(E2M1_LEVELS, dtype=torch.float32, device=b.device)
    val = levels[nib & 7] * (1.0 - 2.0 * (nib >> 3).to(torch.float32))
    e = q.tensors["scales"].reshape(-1, 1).to(torch.float32) - 127.0
    return torch.ldexp(val, e).reshape(q.shape)


def bits_per_weight(shape: tuple[int, ...]) -> float:
    return 4.0 + 8.0 / BLOCK
