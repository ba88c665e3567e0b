"""Collect an importance matrix by running calibration text through the engine, as llama-imatrix does.

What llama-imatrix (tools/imatrix/imatrix.cpp) does, and so what this does:

* the whole file is read as UTF-8, one trailing newline dropped, and tokenized once with BOS
  (``add_special``, no special-token parsing); it is cut into ``len // ctx`` windows of ``ctx``
  tokens (``--chunks`` keeps the first N), and each window's first token is replaced by BOS when
  the vocabulary adds one. Every window is evaluated from an empty KV cache.
* for every matrix multiply whose weight is a ``blk.*`` tensor (plus ``output.weight`` with
  ``--process-output``), the input's squared values are summed per column and the rows counted.
  For MoE expert stacks each (token, chosen expert) pair adds that token's row to that expert's
  sums and one to its count; the router (``ffn_gate_inp``) counts as a dense matrix.
* ``imatrix.chunk_size`` is ``ctx`` and ``imatrix.chunk_count`` the number of windows evaluated.

Statistics are taken by forward pre-hooks on the engine's :class:`QLinear` layers (named by
``hf_name``, mapped to GGUF names) and on :class:`QExperts` stacks. The expert hook recomputes each
routed expert's gate/up product to see the down projection's input, so collection on MoE models
costs about one extra gate/up pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from quantbench.errors import ImatrixError
from quantbench.imatrix.files import Imatrix, ImatrixEntry, format_for_path, write_imatrix
from quantbench.imatrix.names import hf_to_gguf

MIN_CTX = 16  # llama-imatrix skips matrix multiplies over fewer than 16 rows


class _Stats:
    """Running per-column sums of squares (float64) and row counts for one GGUF tensor."""

    def __init__(self, n_mat: int, cols: int, device: torch.device) -> None:
        self.sums = torch.zeros(n_mat, cols, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n_mat, dtype=torch.int64, device=device)

    def add_dense(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sums[0] += x.square().sum(0)  # one window's sum in float32, the running total in float64
        self.counts[0] += x.shape[0]

    def entry(self) -> ImatrixEntry:
        return ImatrixEntry(self.sums.reshape(-1).float().cpu().numpy(), self.counts.cpu().numpy())


class Collector:
    """Hooks a loaded engine model and accumulates llama-imatrix statistics while it runs."""

    def __init__(self, model: torch.nn.Module, *, process_output: bool = False, tied_output: bool = False) -> None:
        from quantbench.engine.linear import QExperts, QLinear

        self.stats: dict[str, _Stats] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, QLinear):
                key = hf_to_gguf(module.hf_name)
                if key.name == "output.weight" and (not process_output or tied_output):
                    continue  # tied: llama.cpp's output matmul reads token_embd.weight, which it skips
                if key.expert is not None:
                    raise ImatrixError(f"{module.hf_name}: per-expert linear layers are not expected here")
                self._handles.append(module.register_forward_pre_hook(self._dense_hook(key.name, module)))
            elif isinstance(module, QExperts):
                names = {which: hf_to_gguf(f"{module.hf_name}.{which}").name
                         for which in ("gate_proj", "up_proj", "down_proj")}
                self._handles.append(module.register_forward_pre_hook(self._experts_hook(names, module)))
        if not self._handles:
            raise ImatrixError("the model has no linear layers to collect statistics for")

    def _get(self, name: str, n_mat: int, cols: int, device: torch.device) -> _Stats:
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = _Stats(n_mat, cols, device)
        return s

    def _dense_hook(self, name: str, module) -> Callable:
        def hook(_mod, args):
            x = args[0]
            self._get(name, 1, module.in_features, x.device).add_dense(x)

        return hook

    def _experts_hook(self, names: dict[str, str], module) -> Callable:
        def hook(_mod, args):
            x, top_idx = args[0], args[1]  # x [N, hidden], top_idx [N, k]
            E = module.n_experts
            x32 = x.float()
            # routing matrix: how many of each token's k slots chose each expert (0 or 1)
            route = torch.zeros(x.shape[0], E, dtype=torch.float32, device=x.device)
            route.scatter_add_(1, top_idx, torch.ones_like(top_idx, dtype=torch.float32))
            per_expert = route.sum(0).to(torch.int64)
            sq = route.T @ x32.square()  # [E, hidden]
            for which in ("gate_proj", "up_proj"):
                s = self._get(names[which], E, module.hidden, x.device)
                s.sums += sq
                s.counts += per_expert
            down = self._get(names["down_proj"], E, module.ff, x.device)
            for e in torch.nonzero(per_expert).flatten().tolist():
                tok = torch.nonzero(route[:, e]).flatten()
                h = x[tok]
                y = module.act(F.linear(h, module._expert("gate_proj", e, x.dtype))) * F.linear(
                    h, module._expert("up_proj", e, x.dtype))
                down.sums[e] += y.float().square().sum(0)
            down.counts += per_expert

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def imatrix(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        entries = {name: s.entry() for name, s in sorted(self.stats.items())}
        return Imatrix(entries, datasets, chunk_count, chunk_size, fmt="gguf")


def read_calibration_text(path: str | os.PathLike[str]) -> str:
    """The calibration file as llama.cpp reads ``-f``: raw UTF-8 with one trailing newline dropped."""
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{p}: no such calibration file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImatrixError(f"{p}: calibration file is not UTF-8 text (byte {e.start})") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise ImatrixError(f"{p}: calibration file is empty")
    return text


def calibration_windows(tokens: list[int], ctx: int, chunks: int | None, bos_id: int | None,
                        source: str) -> torch.Tensor:
    """``[n, ctx]`` windows of ``tokens`` (llama-imatrix's chunking), first token of each set to BOS."""
    if ctx < MIN_CTX:
        raise ImatrixError(f"--ctx {ctx}: must be at least {MIN_CTX} tokens (llama-imatrix ignores smaller batches)")
    if chunks is not None and chunks < 1:
        raise ImatrixError(f"--chunks {chunks}: must be at least 1")
    n = len(tokens) // ctx
    if n == 0:
        raise ImatrixError(f"{source}: tokenizes to {len(tokens)} tokens, fewer than one window of --ctx {ctx}")
    if chunks is not None:
        n = min(n, chunks)
    w = torch.tensor(tokens[: n * ctx], dtype=torch.long).view(n, ctx)
    if bos_id is not None:
        w[:, 0] = bos_id
    return w


@dataclass
class ImatrixReport:
    output: Path
    fmt: str
    entries: int
    chunks: int
    ctx: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def collect_imatrix(
    loaded,
    calibration_file: str | os.PathLike[str],
    *,
    ctx: int = 512,
    chunks: int | None = None,
    process_output: bool = False,
    batch: int = 1,
    progress: bool = True,
) -> Imatrix:
    """Run ``calibration_file`` through ``loaded`` (a :class:`quantbench.engine.LoadedModel`)."""
    if loaded.tokenizer is None:
        raise ImatrixError(f"{loaded.source}: model was loaded without a tokenizer")
    if batch < 1:
        raise ImatrixError(f"--batch {batch}: must be at least 1")
    text = read_calibration_text(calibration_file)
    tok = loaded.tokenizer
    tokens = tok.encode(text, add_special=True, parse_special=False)
    bos = tok.bos_id if tok.add_bos else None
    windows = calibration_windows(tokens, ctx, chunks, bos, str(calibration_file))
    model = loaded.model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    collector = Collector(model, process_output=process_output,
                          tied_output=bool(getattr(loaded.config, "tie_word_embeddings", False)))
    bar = _progress(windows.numel(), progress)
    try:
        with torch.inference_mode():
            for i in range(0, windows.shape[0], batch):
                ids = windows[i : i + batch].to(device)
                model(ids, None, 0, last_only=not process_output)
                bar.update(ids.numel())
    finally:
        collector.close()
        bar.close()
    if not collector.stats:
        raise ImatrixError(f"{loaded.source}: no statistics were collected")
    return collector.imatrix([str(calibration_file)], int(windows.shape[0]), ctx)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="imatrix", disable=not enabled, leave=False)


def imatrix_command(
    model: str,
    calibration_file: str,
    output: str,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    fmt: str | None = None,
    process_output: bool = False,
    device: str = "auto",
    dtype: str = "f32",
    batch: int = 1,
    progress: bool = True,
) -> ImatrixReport:
    """``quantbench imatrix``: collect over ``calibration_file`` with ``model`` and write ``output``.

    The format comes from ``fmt`` or the output's suffix and is checked before the model loads.
    """
    from quantbench.engine import load_model

    out_fmt = format_for_path(output, fmt)
    if not Path(calibration_file).is_file():
        raise ImatrixError(f"{calibration_file}: no such calibration file")
    loaded = load_model(model, dtype=dtype, device=device)
    t0 = time.perf_counter()
    im = collect_imatrix(loaded, calibration_file, ctx=ctx, chunks=chunks, process_output=process_output,
                         batch=batch, progress=progress)
    seconds = time.perf_counter() - t0
    write_imatrix(im, output, out_fmt, arch=loaded.arch)
    return ImatrixReport(Path(output), out_fmt, len(im.entries), im.chunk_count, ctx,
                         im.chunk_count * ctx, seconds)
