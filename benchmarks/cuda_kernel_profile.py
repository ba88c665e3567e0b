"""Where a quantizer's GPU time goes: kernel count, summed kernel time, graph replay time.

For each type (plain and with imatrix) on one 4096x4096 normal tensor: one eager call under
torch.profiler gives the number of kernels and their summed device time (a floor for a graph
replay, which removes only the gaps between kernels), and the top kernels by time; then the
replay time of the cached CUDA graph. Usage:
    python benchmarks/cuda_kernel_profile.py Q3_K,Q4_K,Q4_0
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantbench.quant import get_type  # noqa: E402
from quantbench.quant.registry import quantize_rows  # noqa: E402


def _replay_ms(t, x, qw) -> float:
    for _ in range(2):
        quantize_rows(t, x, qw)  # eager first use, then capture
    torch.cuda.synchronize()
    reps = []
    for _ in range(5):
        t0 = time.perf_counter()
        quantize_rows(t, x, qw)
        torch.cuda.synchronize()
        reps.append(time.perf_counter() - t0)
    return min(reps) * 1e3


def _kernels(t, x, qw) -> tuple[int, float, list[tuple[str, float, int]]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t.quantize_rows(x, qw)
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name].append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    n = sum(len(v) for v in by_name.values())
    total = sum(sum(v) for v in by_name.values()) / 1e3
    top = sorted(((k[:70], sum(v) / 1e3, len(v)) for k, v in by_name.items()), key=lambda r: -r[1])[:6]
    return n, total, top


def main() -> None:
    types = sys.argv[1].split(",") if len(sys.argv) > 1 else ["Q4_K"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", generator=g)
    im = torch.randn(4096, device="cuda", generator=g) ** 2
    for name in types:
        t = get_type(name)
        for qw in ((None, im) if t.uses_imatrix else (None,)):
            t.quantize_rows(x, qw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            t.quantize_rows(x, qw)
            torch.cuda.synchronize()
            eager = time.perf_counter() - t0
            n, ktime, top = _kernels(t, x, qw)
            replay = _replay_ms(t, x, qw)
            print(f"{name:6s} imatrix={qw is not None!s:5s} eager {eager * 1e3:7.2f} ms  kernels {n:6d}  "
                  f"kernel time {ktime:7.2f} ms  graph replay {replay:7.2f} ms", flush=True)
            for k, ms, cnt in top:
                print(f"      {ms:7.2f} ms {cnt:5d}x  {k}")


if __name__ == "__main__":
    main()
