"""One error family for everything a user can get wrong.

The CLI catches ``QuantbenchError`` once and prints its message as a single line, so every
message must name the file, tensor or field at fault.
"""


class QuantbenchError(Exception):
    """Base of every error quantbench raises on purpose."""


class UnknownTypeError(QuantbenchError):
    """A quantization type or ftype name that quantbench does not know."""


class ShapeError(QuantbenchError):
    """A tensor whose shape does not fit the requested quantization type."""


class FormatError(QuantbenchError):
    """A file that is not what it claims to be: bad magic, truncated, inconsistent."""


class ImatrixError(QuantbenchError):
    """An importance matrix that is unreadable or does not match the model."""


class InputValueError(QuantbenchError):
    """Tensor values a scheme cannot represent (NaN, inf)."""
