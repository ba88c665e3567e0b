"""Architecture registry: HF ``model_type`` and GGUF ``general.architecture`` → model file."""

from __future__ import annotations

import importlib
from types import ModuleType

from quantbench.errors import FormatError

ARCH_MODULES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3")


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"quantbench.engine.models.{m}") for m in ARCH_MODULES]


def module_for_hf(model_type: str, origin: str) -> ModuleType:
    for m in _modules():
        if model_type in m.HF_MODEL_TYPES:
            return m
    known = sorted(t for m in _modules() for t in m.HF_MODEL_TYPES)
    raise FormatError(f"{origin}: model_type {model_type!r} is not supported (supported: {', '.join(known)})")


def module_for_gguf(arch: str, origin: str) -> ModuleType:
    for m in _modules():
        if arch in m.GGUF_ARCHES:
            return m
    known = sorted(a for m in _modules() for a in m.GGUF_ARCHES)
    raise FormatError(f"{origin}: GGUF architecture {arch!r} is not supported (supported: {', '.join(known)})")


def module_for_arch(arch: str) -> ModuleType:
    return importlib.import_module(f"quantbench.engine.models.{arch}")
