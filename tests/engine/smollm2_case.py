"""What the SmolLM2-vs-llama.cpp tests share: the F32 GGUF, the 256-token passage, our logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quantbench.engine.tokenizer import Tokenizer
from tests import llama_tools
from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

WIKI = llama_tools.SHARED_DATA / "wiki.test.raw"


def f32_path() -> Path:
    """SmolLM2 dequantized to an F32 GGUF (cached)."""
    return make_f32_gguf(smollm2_gguf())


def passage(path: Path) -> list[int]:
    """The 256-token WikiText-2 passage the logits and KL tests compare on."""
    text = WIKI.read_text(encoding="utf-8")[5000:20000]
    return Tokenizer.from_gguf(path).encode(text)[:256]


def logits(lm, tokens: list[int]) -> np.ndarray:
    """Our logits for every position of ``tokens``, float32 [T, vocab]."""
    with torch.inference_mode():
        return lm.model(torch.tensor([tokens])).numpy()[0]
