"""Next-token sampling: greedy at temperature 0, else temperature → top-k → top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantbench.errors import InputValueError


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputValueError(f"--top-k must be >= 0, got {self.top_k}")
        self._gen = torch.Generator()
        if self.seed is not None:
            self._gen.manual_seed(self.seed)
        else:
            self._gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """``logits`` [V] float32 → token id."""
        if self.temperature == 0:
            return int(torch.argmax(logits))
        x = logits.float().cpu() / self.temperature
        if self.top_k:
            kth = torch.topk(x, min(self.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if self.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < self.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=self._gen))
