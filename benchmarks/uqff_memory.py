"""Peak RSS of ``quantize_uqff`` on a random-weight model of Llama-3-8B shape (bf16, ~16 GB).

Why: UQFF quantization must stream — peak memory below 2 GB plus the largest single tensor,
whatever the model size. This writes the checkpoint to disk tensor by tensor (never whole in
memory), quantizes it in a child process, and reports the child's peak RSS (``ru_maxrss`` and
psutil polling) against that bound.

    python benchmarks/uqff_memory.py --work /big/disk/uqff-mem --isq q4k --device auto

Needs ~16 GB for the checkpoint plus ~5 GB for the Q4K output. On CPU, quantbench's Q4K runs at
roughly 0.1-0.5 M weights/s per core, so use ``--device cuda`` (or ``--isq q8_0``) for a run that
finishes in minutes; the memory behaviour is the same code path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantbench.formats.safetensors_dir import Entry, write_model_dir  # noqa: E402

LLAMA3_8B = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def llama_shapes(hidden, inter, layers, heads, kv_heads, vocab) -> dict[str, tuple[int, ...]]:
    hd = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                                          "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def make_model(path: Path, shape: dict) -> tuple[int, int]:
    """Write the bf16 checkpoint (skipped when ``config.json`` is already there); returns
    (total bytes, largest tensor bytes)."""
    shapes = llama_shapes(**shape)
    sizes = [torch.Size(s).numel() * 2 for s in shapes.values()]
    if not (path / "config.json").is_file():
        gen = torch.Generator().manual_seed(0)

        def produce(s):
            return [(torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)]

        entries = [Entry(n, "BF16", s, (lambda s=s: produce(s))) for n, s in shapes.items()]
        write_model_dir(path, entries, max_shard_bytes=5 * 2**30)
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
               "intermediate_size": shape["inter"], "num_hidden_layers": shape["layers"],
               "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
               "vocab_size": shape["vocab"], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(sizes), max(sizes)


# The child reports VmHWM (its own high-water RSS). Not ru_maxrss: Linux carries the parent's
# high-water mark into a child's ru_maxrss across fork/vfork + exec.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[5])
from quantbench.jobs.quantize_uqff import quantize_uqff
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
t = time.perf_counter()
rep = quantize_uqff(sys.argv[1], sys.argv[2], sys.argv[3], device=sys.argv[4])
print(json.dumps({"seconds": time.perf_counter() - t, "vmhwm": hwm(),
                  "shards": rep.outputs[0].shards, "counts": rep.outputs[0].actual_counts}))
"""

GEN = """
import json, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
sys.argv[0] = "gen"
import importlib.util
spec = importlib.util.spec_from_file_location("uqff_memory", sys.argv[4])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
print(json.dumps(mod.make_model(Path(sys.argv[1]), json.loads(sys.argv[2]))))
"""


def measure(src: Path, out: Path, isq: str, device: str) -> dict:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), isq, device, str(ROOT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def poll():
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak = max(peak, p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"quantize_uqff failed ({proc.returncode}):\n{stderr[-4000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["polled_peak_rss"] = peak
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="directory for the checkpoint and the output")
    ap.add_argument("--isq", default="q4k")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layers", type=int, default=LLAMA3_8B["layers"], help="fewer layers for a quick run")
    ap.add_argument("--keep-output", action="store_true")
    a = ap.parse_args()
    shape = dict(LLAMA3_8B, layers=a.layers)
    src = a.work / "llama3-8b-shape-bf16"
    t0 = time.perf_counter()
    # generate in a child so this (measuring) process stays small
    g = subprocess.run([sys.executable, "-c", GEN, str(src), json.dumps(shape), str(ROOT), __file__],
                       capture_output=True, text=True)
    if g.returncode != 0:
        raise SystemExit(f"generating the checkpoint failed:\n{g.stderr[-4000:]}")
    total, largest = json.loads(g.stdout.strip().splitlines()[-1])
    gen_s = time.perf_counter() - t0
    out = a.work / "out" / f"{a.isq}.uqff"
    r = measure(src, out, a.isq, a.device)
    peak = max(r["vmhwm"], r["polled_peak_rss"])
    bound = 2 * 2**30 + largest
    result = {
        "model_bytes": total, "largest_tensor_bytes": largest, "isq": a.isq, "device": a.device,
        "generate_seconds": round(gen_s, 1), "quantize_seconds": round(r["seconds"], 1),
        "peak_rss_bytes": peak, "vmhwm_bytes": r["vmhwm"], "polled_peak_rss_bytes": r["polled_peak_rss"], "bound_bytes": bound, "within_bound": peak < bound,
        "shards": r["shards"], "actual_counts": r["counts"],
    }
    print(json.dumps(result, indent=2))
    if not a.keep_output:
        for f in out.parent.iterdir():
            f.unlink()
    sys.exit(0 if result["within_bound"] else 1)


if __name__ == "__main__":
    main()
