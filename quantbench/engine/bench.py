"""Prefill and decode throughput, measured like mistral.rs's ``bench``: synthetic prompt, timed runs."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from quantbench.engine.loader import LoadedModel
from quantbench.errors import InputValueError


@dataclass
class BenchStat:
    mean: float
    std: float

    @classmethod
    def of(cls, xs: list[float]) -> "BenchStat":
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class BenchResult:
    prompt_len: int
    gen_len: int
    iterations: int
    prefill_tok_s: BenchStat
    decode_tok_s: BenchStat
    ttft_ms: BenchStat
    tpot_ms: BenchStat

    def as_dict(self) -> dict:
        return {k: (v.__dict__ if isinstance(v, BenchStat) else v) for k, v in self.__dict__.items()}


@torch.inference_mode()
def bench(lm: LoadedModel, prompt_len: int = 512, gen_len: int = 128, iterations: int = 3, warmup: int = 1,
          seed: int = 0) -> BenchResult:
    """Time prefill of ``prompt_len`` random tokens, then ``gen_len`` greedy decode steps."""
    if prompt_len < 1 or gen_len < 1 or iterations < 1 or warmup < 0:
        raise InputValueError("--prompt-len, --gen-len and --iterations must be >= 1, --warmup >= 0")
    total = prompt_len + gen_len
    if total > lm.args.max_position_embeddings:
        raise InputValueError(f"prompt + generation = {total} tokens exceeds the context {lm.args.max_position_embeddings}")
    model = lm.model
    dev = model.model.norm.weight.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, lm.args.vocab_size, (1, prompt_len), generator=g).to(dev)
    pre, dec, ttft, tpot = [], [], [], []
    for it in range(warmup + iterations):
        cache = model.make_cache(total)
        sync()
        t0 = time.perf_counter()
        logits = model(prompt, cache=cache, start=0, last_only=True)
        nxt = logits[0, -1].argmax().view(1, 1)
        sync()
        t1 = time.perf_counter()
        for i in range(gen_len):
            logits = model(nxt, cache=cache, start=prompt_len + i)
            nxt = logits[0, -1].argmax().view(1, 1)
        sync()
        t2 = time.perf_counter()
        if it >= warmup:
            pre.append(prompt_len / (t1 - t0))
            dec.append(gen_len / (t2 - t1))
            ttft.append((t1 - t0) * 1e3)
            tpot.append((t2 - t1) * 1e3 / gen_len)
    return BenchResult(prompt_len, gen_len, iterations, BenchStat.of(pre), BenchStat.of(dec),
                       BenchStat.of(ttft), BenchStat.of(tpot))
