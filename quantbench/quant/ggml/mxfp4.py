"""GGML's MXFP4 (OCP microscaling FP4): 32 E2M1 values sharing one E8M0 power-of-two scale.

llama.cpp ignores the importance matrix here (``quantize_mxfp4`` → ``quantize_row_mxfp4_ref``):
the exponent is ``floorf(log2f(amax)) - 2 + 127`` and every element takes the first nearest
of the doubled E2M1 levels ``kvalues_mxfp4`` times half the E8M0 scale.
"""

from __future__ import annotations

import torch

from quantbench.quant.ggml.common import pack_nibbles
from quantbench.quant.registry import GGMLType, register

QK_MXFP4 = 32
KVALUES_MXFP4: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
_CHUNK_BLOCKS = 16384  # bounds the [chunk, 32, 16] error temporaries


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """``ggml_e8m0_to_fp32_half``: 2^(e-128) built from bits, subnormal patterns for e < 2."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _log2f(a: torch.Tensor) -> torch.Tensor:
    """glibc ``log2f``: the float32 rounding of log2, computed in double then rounded once.

    Only ``floor`` of it matters; what decides bytes is whether floats just below 2^k round up to
    k. glibc's log2f is correctly rounded there, and so is the double computation (checked
    exhaustively near every power of two against the oracle in the tests).
    """
    return torch.log2(a.to(torch.float64)).to(torch.float32)


def shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 byte ``amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0`` as int32.

    The float→uint8 cast of a negative value (amax < 2^-125) is done by x86 as a truncation to
    int32 and keeping the low byte, which is what the oracle build does, e.g. 2^-149 → 232.
    """
    pos = amax > 0
    safe = torch.where(pos, amax, torch.ones_like(amax))
    v = torch.floor(_log2f(safe)) - 2 + 127
    e = torch.trunc(v).to(torch.int32) & 0xFF
    return torch.where(pos, e, torch.zeros_like(e))


def _best_index(xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``best_index_mxfp4``: first index of the smallest ``fabsf(kv*d - x)``, per element."""
    kv = torch.tensor(KVALUES_MXFP4, dtype=torch.float32, device=xb.device)
    out = torch.empty(xb.shape, dtype=torch.int64, device=xb.device)
    for s in range(0, xb.shape[0], _CHUNK_BLOCKS):
        e = min(xb.shape[0], s + _CHUNK_BLOCKS)
        grid = kv * d[s:e].view(-1, 1, 1)                          # [c, 1, 16]
        err = (grid - xb[s:e].unsqueeze(2)).abs_()                 # [c, 32, 16]
        out[s:e] = err.argmin(dim=2)                               # first minimum, as strict <
    return out


def _mxfp4_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    xb = x.reshape(-1, QK_MXFP4)
    e = shared_exponent(xb.abs().amax(dim=1))
    d = e8m0_to_fp32_half(e)
    idx = _best_index(xb, d)
    qs = pack_nibbles(idx[:, :16], idx[:, 16:])
    out = torch.cat([e.to(torch.uint8).unsqueeze(1), qs], dim=1)
    return out.reshape(rows, -1)


def _mxfp4_dequant(b: torch.Tensor) -> torch.Tensor:
    d = e8m0_to_fp32_half(b[:, :1])
    q = b[:, 1:].to(torch.int64)
    idx = torch.cat([q & 0x0F, q >> 4], dim=1)
    kv = torch.tensor(KVALUES_MXFP4, dtype=torch.float32, device=b.device)
    return d * kv[idx]


register(GGMLType("MXFP4", 39, QK_MXFP4, 1 + QK_MXFP4 // 2, _mxfp4_rows, _mxfp4_dequant))
