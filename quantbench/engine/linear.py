"""The one seam through which every linear layer runs, float or quantized.

A layer holds either a float weight or a :class:`QTensor` in its packed form; the forward pass
dequantizes through :func:`quantbench.quant.dequantize`, so any scheme the quant registry knows
runs here without the model code knowing a layout. On CPU the dequantized weight is cached per
layer by default (decode then costs one GEMV, like a float model; memory is that of the float
model); on CUDA it is dequantized per call, keeping only packed bytes resident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.errors import ShapeError
from quantbench.quant import QTensor, dequantize
from quantbench.quant.ggml.common import cdiv, first_absmax, fp16_round

Weight = torch.Tensor | QTensor

# The activation type llama.cpp's CPU backend converts a layer's input to before the dot product
# with each weight type (ggml-cpu's ``type_traits_cpu[...].vec_dot_type``). Emulating it
# (``act_quant="ggml"``) reproduces llama.cpp's numbers; the default keeps activations in float,
# which is the more exact model.
GGML_VEC_DOT_TYPE = {
    "Q4_0": "Q8_0", "Q4_1": "Q8_1", "Q5_0": "Q8_0", "Q5_1": "Q8_1", "Q8_0": "Q8_0",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K",
    "IQ1_S": "Q8_K", "IQ1_M": "Q8_K", "IQ4_NL": "Q8_0", "IQ4_XS": "Q8_K",
    "TQ1_0": "Q8_K", "TQ2_0": "Q8_K", "MXFP4": "Q8_0",
    "F16": "F16", "BF16": "BF16",
}

# Weight types whose dot product adds ``min * s`` per block, with ``s`` the Q8_1 block's stored
# fp16 sum (``vec_dot_q4_1_q8_1``/``q5_1``); the fp16 min sits at bytes 2..3 of each block.
_Q8_1_MIN_BLOCK = {"Q4_1": 20, "Q5_1": 24}


def _blocks_of(x: torch.Tensor, size: int, weight_type: str) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ShapeError(f"a {weight_type} layer's input has {x.shape[-1]} features, not a multiple of "
                         f"{size} (the block of the activation type llama.cpp pairs it with)")
    return x.reshape(-1, size).float()


def _simd_q8(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x86 ``quantize_row_q8_0``/``q8_1`` (AVX/AVX2) on [blocks, 32]: (levels, fp32 d, fp16 d).

    Not the ``_ref`` rounding: the SIMD kernel multiplies by ``127/amax`` (not ``1/(amax/127)``,
    which differs by an ulp) and rounds half to even (``_mm256_round_ps``), not half away from
    zero. Either difference flips a level now and then, enough to decorrelate the logits.
    """
    amax = xb.abs().amax(1, keepdim=True)
    d = cdiv(amax, 127.0)
    inv = torch.where(amax != 0, cdiv(127.0, amax), torch.zeros_like(amax))
    return (xb * inv).round_(), d, fp16_round(d)


def _q8_k(xb: torch.Tensor) -> torch.Tensor:
    """x86 ``quantize_row_q8_K`` (which is ``quantize_row_q8_K_ref``) and back, on [blocks, 256]."""
    mx = first_absmax(xb, 1).unsqueeze(1)
    iscale = cdiv(-127.0, mx)
    # Inside the block |iscale*x| <= 127, so nearest_int is round-half-even; a subnormal maximum
    # makes iscale inf, and C's nearest_int of the inf/NaN products stores 0 (as the registry's).
    q = (iscale * xb).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).round_().clamp_(max=127.0)
    d = torch.where(mx == 0, torch.zeros_like(mx), cdiv(1.0, iscale))
    return torch.where(mx == 0, torch.zeros_like(q), q) * d


