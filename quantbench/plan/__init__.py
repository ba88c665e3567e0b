"""Per-tensor quantization plans: which type each tensor of a model gets."""

from quantbench.plan.llama_mixture import (
    FTYPES,
    FType,
    TensorPlan,
    TensorSpec,
    get_ftype,
    inputs_from_gguf,
    loader_order_key,
    n_fallback,
    plan_tensors,
)

__all__ = [
    "FTYPES",
    "FType",
    "TensorPlan",
    "TensorSpec",
    "get_ftype",
    "inputs_from_gguf",
    "loader_order_key",
    "n_fallback",
    "plan_tensors",
]
