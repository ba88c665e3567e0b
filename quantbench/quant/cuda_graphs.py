"""Replay GGML quantizers on CUDA as captured CUDA graphs.

Eager torch on a GPU is bound by kernel-launch latency here: the quantizers issue hundreds to
thousands of small kernels per call (positions within a block, candidate scales, refinement
sweeps). A CUDA graph records them once and replays them with one launch; the kernels and
their arguments are the same ones, so the bytes are the same.

Graphs are kept per ``(type, shape, has_qw, device)`` in a small LRU cache, each with static
input/output buffers: a call copies its input into the graph's buffers, replays, and returns a
copy of the output. A key's first call runs eagerly (it doubles as the warm-up that fills the
quantizers' per-device constant caches), its second one captures: one-off shapes, such as the
last slab of a tensor, then never hold a graph and its memory. Tensors above
``QUANTBENCH_CUDA_GRAPH_MAX_ELEMENTS`` (default 2^25) run eagerly: their kernels are large
enough that launches do not dominate, and a graph would keep all their scratch memory.

Every quantizer must be capturable (no host syncs, no host-to-device copies: see
``quantbench.quant.ggml.common.sync_free``). A capture that fails raises
:class:`QuantbenchError` after undoing what the failed capture left behind, so the process can
go on capturing other types; there is no silent eager fallback. ``QUANTBENCH_CUDA_GRAPHS=0``
turns graphs off.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from quantbench.errors import QuantbenchError

_MAX_ENTRIES = int(os.environ.get("QUANTBENCH_CUDA_GRAPH_CACHE", "8"))
_MAX_ELEMENTS = int(os.environ.get("QUANTBENCH_CUDA_GRAPH_MAX_ELEMENTS", str(1 << 25)))

Key = tuple[str, tuple[int, ...], bool, torch.device]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    qw: torch.Tensor | None
    out: torch.Tensor
    done: torch.cuda.Event = field(default_factory=torch.cuda.Event)


_lock = threading.RLock()
_graphs: OrderedDict[Key, _Entry] = OrderedDict()
_seen: set[Key] = set()


def enabled() -> bool:
    return os.environ.get("QUANTBENCH_CUDA_GRAPHS", "1") != "0"


def clear() -> None:
    """Drop every cached graph (and the memory its pool holds)."""
    with _lock:
        _graphs.clear()
        _seen.clear()


def cached_keys() -> list[Key]:
    with _lock:
        return list(_graphs)


def quantize_rows(t, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """``t.quantize_rows(x, qw)`` for a CUDA ``x``, through a cached graph where one applies."""
    if not enabled() or x.numel() == 0 or x.numel() > _MAX_ELEMENTS:
        return t.quantize_rows(x, qw)
    key: Key = (t.name, tuple(x.shape), qw is not None, x.device)
    with _lock:
        entry = _graphs.get(key)
        if entry is None:
            if key not in _seen:
                _seen.add(key)
                return t.quantize_rows(x, qw)
            entry = _capture(t, x, qw)
            _graphs[key] = entry
            while len(_graphs) > _MAX_ENTRIES:
                _graphs.popitem(last=False)
        _graphs.move_to_end(key)
        return _replay(entry, x, qw)


def _replay(entry: _Entry, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream()
        # The previous call may have been issued on another stream: its copy of the output
        # must be done before this call overwrites the static buffers.
        stream.wait_event(entry.done)
        entry.x.copy_(x)
        if qw is not None:
            entry.qw.copy_(qw)
        entry.graph.replay()
        out = entry.out.clone()
        entry.done.record(stream)
        return out


def _capture(t, x: torch.Tensor, qw: torch.Tensor | None) -> _Entry:
    device = x.device
    with torch.cuda.device(device), torch.no_grad():
        static_x = torch.empty(x.shape, dtype=torch.float32, device=device)
        static_x.copy_(x)
        static_qw = None
        if qw is not None:
            static_qw = torch.empty(qw.shape, dtype=torch.float32, device=device)
            static_qw.copy_(qw)
        # A fresh stream per capture: nothing a failed capture leaves on its stream can reach
        # later work or later captures.
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        error: BaseException | None = None
        began = False
        with torch.cuda.stream(stream):
            t.quantize_rows(static_x, static_qw)  # warm-up on the side stream
            stream.synchronize()
            try:
                graph.capture_begin(capture_error_mode="thread_local")
                began = True
                out = t.quantize_rows(static_x, static_qw)
            except BaseException as e:  # noqa: BLE001 - re-raised below as QuantbenchError
                error = e
            if began:
                try:
                    graph.capture_end()
                except BaseException as e:  # noqa: BLE001
                    error = error or e
                    _release_pool(device, graph)
        if error is not None:
            _recover(device)
            raise QuantbenchError(
                f"CUDA graph capture of {t.name} quantize_rows (shape {tuple(x.shape)}, "
                f"imatrix={qw is not None}) failed: {type(error).__name__}: {error}. The quantizer "
                f"must not sync with the host or copy host data to the device; set "
                f"QUANTBENCH_CUDA_GRAPHS=0 to run it eagerly."
            ) from error
        torch.cuda.current_stream().wait_stream(stream)
        return _Entry(graph, static_x, static_qw, out)


def _release_pool(device: torch.device, graph: torch.cuda.CUDAGraph) -> None:
    """After a failed ``capture_end`` torch has not told the allocator that the capture is over."""
    try:
        torch._C._cuda_endAllocateToPool(device.index, graph.pool())
    except Exception:  # noqa: BLE001 - best effort: already ended, or API absent
        pass


def _recover(device: torch.device) -> None:
    """Leave no pending CUDA error behind for the next kernel launch to report as its own."""
    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001
        pass
    try:
        torch.cuda.cudart().cudaGetLastError()
    except Exception:  # noqa: BLE001
        pass
