"""Quantization math: one module per scheme, a registry keyed by type name."""

from quantbench.quant.qtensor import QTensor
from quantbench.quant.registry import GGMLType, all_types, dequantize, get_type, get_type_by_id, quantize

__all__ = ["QTensor", "GGMLType", "all_types", "dequantize", "get_type", "get_type_by_id", "quantize"]
