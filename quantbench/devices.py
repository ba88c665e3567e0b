"""One reading of ``--device``, shared by every job and the engine."""

from __future__ import annotations

import torch

from quantbench.errors import InputValueError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when torch sees one, else CPU; asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputValueError("--device cuda was asked for but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputValueError(f"unknown device {device!r}: use cpu, cuda or auto")
    return torch.device(device)
