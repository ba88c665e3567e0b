"""The quantized-tensor value every format reads and writes and the engine executes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class QTensor:
    """Packed storage of one tensor.

    ``shape`` is the logical torch shape (``[out, in]`` for a linear weight; the last dimension
    is the one blocks run along, GGML's ``ne[0]``). ``tensors`` holds the scheme's packed parts;
    GGML types keep a single ``data`` uint8 tensor of shape ``[rows, row_bytes]``.
    """

    qtype: str
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> torch.Tensor:
        return self.tensors["data"]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.qtype, self.shape, {k: v.to(device) for k, v in self.tensors.items()}, dict(self.params))
