"""The sync-free quantizer paths (what CUDA runs, capturable in a CUDA graph), checked on the CPU.

CUDA runs every quantizer without host syncs or host-to-device copies: fixed sweep counts
instead of early exits, masks instead of compaction, exact level rounding without a range
check. These tests run those paths on the CPU against llama.cpp, and on the meta device,
where any read of a device value on the host raises.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from quantbench.quant import all_types, get_type
from quantbench.quant.ggml.common import clamped_levels_, forced_sync_free, nearest_int, seq_sum
from tests.quant.ggml.cases import check_against_oracle, make_cases, make_imatrix

BLOCK_TYPES = [t.name for t in all_types() if t.block_size > 1]


def _row_len(block_size: int) -> int:
    return 768 if block_size == 256 else 32 * 7


@pytest.mark.oracle
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_sync_free_path_bytes_identical(qtype: str, use_imatrix: bool, ggml_oracle) -> None:
    n = _row_len(get_type(qtype).block_size)
    im = make_imatrix(n) if use_imatrix else None
    with forced_sync_free():
        for case, x in make_cases(n).items():
            check_against_oracle(qtype, x, im, ggml_oracle, f"{qtype}/{case}/sync-free")


class _NoHostCopies(TorchFunctionMode):
    """Fails on tensor creation from host data, and on copies of host tensors to a device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("tensor", "as_tensor", "from_numpy"):
            raise AssertionError(f"torch.{name} in a quantizer call: a host-to-device copy per call")
        if name in ("to", "copy_", "cuda"):
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and a.device.type == "cpu":
                    raise AssertionError(f"{name} of a host tensor in a quantizer call")
        return func(*args, **kwargs)


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_capturable_on_meta(qtype: str, use_imatrix: bool) -> None:
    """Meta tensors have no values: ``bool()``, ``.item()`` and ``nonzero`` raise on them."""
    t = get_type(qtype)
    n = _row_len(t.block_size)
    x = torch.empty(5, n, device="meta")
    qw = torch.empty(n, device="meta") if use_imatrix else None
    t.quantize_rows(x, qw)  # first use fills the per-device constant caches
    with _NoHostCopies():
        out = t.quantize_rows(x, qw)
    assert out.shape == (5, t.row_bytes(n)) and out.dtype == torch.uint8


def test_clamped_levels_equals_nearest_int() -> None:
    special = [0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, 4194303.0, 4194304.0, 4194305.0, 8388607.5, 1e10, -1e10,
               3e38, -3e38, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 2.4999998, 31.5, 32.5]
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.tensor(special), torch.randn(20000, generator=g) * 40,
                   torch.randn(20000, generator=g) * 1e7, (torch.rand(20000, generator=g) - 0.5).mul(2e38)])
    for lo, hi in ((0, 3), (0, 15), (0, 31), (-4, 3), (-32, 31)):
        want = nearest_int(v).clamp_(lo, hi).to(torch.float32)
        got = clamped_levels_(v.clone(), lo, hi)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (lo, hi)


def test_seq_sum_from_first_keeps_negative_zero() -> None:
    x = torch.tensor([[-0.0, -0.0, -0.0], [-0.0, 0.0, -0.0], [1.0, -1.0, -0.0]])
    s = seq_sum(x, dim=1, from_first=True)
    assert torch.signbit(s).tolist() == [True, False, False]
    assert torch.signbit(seq_sum(x, dim=1)).tolist() == [False, False, False]
