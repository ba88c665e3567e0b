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

from quantbench.quant import QTensor, dequantize, quantize

Weight = torch.Tensor | QTensor

# The activation type llama.cpp's CPU backend quantizes inputs to before a dot product with each
# weight type (ggml-cpu's ``vec_dot_type``). Emulating it (``act_quant="ggml"``) reproduces
# llama.cpp's numbers; the default keeps activations in float, which is the more exact model.
GGML_VEC_DOT_TYPE = {
    "Q4_0": "Q8_0", "Q4_1": "Q8_1", "Q5_0": "Q8_0", "Q5_1": "Q8_1", "Q8_0": "Q8_0",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ4_NL": "Q8_0", "IQ4_XS": "Q8_K", "MXFP4": "Q8_0",
}


def ggml_activation_round_trip(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x`` quantized to the activation type llama.cpp pairs with ``weight_type``, and back."""
    t = GGML_VEC_DOT_TYPE.get(weight_type)
    if t is None:
        return x
    shape = x.shape
    q = quantize(x.reshape(-1, shape[-1]).float(), t)
    return dequantize(q).reshape(shape).to(x.dtype)


def materialize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, QTensor):
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

    def set_weight(self, w: Weight) -> None:
        self.weight = w
        self._cached = None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if not isinstance(w, QTensor):
            return w if w.dtype == dtype else w.to(dtype)
        cache = self.cache_dequantized
        if cache is None:
            cache = not w.data.is_cuda
        if cache:
            if self._cached is None or self._cached.dtype != dtype:
                self._cached = materialize(w, dtype)
            return self._cached
        return materialize(w, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant == "ggml" and isinstance(self.weight, QTensor):
            x = ggml_activation_round_trip(x, self.weight.qtype)
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
        if not w.data.is_cuda:
            full = self._cached.get(which)
            if full is None or full.dtype != dtype:
                full = materialize(w, dtype)
                self._cached[which] = full
            return full[e]
        out = w.shape[1]
        rows = w.data[e * out:(e + 1) * out]
        q = QTensor(w.qtype, tuple(w.shape[1:]), {"data": rows}, dict(w.params))
        return dequantize(q).to(dtype)

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
