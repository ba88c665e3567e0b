"""Check and time the engine's Triton GGML kernels on CUDA (see benchmarks/NOTES.md, "engine CUDA dequant").

1. Exactness: every kernel type, odd row counts, three row lengths, f32/bf16/f16 output against
   ``quantbench.quant.dequantize(q).to(dtype)`` bit for bit, on real quantizer output and on raw
   random bytes; the fused GEMV against a float64 product.
2. Timing (``triton.testing.do_bench`` medians, L2 flushed between runs) on Llama-3-8B layer
   shapes: decode (one input row) with bf16 weights, the torch reference dequantizer, the Triton
   dequantizer, and the fused GEMV over a launch-shape sweep; prefill (512 rows) with bf16 weights
   and with the Triton dequantizer feeding the matmul.

    python benchmarks/engine_cuda_kernels.py [--skip-check] [--skip-sweep] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DECODE_SHAPES = [  # (what, rows = out features, k = in features, GGML type) in Llama-3-8B Q4_K_M
    ("q/o_proj", 4096, 4096, "Q4_K"),
    ("k_proj", 1024, 4096, "Q4_K"),
    ("v_proj", 1024, 4096, "Q6_K"),
    ("gate/up", 14336, 4096, "Q4_K"),
    ("down", 4096, 14336, "Q4_K"),
    ("down", 4096, 14336, "Q6_K"),
    ("lm_head", 128256, 4096, "Q6_K"),
]


def check(torch, gd, kernels, quantize, dequantize, QTensor, types: list[str]) -> list[str]:
    failures = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in types:
        kt = gd.TYPES[name]
        for k in ((4096, 96) if kt.block_size == 32 else (4096, 768)):
            rows = 333
            w = torch.randn(rows, k, device="cuda", generator=g) * 0.05
            w[:, ::41] *= 10
            q = quantize(w, name)
            ref = dequantize(q)
            for dt in ((torch.float32, torch.bfloat16, torch.float16) if k == 4096 else (torch.float32,)):
                got = kernels.dequantize(q, dt)
                want = ref.to(dt)
                ib = {torch.float32: torch.int32}.get(dt, torch.int16)
                if not torch.equal(got.view(ib), want.view(ib)):
                    failures.append(f"{name} k={k} {dt}: {(got != want).sum().item()} differ")
            raw = torch.randint(0, 256, q.data.shape, device="cuda", dtype=torch.uint8, generator=g)
            rq = QTensor(name, q.shape, {"data": raw})
            r_ref, r_got = dequantize(rq), kernels.dequantize(rq, torch.float32)
            same = (r_ref.view(torch.int32) == r_got.view(torch.int32)) | (r_ref.isnan() & r_got.isnan())
            if not same.all():
                failures.append(f"{name} k={k} raw bytes: {(~same).sum().item()} differ")
            x = torch.randn(k, device="cuda", generator=g)
            exact = ref.double() @ x.double()
            for br, split in ((4, 1), (8, 3)):
                y = gd.gemv_rows(name, q.data, k, x, None, br, split)
                rel = ((y.double() - exact).norm() / exact.norm()).item()
                if not rel < 1e-5:
                    failures.append(f"{name} k={k} gemv br={br} split={split}: rel err {rel:.2e}")
        print(f"checked {name}", flush=True)
    return failures


def host_overhead(torch, F, kernels, gd, quantize) -> dict:
    """Host (Python + launch) microseconds per call on a tiny weight, averaged over 2000 calls."""
    import time

    q = quantize(torch.randn(64, 256, device="cuda"), "Q4_K")
    wb = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    kv = gd._table("Q4_K", gd.TYPES["Q4_K"], q.data.device)
    out = torch.empty(64, 256, device="cuda", dtype=torch.bfloat16)
    calls = {
        "F.linear_bf16": lambda: F.linear(x, wb),
        "kernels.dequantize": lambda: kernels.dequantize(q, torch.bfloat16),
        "raw_triton_launch": lambda: gd._dequant_kernel[(4, 1)](q.data, out, kv, 64, 144, 256, CODE=9, TS=144, A=8,
                                                               B=32, BR=16, num_warps=4, enable_fp_fusion=False),
        "kernels.gemv": lambda: kernels.gemv(x, q),
    }
    res = {}
    for name, fn in calls.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2000):
            fn()
        res[name] = (time.perf_counter() - t0) / 2000 * 1e6
        torch.cuda.synchronize()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-types", help="comma list (default: every kernel type)")
    ap.add_argument("--skip-sweep", action="store_true", help="time only the configured GEMV launch shape")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/engine_cuda_kernels.json"))
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from quantbench.engine import kernels
    from quantbench.engine.kernels import ggml_dequant as gd
    from quantbench.quant import QTensor, dequantize, quantize

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
    result: dict = {"device": torch.cuda.get_device_name()}
    if not a.skip_check:
        types = a.check_types.split(",") if a.check_types else sorted(gd.TYPES)
        failures = check(torch, gd, kernels, quantize, dequantize, QTensor, types)
        result["check_failures"] = failures
        print("CHECK", "OK" if not failures else "FAILED", *failures, sep="\n  ")

    def bench(fn) -> float:
        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us

    g = torch.Generator(device="cuda").manual_seed(1)
    decode = []
    for what, rows, k, name in DECODE_SHAPES:
        w = torch.randn(rows, k, device="cuda", generator=g) * 0.02
        q = quantize(w, name)
        wb = w.to(torch.bfloat16)
        del w
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
        kt = gd.TYPES[name]
        ta, tb = gd.tile_shape(kt, k)
        r = {"what": what, "rows": rows, "k": k, "type": name, "packed_MB": q.data.numel() / 1e6,
             "bf16_linear": bench(lambda: F.linear(x, wb)),
             "ref_dequant_linear": bench(lambda: F.linear(x, dequantize(q).to(torch.bfloat16))),
             "triton_dequant": bench(lambda: kernels.dequantize(q, torch.bfloat16)),
             "triton_dequant_linear": bench(lambda: F.linear(x, kernels.dequantize(q, torch.bfloat16))),
             "gemv_default": bench(lambda: kernels.gemv(x, q))}
        sweep = {}
        if not a.skip_sweep:
            cfgs = [(br, split, unroll, 4) for br in (8, 16, 32) for split in (1, 2, 4) for unroll in (1, 2, 4)]
            cfgs += [(32, split, 2, 8) for split in (1, 2, 4)]
            for br, split, unroll, warps in cfgs:
                f = lambda: gd.gemv_rows(name, q.data, k, x.reshape(k), None, br, split, warps, unroll)  # noqa: E731
                sweep[f"br{br}_s{split}_u{unroll}_w{warps}"] = bench(f)
            for br in (8, 16, 32):
                for warps in (4, 8):
                    sweep[f"deq_br{br}_w{warps}"] = bench(
                        lambda: gd.dequantize_rows(name, q.data, k, torch.bfloat16, br, warps))
        r["sweep"] = sweep
        best = min((v, kk) for kk, v in sweep.items() if not kk.startswith("deq")) if sweep else (r["gemv_default"], "default")
        r["gemv_best"], r["gemv_best_cfg"] = best
        if sweep:
            br, split, unroll, warps = (int(v) for v in re.findall(r"\d+", best[1]))
            yb = gd.gemv_rows(name, q.data, k, x.reshape(k), None, br, split, warps, unroll).float()
            yr32 = F.linear(x.float(), dequantize(q)).reshape(-1)
            r["gemv_best_rel_err"] = ((yb - yr32).norm() / yr32.norm()).item()
            r["gemv_best_tuple"] = [br, split, unroll, warps]
        y = kernels.gemv(x, q).float()
        yr = F.linear(x.float(), dequantize(q)).float()
        r["gemv_rel_err_vs_f32"] = ((y - yr).norm() / yr.norm()).item()
        decode.append(r)
        print(f"{what:9s} {name} {rows}x{k}: bf16 {r['bf16_linear']:.1f}us ref {r['ref_dequant_linear']:.1f} "
              f"deq {r['triton_dequant']:.1f} deq+mm {r['triton_dequant_linear']:.1f} gemv {r['gemv_default']:.1f} "
              f"(best {best[0]:.1f} {best[1]}; {r['packed_MB'] / best[0] * 1e3:.0f} GB/s)", flush=True)
        del q, wb
        torch.cuda.empty_cache()
    result["decode_us"] = decode

    prefill = []
    for what, rows, k, name in DECODE_SHAPES[:5]:
        w = torch.randn(rows, k, device="cuda", generator=g) * 0.02
        q = quantize(w, name)
        wb = w.to(torch.bfloat16)
        x = torch.randn(512, k, device="cuda", dtype=torch.bfloat16, generator=g)
        r = {"what": what, "rows": rows, "k": k, "type": name,
             "bf16_linear": bench(lambda: F.linear(x, wb)),
             "ref_dequant_linear": bench(lambda: F.linear(x, dequantize(q).to(torch.bfloat16))),
             "triton_dequant_linear": bench(lambda: F.linear(x, kernels.dequantize(q, torch.bfloat16)))}
        prefill.append(r)
        print(f"prefill512 {what:9s} {name}: bf16 {r['bf16_linear']:.1f}us ref {r['ref_dequant_linear']:.1f} "
              f"triton deq+mm {r['triton_dequant_linear']:.1f}", flush=True)
    result["prefill512_us"] = prefill
    result["host_us_per_call"] = host_overhead(torch, F, kernels, gd, quantize)
    print("host us per call:", result["host_us_per_call"], flush=True)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=2))
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
