"""Perplexity exactly as ``llama-perplexity`` computes it, and KL divergence against saved base logits.

The text is tokenized once (with BOS when the vocabulary asks for it) and cut into
non-overlapping windows of ``ctx`` tokens; each window's first token becomes BOS, and only the
second half of each window is scored (positions ``ctx/2 .. ctx-2`` predicting the next token), so
every scored token has at least ``ctx/2`` tokens of context. The error estimate is llama.cpp's:
``ppl * sqrt(var(nll) / (n - 1))``.

Base logits for KLD are stored as float16 log-probabilities of the scored positions (the same
size as llama.cpp's uint16 encoding), in a small self-describing file: a JSON header line with the
token ids, ``ctx``, chunk count and vocabulary size, so a mismatched text or setting is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quantbench.engine.loader import LoadedModel
from quantbench.errors import FormatError, InputValueError

MAGIC = b"QBLOGITS1\n"


@dataclass
class EvalResult:
    ppl: float
    ppl_err: float
    n_scored: int
    n_chunks: int
    ctx: int
    chunk_ppl: list[float] = field(default_factory=list)
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_p99: float | None = None
    kld_median: float | None = None
    same_top: float | None = None
    same_top_err: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def windows(tokens: list[int], ctx: int, chunks: int | None, bos: int | None) -> list[list[int]]:
    if ctx < 4 or ctx % 2:
        raise InputValueError(f"--ctx must be an even number >= 4, got {ctx}")
    if len(tokens) < 2 * ctx:
        raise InputValueError(f"the text has {len(tokens)} tokens; perplexity needs at least 2*ctx = {2 * ctx}")
    n = len(tokens) // ctx
    if chunks is not None and chunks > 0:
        n = min(n, chunks)
    out = []
    for i in range(n):
        w = list(tokens[i * ctx:(i + 1) * ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


class _BaseLogits:
    """Reader/writer of the float16 base log-prob file (written to a temp name, renamed at the end)."""

    def __init__(self, path: Path, header: dict, mode: str) -> None:
        self.path, self.header, self.mode = path, header, mode
        self.rows = header["ctx"] - 1 - header["ctx"] // 2
        self.row_bytes = self.rows * header["n_vocab"] * 2

    @classmethod
    def create(cls, path: Path, header: dict) -> "_BaseLogits":
        obj = cls(path, header, "w")
        obj.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        obj.f = open(obj.tmp, "wb")
        obj.f.write(MAGIC + json.dumps(header).encode() + b"\n")
        return obj

    @classmethod
    def open(cls, path: Path) -> "_BaseLogits":
        if not path.is_file():
            raise FormatError(f"{path}: no such base-logits file")
        f = open(path, "rb")
        if f.read(len(MAGIC)) != MAGIC:
            raise FormatError(f"{path}: not a quantbench base-logits file (write one with --save-logits)")
        try:
            header = json.loads(f.readline())
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: corrupt header ({e})") from e
        obj = cls(path, header, "r")
        obj.f = f
        obj.data_start = f.tell()
        expected = obj.data_start + header["n_chunks"] * obj.chunk_bytes
        if path.stat().st_size != expected:
            raise FormatError(f"{path}: truncated ({path.stat().st_size} bytes, header implies {expected})")
        return obj

    @property
    def chunk_bytes(self) -> int:
        return self.row_bytes

    def write(self, logp: torch.Tensor) -> None:
        self.f.write(logp.to(torch.float16).cpu().numpy().tobytes())

    def read(self, i: int) -> torch.Tensor:
        self.f.seek(self.data_start + i * self.chunk_bytes)
        buf = self.f.read(self.chunk_bytes)
        a = np.frombuffer(buf, dtype=np.float16).reshape(self.rows, self.header["n_vocab"])
        return torch.from_numpy(a.astype(np.float32))

    def commit(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if self.mode == "w" and self.tmp.exists():
            self.tmp.unlink()


@torch.inference_mode()
def evaluate(lm: LoadedModel, text: str, ctx: int = 512, chunks: int | None = None,
             save_logits: str | os.PathLike[str] | None = None, kl_base: str | os.PathLike[str] | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> EvalResult:
    """PPL over ``text`` (and KLD vs ``kl_base`` when given); ``progress(done, total, tokens_per_s)``."""
    import time

    if not text.strip():
        raise InputValueError("the evaluation text is empty")
    tok = lm.tokenizer
    ids = tok.encode(text, add_special=True)
    bos = tok.bos_id if tok.add_bos else None
    wins = windows(ids, ctx, chunks, bos)
    if ctx > lm.args.max_position_embeddings:
        raise InputValueError(f"--ctx {ctx} exceeds the model's context length {lm.args.max_position_embeddings}")
    first = ctx // 2
    header = {"ctx": ctx, "n_chunks": len(wins), "n_vocab": lm.args.vocab_size,
              "tokens_sha": _sha(wins), "model": str(lm.source)}
    base = writer = None
    if kl_base is not None:
        base = _BaseLogits.open(Path(kl_base))
        for key in ("ctx", "n_vocab", "tokens_sha"):
            if base.header[key] != header[key]:
                raise InputValueError(f"{kl_base}: base logits were made with a different {key} "
                                      f"({base.header[key]} vs {header[key]})")
        if base.header["n_chunks"] < len(wins):
            raise InputValueError(f"{kl_base}: holds {base.header['n_chunks']} chunks, {len(wins)} asked for")
    if save_logits is not None:
        writer = _BaseLogits.create(Path(save_logits), header)
    model = lm.model
    dev = model.model.norm.weight.device
    nll_sum = nll2_sum = 0.0
    count = 0
    chunk_ppl: list[float] = []
    klds: list[torch.Tensor] = []
    same: list[torch.Tensor] = []
    t0 = time.perf_counter()
    try:
        for i, w in enumerate(wins):
            x = torch.tensor([w], device=dev)
            logits = model(x)[0, first:ctx - 1].double()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(w[first + 1:], device=dev)
            nll = -logp.gather(1, target[:, None])[:, 0]
            nll_sum += float(nll.sum())
            nll2_sum += float((nll * nll).sum())
            count += nll.numel()
            chunk_ppl.append(math.exp(nll_sum / count))
            if writer is not None:
                writer.write(logp)
            if base is not None:
                bp = base.read(i).to(dev).double()
                # KL(base || this) per position, as llama-perplexity's --kl-divergence
                klds.append((bp.exp() * (bp - logp)).sum(-1).cpu())
                same.append((bp.argmax(-1) == logp.argmax(-1)).cpu())
            if progress:
                progress(i + 1, len(wins), (i + 1) * ctx / (time.perf_counter() - t0))
        if writer is not None:
            writer.commit()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if base is not None:
            base.f.close()
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    res = EvalResult(ppl, ppl * err, count, len(wins), ctx, chunk_ppl, seconds=time.perf_counter() - t0)
    if klds:
        k = torch.cat(klds).double()
        s = torch.cat(same).double()
        res.kld_mean = float(k.mean())
        res.kld_err = float(k.std() / math.sqrt(k.numel())) if k.numel() > 1 else 0.0
        res.kld_p99 = float(torch.quantile(k, 0.99))
        res.kld_median = float(torch.quantile(k, 0.5))
        res.same_top = float(s.mean())
        res.same_top_err = float(math.sqrt(res.same_top * (1 - res.same_top) / max(s.numel() - 1, 1)))
    return res


def _sha(wins: list[list[int]]) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(wins, dtype=np.int64).tobytes()).hexdigest()[:16]
