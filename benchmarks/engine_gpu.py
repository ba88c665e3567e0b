"""Engine decode/prefill speed on CUDA with a random-weight model of Llama-3-8B shape (bf16 and Q4_K_M).

Weights are generated on the GPU (nothing is downloaded); Q4_K_M takes llama-quantize's per-tensor
types from :mod:`quantbench.plan.llama_mixture` and packs each tensor with quantbench's quantizers
on the GPU, one tensor at a time. Prints a table and writes JSON.

    python benchmarks/engine_gpu.py [--variants bf16,Q4_K_M] [--layers 32] [--prompt-len 512] [--gen-len 128]
        [--modes triton,gemv] [--graph-steps 50]

``--modes`` runs each packed variant once per way of executing its weights: ``reference`` (torch
dequantizer per call), ``triton`` (Triton dequantizer per call, the engine's default on CUDA),
``gemv`` (Triton dequantizer for prefill, fused dequant+GEMV kernel for one-token decode: a trial
of a change to ``QLinear.forward``, installed here per layer). ``--graph-steps`` also captures one
decode step in a CUDA graph and times its replays: the per-token time without Python/launch cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def llama3_8b_args(layers: int):
    from quantbench.engine.models.base import ModelArgs

    return ModelArgs(arch="llama", hidden_size=4096, intermediate_size=14336, num_layers=layers, num_heads=32,
                     num_kv_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     max_position_embeddings=8192)


def build(variant: str, layers: int, dtype, device: str):
    import torch

    from quantbench.engine import gguf_names
    from quantbench.engine.loader import LoadedModel, _build
    from quantbench.engine.weights import expected_names, _assign
    from quantbench.plan.llama_mixture import TensorSpec, plan_tensors
    from quantbench.quant import quantize

    args = llama3_8b_args(layers)
    model = _build(args, dtype, device)
    want = expected_names(model)
    table = gguf_names.block_table(False, False, "mlp")
    types: dict[str, str] = {}
    if variant != "bf16":
        specs = [TensorSpec(gguf_names.hf_to_gguf(n, table), tuple(reversed(s)), "F32" if len(s) == 1 else "BF16")
                 for n, (_, _, s) in want.items()]
        meta = {"llama.block_count": layers, "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8}
        plans = plan_tensors(specs, "llama", meta, variant)
        by_gguf = {p.name: p.target_type for p in plans}
        types = {n: by_gguf[gguf_names.hf_to_gguf(n, table)] for n in want}
    g = torch.Generator(device=device).manual_seed(0)
    packed_bytes = 0
    for name, (mod, attr, shape) in want.items():
        if len(shape) == 1:
            w = torch.ones(shape, dtype=dtype, device=device)
        else:
            w = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02)
            t = types.get(name, "BF16")
            if t not in ("BF16", "F32", "F16"):
                w = quantize(w, t, name=name)
                packed_bytes += w.nbytes
            else:
                w = w.to(dtype)
                packed_bytes += w.numel() * w.element_size()
        _assign(model, mod, attr, w)
    torch.cuda.synchronize()
    return LoadedModel(model.eval(), None, args, Path(f"random-llama3-8b-{variant}"), "random"), packed_bytes


def set_mode(model, mode: str) -> None:
    """Route packed weights through ``mode`` (see the module docstring)."""
    from quantbench.engine import kernels
    from quantbench.quant import QTensor

    kernels.set_enabled(mode != "reference")
    for layer in model.linear_layers():
        layer.__dict__.pop("forward", None)
        if mode == "gemv":
            def forward(x, layer=layer, dense=type(layer).forward):
                w = layer.weight
                if isinstance(w, QTensor) and layer.act_quant == "none" and kernels.can_gemv(x, w):
                    return kernels.gemv(x, w, layer.bias)
                return dense(layer, x)
            layer.forward = forward


def graph_step_ms(lm, prompt_len: int, steps: int) -> float:
    """One decode step at position ``prompt_len`` captured in a CUDA graph: median replay time."""
    import torch

    model = lm.model
    with torch.inference_mode():
        cache = model.make_cache(prompt_len + 1)
        tok = torch.zeros((1, 1), dtype=torch.long, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(tok, cache=cache, start=prompt_len)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(tok, cache=cache, start=prompt_len)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        del graph
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="bf16,Q4_K_M")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--cache-dequantized", action="store_true", help="keep a bf16 copy of packed weights (memory of bf16)")
    ap.add_argument("--modes", default="triton", help="reference,triton,gemv: how packed weights run (docstring)")
    ap.add_argument("--gemv-configs", help="engine_cuda_kernels.py JSON: pin each measured shape's best GEMV launch")
    ap.add_argument("--graph-steps", type=int, default=0, help="also time N replays of a CUDA-graph decode step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/engine_gpu.json"))
    a = ap.parse_args()

    import torch

    from quantbench.engine.bench import bench

    if a.gemv_configs:
        from quantbench.engine import kernels

        for r in json.loads(Path(a.gemv_configs).read_text())["decode_us"]:
            if "gemv_best_tuple" in r:
                kernels.set_gemv_config(r["type"], r["rows"], r["k"], tuple(r["gemv_best_tuple"]))

    rows = []
    for variant in a.variants.split(","):
        t0 = time.perf_counter()
        lm, nbytes = build(variant, a.layers, torch.bfloat16, "cuda")
        build_s = time.perf_counter() - t0
        if a.cache_dequantized:
            for layer in lm.model.linear_layers():
                layer.cache_dequantized = True
        for mode in (["-"] if variant == "bf16" else a.modes.split(",")):
            if mode != "-":
                set_mode(lm.model, mode)
            torch.cuda.reset_peak_memory_stats()
            r = bench(lm, a.prompt_len, a.gen_len, a.iterations, warmup=1)
            graph_ms = None
            if a.graph_steps and mode != "reference":
                try:
                    graph_ms = graph_step_ms(lm, a.prompt_len, a.graph_steps)
                except Exception as e:  # report and go on: capture is a measurement, not the engine
                    print(f"graph capture failed for {variant}/{mode}: {type(e).__name__}: {e}", flush=True)
            rows.append({"variant": variant, "mode": mode, "layers": a.layers, "weights_GiB": nbytes / 2**30,
                         "build_s": build_s,
                         "prefill_tok_s": r.prefill_tok_s.mean, "prefill_std": r.prefill_tok_s.std,
                         "decode_tok_s": r.decode_tok_s.mean, "decode_std": r.decode_tok_s.std,
                         "graph_step_ms": graph_ms, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
                         "device": torch.cuda.get_device_name(), "cache_dequantized": a.cache_dequantized})
            print(rows[-1], flush=True)
        del lm
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".tmp").replace(out)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the per-row lines above already hold every number
        return
    t = Table(title=f"engine on CUDA, random Llama-3-8B shape ({a.layers} layers), prompt {a.prompt_len}, gen {a.gen_len}")
    for c in ("variant", "mode", "weights GiB", "prefill tok/s", "decode tok/s", "graph step ms", "peak GiB"):
        t.add_column(c, justify="left" if c in ("variant", "mode") else "right")
    for r in rows:
        g = "" if r["graph_step_ms"] is None else f"{r['graph_step_ms']:.2f}"
        t.add_row(r["variant"], r["mode"], f"{r['weights_GiB']:.2f}", f"{r['prefill_tok_s']:.0f} ± {r['prefill_std']:.0f}",
                  f"{r['decode_tok_s']:.1f} ± {r['decode_std']:.1f}", g, f"{r['peak_GiB']:.1f}")
    Console().print(t)


if __name__ == "__main__":
    main()
