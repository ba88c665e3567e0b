"""CUDA graph replay of the quantizers: every type captures, replays the same bytes as the CPU,
reads its new input on every call, and a refused capture raises without breaking later ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.errors import QuantbenchError
from quantbench.quant import all_types, get_type
from quantbench.quant import cuda_graphs
from quantbench.quant.ggml.common import seq_sum
from quantbench.quant.registry import GGMLType, quantize_rows
from tests.quant.ggml.cases import make_cases, make_imatrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

BLOCK_TYPES = [t.name for t in all_types() if t.block_size > 1]


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Every stress case of ``cases.py`` stacked into one tensor, so one graph sees them all."""
    return torch.from_numpy(np.concatenate(list(make_cases(n, rows=8, seed=seed).values())))


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_graph_replay_bytes_equal_cpu(qtype: str, use_imatrix: bool) -> None:
    t = get_type(qtype)
    n = 1024 if t.block_size == 256 else 32 * 33
    qw = torch.from_numpy(make_imatrix(n)) if use_imatrix else None
    qwd = None if qw is None else qw.cuda()
    cuda_graphs.clear()
    for call, seed in enumerate((0, 1, 2, 3)):  # eager, capture, replay, replay
        x = _inputs(n, seed)
        got = quantize_rows(t, x.cuda(), qwd).cpu()
        assert torch.equal(got, t.quantize_rows(x, qw)), f"{qtype} call {call}"
    assert (qtype, (x.shape[0], n), use_imatrix, torch.device("cuda", torch.cuda.current_device())) in (
        cuda_graphs.cached_keys()
    )


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q3_K", "Q4_K", "Q2_K", "IQ4_XS"])
def test_eager_cuda_never_syncs(qtype: str) -> None:
    """torch's sync debug mode raises on host syncs and blocking host-to-device copies."""
    t = get_type(qtype)
    x = torch.randn(16, 512, device="cuda")
    qw = torch.rand(512, device="cuda")
    for w in (None, qw):
        t.quantize_rows(x, w)  # first use fills the constant caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            t.quantize_rows(x, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _syncing_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    if bool((x > 0).any()):  # a host sync: capture must refuse it
        x = x + 1
    return x.to(torch.uint8).reshape(x.shape[0], -1)


def _copying_rows(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    c = torch.tensor([1.0, 2.0], device=x.device)  # a host-to-device copy on every call
    return (x * c[0]).to(torch.uint8).reshape(x.shape[0], -1)


@pytest.mark.parametrize("bad", [_syncing_rows, _copying_rows], ids=["sync", "h2d"])
def test_refused_capture_raises_and_leaves_process_usable(bad) -> None:
    fake = GGMLType("BAD", 10_000, 32, 32, bad, lambda b: b.float())
    x = torch.randn(8, 64, device="cuda")
    cuda_graphs.clear()
    quantize_rows(fake, x, None)  # first use: eager
    with pytest.raises(QuantbenchError, match="CUDA graph capture of BAD"):
        quantize_rows(fake, x, None)
    # Plain CUDA work and a real capture still work afterwards.
    assert torch.equal((x + 1).cpu(), x.cpu() + 1)
    t = get_type("Q4_K")
    xc = torch.randn(4, 512)
    for _ in range(3):
        assert torch.equal(quantize_rows(t, xc.cuda(), None).cpu(), t.quantize_rows(xc, None))
    assert any(k[0] == "Q4_K" for k in cuda_graphs.cached_keys())


def test_lru_keeps_a_few_graphs(monkeypatch) -> None:
    monkeypatch.setattr(cuda_graphs, "_MAX_ENTRIES", 2)
    cuda_graphs.clear()
    t = get_type("Q8_0")
    for rows in (2, 3, 4, 2, 3, 4):
        for _ in range(2):
            quantize_rows(t, torch.randn(rows, 64, device="cuda"), None)
    assert len(cuda_graphs.cached_keys()) == 2


@pytest.mark.parametrize("shape,dim", [((7, 4096), 1), ((32, 3, 1000), 0), ((256, 1), 0), ((5, 16, 16), 2)])
def test_cuda_seq_sum_is_the_c_loop(shape: tuple[int, ...], dim: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 4)
    x.view(-1)[::7] = -0.0
    for from_first in (False, True):
        want = seq_sum(x, dim, from_first=from_first)
        got = seq_sum(x.cuda(), dim, from_first=from_first).cpu()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    z = torch.full(shape, -0.0)
    assert torch.equal(seq_sum(z.cuda(), dim, from_first=True).cpu().view(torch.int32),
                       seq_sum(z, dim, from_first=True).view(torch.int32))
