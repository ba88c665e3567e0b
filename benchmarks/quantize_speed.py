"""quantbench vs llama.cpp quantization speed and memory, same machine, same run, same input.

1. Whole files: F32 GGUF -> Q4_K_M / Q6_K / IQ4_XS with ``llama-quantize`` and ``quantbench quantize``
   (each in its own process under ``/usr/bin/time -v``: wall time and peak RSS), on SmolLM2-135M
   and on a random-weight model of Llama-3.2-1B shape.
2. One 4096x4096 tensor per GGML type: quantbench (torch, this process) vs ``ggml_quantize_chunk``
   single-threaded through ctypes; on CUDA also whether the GPU bytes equal the CPU bytes.

Prints a table and writes JSON (``--out``). Usage:
    python benchmarks/quantize_speed.py [--models smollm2,llama1b] [--ftypes Q4_K_M,Q6_K,IQ4_XS]
        [--threads 2] [--tensor-types all|Q4_K,...] [--device cpu|cuda] [--skip-files] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = Path.home() / ".cache" / "quantbench" / "bench"


def llama1b_shaped_gguf() -> Path:
    """Random-weight F32 GGUF with Llama-3.2-1B's shapes (tied embeddings, GQA 32/8)."""
    from tests.gguf_models import tiny_llama_gguf

    path = CACHE / "llama-3.2-1b-shape-random-f32.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tiny_llama_gguf(tmp, hidden=2048, ffn=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True)
        tmp.rename(path)
    return path


def smollm2_f32() -> Path:
    from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

    return make_f32_gguf(smollm2_gguf())


def timed(cmd: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{res.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return {"wall_s": wall, "peak_rss_mib": rss_kb / 1024}


def bench_files(models: list[str], ftypes: list[str], threads: int, device: str) -> list[dict]:
    from tests.oracles.ggml_lib import tool
    from quantbench.formats.gguf import read_gguf

    rows = []
    CACHE.mkdir(parents=True, exist_ok=True)
    srcs = {"smollm2": smollm2_f32, "llama1b": llama1b_shaped_gguf}
    for m in models:
        src = srcs[m]()
        largest = max(t.nbytes for t in read_gguf(src).tensors)
        for ft in ftypes:
            out_ref = CACHE / f"{m}-{ft}-llama.gguf"
            out_ours = CACHE / f"{m}-{ft}-quantbench.gguf"
            ref = timed([str(tool("llama-quantize")), str(src), str(out_ref), ft, str(threads)], threads)
            ours = timed([sys.executable, "-m", "quantbench.cli.main", "quantize", "-m", str(src), "--isq", ft,
                          "-o", str(out_ours), "--threads", str(threads), "--device", device, "--no-progress"], threads)
            same = out_ref.read_bytes() == out_ours.read_bytes() if out_ref.stat().st_size < 2**31 else None
            rows.append({
                "model": m, "ftype": ft, "threads": threads, "device": device,
                "llama_quantize": ref, "quantbench": ours,
                "wall_ratio": ours["wall_s"] / ref["wall_s"],
                "rss_over_llama_mib": ours["peak_rss_mib"] - ref["peak_rss_mib"],
                "largest_tensor_mib": largest / 2**20,
                "identical_file": same,
            })
            out_ref.unlink(missing_ok=True)
            out_ours.unlink(missing_ok=True)
    return rows


def bench_tensors(types: list[str], device: str, reps: int) -> list[dict]:
    import torch

    from quantbench.quant import get_type
    from quantbench.quant.registry import quantize_rows
    from tests.oracles import ggml_lib

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 4096)).astype(np.float32)
    im = (rng.standard_normal(4096) ** 2).astype(np.float32)
    xt = torch.from_numpy(x)
    rows = []
    for name in types:
        t = get_type(name)
        for use_im in (False, True):
            if use_im and not t.uses_imatrix:
                continue
            qw = torch.from_numpy(im) if use_im else None
            t0 = time.perf_counter()
            ref = ggml_lib.quantize(t.ggml_id, x, im if use_im else None)
            c_s = time.perf_counter() - t0
            xd, qwd = xt.to(device), (qw.to(device) if qw is not None else None)
            out = quantize_rows(t, xd, qwd)  # warm-up (CUDA context, caches)
            if device == "cuda":
                torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                out = quantize_rows(t, xd, qwd)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ours = out.cpu().numpy()
            blocks_ref = ref.reshape(-1, t.type_size)
            blocks_ours = ours.reshape(-1, t.type_size)
            diff_blocks = int((blocks_ref != blocks_ours).any(axis=1).sum())
            rows.append({
                "type": name, "imatrix": use_im, "device": device,
                "ggml_1thread_s": c_s, "quantbench_s": min(times),
                "speedup_vs_ggml": c_s / min(times),
                "mweights_per_s": x.size / min(times) / 1e6,
                "blocks_differing_from_ggml": diff_blocks, "blocks": len(blocks_ref),
            })
            print(f"  {name:7s} imatrix={use_im!s:5s} ggml {c_s:7.3f}s  quantbench[{device}] {min(times):7.3f}s "
                  f"x{c_s / min(times):7.2f}  diff blocks {diff_blocks}/{len(blocks_ref)}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--ftypes", default="Q4_K_M,Q6_K,IQ4_XS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tensor-types", default="all")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--skip-files", action="store_true")
    ap.add_argument("--skip-tensors", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"quantize_speed-{platform.node()}.json")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from quantbench.quant import all_types

    types = [t.name for t in all_types() if t.block_size > 1] if a.tensor_types == "all" else a.tensor_types.split(",")
    result: dict = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "threads": a.threads,
                    "torch": torch.__version__, "device": a.device}
    if a.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if not a.skip_tensors:
        print(f"== one 4096x4096 tensor per type (ggml_quantize_chunk single thread vs quantbench on {a.device})")
        result["tensors"] = bench_tensors(types, a.device, a.reps)
        a.out.write_text(json.dumps(result, indent=2))
    if not a.skip_files:
        print("== whole files: F32 GGUF -> ftype, wall time and peak RSS")
        result["files"] = bench_files(a.models.split(","), a.ftypes.split(","), a.threads, a.device)
        print(f"{'model':8s} {'ftype':7s} {'llama s':>8s} {'ours s':>8s} {'ratio':>6s} {'llama MiB':>9s} {'ours MiB':>9s} "
              f"{'largest':>8s} same")
        for r in result["files"]:
            print(f"{r['model']:8s} {r['ftype']:7s} {r['llama_quantize']['wall_s']:8.2f} {r['quantbench']['wall_s']:8.2f} "
                  f"{r['wall_ratio']:6.2f} {r['llama_quantize']['peak_rss_mib']:9.0f} {r['quantbench']['peak_rss_mib']:9.0f} "
                  f"{r['largest_tensor_mib']:8.0f} {r['identical_file']}")
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