def ggml_activation_round_trip(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x`` converted to the activation type llama.cpp's x86 CPU backend pairs with
    ``weight_type``, and back to ``x``'s dtype (``x`` itself for types it keeps in float).

    Q8_0/Q8_1 follow the AVX2 quantizer that ggml-cpu's ``mul_mat`` actually calls, Q8_K the
    reference one (x86 has no SIMD Q8_K quantizer); F16/BF16 weights get their input rounded to
    that type. The integer dot products of every weight type are exact, so ``F.linear`` on the
    dequantized weight then matches llama.cpp up to float summation order, except for the Q8_1
    block sums, which :func:`ggml_q8_1_sum_correction` adds back.
    """
    t = GGML_VEC_DOT_TYPE.get(weight_type)
    if t is None:
        return x
    if t in ("F16", "BF16"):
        return x.to(torch.float16 if t == "F16" else torch.bfloat16).to(x.dtype)
    if t == "Q8_K":
        return _q8_k(_blocks_of(x, 256, weight_type)).reshape(x.shape).to(x.dtype)
    q, _, d16 = _simd_q8(_blocks_of(x, 32, weight_type))
    return (q * d16).reshape(x.shape).to(x.dtype)


def ggml_q8_1_sum_correction(x: torch.Tensor, weight: QTensor) -> torch.Tensor | None:
    """What llama.cpp's Q4_1/Q5_1 dot products add beyond ``F.linear`` on round-tripped input.

    Their per-block term is ``min_w * s_x`` with ``s_x = fp16(d_x32 * sum(q_x))`` stored in the
    Q8_1 block, while ``F.linear`` on the round-tripped input gives ``min_w * d_x16 * sum(q_x)``.
    Returns ``(s_x - d_x16 * sum q_x) @ mins.T`` ([..., out]), or None for other weight types.
    """
    block = _Q8_1_MIN_BLOCK.get(weight.qtype)
    if block is None:
        return None
    q, d, d16 = _simd_q8(_blocks_of(x, 32, weight.qtype))
    sq = q.sum(1, keepdim=True)  # integers below 2^12: exact
    err = (fp16_round(d * sq) - d16 * sq).reshape(*x.shape[:-1], x.shape[-1] // 32)
    mins = ggml_block_mins(weight)
    return F.linear(err, mins.to(device=err.device)).to(x.dtype)


def ggml_block_mins(weight: QTensor) -> torch.Tensor:
    """The fp16 ``m`` of every Q4_1/Q5_1 block of ``weight``, as float32 [rows, blocks]."""
    block = _Q8_1_MIN_BLOCK[weight.qtype]
    data = weight.tensors["data"]
    rows = data.shape[0]
    return data.reshape(rows, -1, block)[:, :, 2:4].contiguous().view(torch.float16).squeeze(-1).float()


def materialize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """``w`` as a dense ``dtype`` tensor. Packed GGML weights on CUDA unpack in one Triton launch
    (:mod:`quantbench.engine.kernels`, same values as the reference); the rest go through
    :func:`quantbench.quant.dequantize`."""
    if isinstance(w, QTensor):
        from quantbench.engine import kernels

        if kernels.has_dequant_kernel(w, dtype):
            return kernels.dequantize(w, dtype)
        return dequantize(w).to(dtype)
    return w.to(dtype)


class QLinear(nn.Module):
    """``y = x @ W.T + b`` where ``W`` may be packed. ``hf_name`` is the HF module name."""

    def __init__(self, in_features: int, out_features: int, bias: bool, hf_name: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.hf_name = hf_name
        self.has_bias = bias
        self.weight: Weight | None = None
        self.bias: torch.Tensor | None = None
        self.cache_dequantized: bool | None = None  # None: decide by device
        self.act_quant: str = "none"  # "ggml": emulate llama.cpp's activation quantization
        self._cached: torch.Tensor | None = None
        self._ggml_parts = None  # GGMLWeightParts of a packed weight, built on first ggml call

    def set_weight(self, w: Weight) -> None:
        self.weight = w
        self._cached = None
        self._ggml_parts = None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if not isinstance(w, QTensor):
            return w if w.dtype == dtype else w.to(dtype)
        cache = self.cache_dequantized
        if cache is None:
            cache = w.device.type != "cuda"
        if cache:
            if self._cached is None or self._cached.dtype != dtype:
                self._cached = materialize(w, dtype)
            return self._cached
        return materialize(w, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant == "ggml" and isinstance(self.weight, QTensor):
            from quantbench.engine import ggml_numerics as gn

            if self.weight.qtype in gn.EXACT_MATMUL_TYPES:
                # bit-exact ggml-cpu dot product (activation quantization included)
                if self._ggml_parts is None:
                    self._ggml_parts = gn.GGMLWeightParts(self.weight)
                y = gn.ggml_quant_matmul(x, self._ggml_parts).to(x.dtype)
                return y if self.bias is None else y + self.bias.to(x.dtype)
            fix = ggml_q8_1_sum_correction(x, self.weight)
            y = F.linear(ggml_activation_round_trip(x, self.weight.qtype), self.dense_weight(x.dtype), self.bias)
            return y if fix is None else y + fix
        return F.linear(x, self.dense_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        kind = self.weight.qtype if isinstance(self.weight, QTensor) else "float"
        return f"{self.hf_name}: {self.in_features}->{self.out_features} ({kind})"


class QExperts(nn.Module):
    """Stacked expert projections ``[E, out, in]`` (gate, up, down), float or packed.

    Packed experts keep one QTensor whose rows are expert-major, so expert ``e`` is the row
    range ``e*out:(e+1)*out`` — slicing packed rows is exact for every row-blocked scheme.
    """

    def __init__(self, n_experts: int, hidden: int, ff: int, hf_prefix: str, act) -> None:
        super().__init__()
        self.n_experts, self.hidden, self.ff = n_experts, hidden, ff
        self.hf_name = hf_prefix
        self.act = act
        self.gate_proj: Weight | None = None
        self.up_proj: Weight | None = None
        self.down_proj: Weight | None = None
        self._cached: dict[str, torch.Tensor] = {}

    def set_weight(self, which: str, w: Weight) -> None:
        setattr(self, which, w)
        self._cached.pop(which, None)

    def _expert(self, which: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        w = getattr(self, which)
        if not isinstance(w, QTensor):
            return w[e].to(dtype)
        from quantbench.quant.registry import is_ggml_type

        if w.device.type != "cuda" or not is_ggml_type(w.qtype):
            full = self._cached.get(which)
            if full is None or full.dtype != dtype:
                full = materialize(w, dtype)
                self._cached[which] = full
            return full[e]
        out = w.shape[1]
        rows = w.data[e * out:(e + 1) * out]
        q = QTensor(w.qtype, tuple(w.shape[1:]), {"data": rows}, dict(w.params))
        return materialize(q, dtype)

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """``x`` [N, hidden]; ``top_idx``/``top_w`` [N, k] — routed mixture of expert MLPs."""
        out = torch.zeros_like(x)
        hit = torch.unique(top_idx).tolist()
        for e in hit:
            tok, slot = torch.where(top_idx == e)
            h = x[tok]
            g = F.linear(h, self._expert("gate_proj", e, x.dtype))
            u = F.linear(h, self._expert("up_proj", e, x.dtype))
            y = F.linear(self.act(g) * u, self._expert("down_proj", e, x.dtype))
            out.index_add_(0, tok, y * top_w[tok, slot, None].to(y.dtype))
        return out
