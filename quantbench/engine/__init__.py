"""The inference engine: models from HF dirs and GGUF files, quantized linear layers, eval, generation."""

from quantbench.engine.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
