"""Token generation with a KV cache: prefill the prompt once, then one token per forward."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from quantbench.engine.loader import LoadedModel
from quantbench.engine.sampling import Sampler
from quantbench.errors import InputValueError


@dataclass
class Generation:
    tokens: list[int]
    stopped_on_eos: bool
    prefill_s: float
    decode_s: float
    prompt_len: int = 0
    timings: list[float] = field(default_factory=list)


def context_limit(lm: LoadedModel, ctx: int | None) -> int:
    return int(ctx or lm.args.max_position_embeddings)


@torch.inference_mode()
def generate(lm: LoadedModel, prompt: list[int], max_tokens: int, sampler: Sampler | None = None,
             stop_ids: set[int] | None = None, ctx: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Generate up to ``max_tokens`` after ``prompt``; stop early on any id in ``stop_ids``."""
    sampler = sampler or Sampler()
    limit = context_limit(lm, ctx)
    if not prompt:
        raise InputValueError("the prompt is empty")
    if len(prompt) >= limit:
        raise InputValueError(f"the prompt has {len(prompt)} tokens; the context holds {limit}")
    max_tokens = min(max_tokens, limit - len(prompt))
    model = lm.model
    dev = model.model.norm.weight.device
    cache = model.make_cache(len(prompt) + max_tokens)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt], device=dev), cache=cache, start=0, last_only=True)
    nxt = sampler(logits[0, -1])
    sync()
    prefill = time.perf_counter() - t0
    out: list[int] = []
    timings: list[float] = []
    stop_ids = stop_ids or set()
    stopped = False
    pos = len(prompt)
    t1 = time.perf_counter()
    while True:
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if nxt in stop_ids:
            stopped = True
            break
        if len(out) >= max_tokens:
            break
        ts = time.perf_counter()
        logits = model(torch.tensor([[nxt]], device=dev), cache=cache, start=pos)
        pos += 1
        nxt = sampler(logits[0, -1])
        sync()
        timings.append(time.perf_counter() - ts)
    return Generation(out, stopped, prefill, time.perf_counter() - t1, len(prompt), timings)
