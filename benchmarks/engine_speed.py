"""Engine throughput vs llama.cpp in the same run: SmolLM2-135M (F32 and Q4_K_M) on CPU threads.

quantbench: ``quantbench.engine.bench`` (random prompt, greedy decode, KV cache).
llama.cpp: the same build the tests use, through its own Python binding (``tests/oracles/llama_cpp_py.py``),
prefill of the same prompt length in one batch, then one token per ``llama_decode``; f32 KV cache
on both sides. Prints a table and writes JSON (default ``benchmarks/results/engine_speed.json``).

    python benchmarks/engine_speed.py [--threads 2] [--prompt-len 256] [--gen-len 64] [--iterations 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def llama_cpp_bench(path: Path, prompt: list[int], gen_len: int, iterations: int, warmup: int, threads: int) -> dict:
    import numpy as np

    from tests.oracles import llama_cpp_py as o

    o.N_THREADS = threads
    m = o._load(path, vocab_only=False)
    pre, dec = [], []
    for it in range(warmup + iterations):
        ctx = o._Context(m, len(prompt) + gen_len + 8, len(prompt))
        t0 = time.perf_counter()
        logits = ctx.decode(prompt, 0, all_logits=False)
        t1 = time.perf_counter()
        pos = len(prompt)
        for _ in range(gen_len):
            tok = int(np.argmax(logits[-1]))
            logits = ctx.decode([tok], pos, all_logits=False)
            pos += 1
        t2 = time.perf_counter()
        del ctx
        if it >= warmup:
            pre.append(len(prompt) / (t1 - t0))
            dec.append(gen_len / (t2 - t1))
    return {"prefill_tok_s": statistics.fmean(pre), "prefill_std": statistics.pstdev(pre),
            "decode_tok_s": statistics.fmean(dec), "decode_std": statistics.pstdev(dec)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ftypes", default="F32,Q4_K_M")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/engine_speed.json"))
    a = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from quantbench.engine import load_model
    from quantbench.engine.bench import bench
    from quantbench.jobs.quantize_gguf import quantize_gguf
    from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

    torch.set_num_threads(a.threads)
    f32 = make_f32_gguf(smollm2_gguf())
    rows = []
    for ftype in a.ftypes.split(","):
        path = f32
        if ftype != "F32":
            path = f32.with_name(f"smollm2-{ftype}.gguf")
            if not path.exists():
                quantize_gguf(f32, path, ftype)
        lm = load_model(path)
        ours = bench(lm, a.prompt_len, a.gen_len, a.iterations, a.warmup)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, lm.args.vocab_size, (a.prompt_len,), generator=g).tolist()
        ref = llama_cpp_bench(path, prompt, a.gen_len, a.iterations, a.warmup, a.threads)
        rows.append({
            "model": f"SmolLM2-135M {ftype}", "threads": a.threads, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
            "quantbench_prefill_tok_s": ours.prefill_tok_s.mean, "quantbench_decode_tok_s": ours.decode_tok_s.mean,
            "llama_cpp_prefill_tok_s": ref["prefill_tok_s"], "llama_cpp_decode_tok_s": ref["decode_tok_s"],
            "prefill_ratio": ours.prefill_tok_s.mean / ref["prefill_tok_s"],
            "decode_ratio": ours.decode_tok_s.mean / ref["decode_tok_s"],
        })
        del lm
    t = Table(title=f"engine speed, {a.threads} CPU threads (ratio = quantbench / llama.cpp, same run)")
    for c in ("model", "qb prefill t/s", "llama.cpp prefill t/s", "ratio", "qb decode t/s", "llama.cpp decode t/s", "ratio"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in rows:
        t.add_row(r["model"], f"{r['quantbench_prefill_tok_s']:.1f}", f"{r['llama_cpp_prefill_tok_s']:.1f}",
                  f"{r['prefill_ratio']:.2f}×", f"{r['quantbench_decode_tok_s']:.1f}", f"{r['llama_cpp_decode_tok_s']:.1f}",
                  f"{r['decode_ratio']:.2f}×")
    Console().print(t)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
