"""quantbench: quantize LLMs, convert between formats, and prove the result's quality."""

__version__ = "0.1.0"
