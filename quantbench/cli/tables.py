"""Rich tables for what the commands made and what files hold."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantbench.formats.gguf import GGUFFile


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _short(v) -> str:
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:3])
        return f"[{head}{', ...' if len(v) > 3 else ''}] ({len(v)} items)"
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def print_gguf(g: GGUFFile, console: Console | None = None) -> None:
    console = console or Console()
    meta = Table(title=f"{g.path.name}: GGUF v{g.version}, {len(g.metadata)} keys, alignment {g.alignment}")
    meta.add_column("key")
    meta.add_column("type")
    meta.add_column("value", overflow="fold")
    for k, kv in g.metadata.items():
        vt = kv.vtype.name + (f"[{kv.sub_type.name}]" if kv.sub_type is not None else "")
        meta.add_row(k, vt, _short(kv.value))
    console.print(meta)
    tt = Table(title=f"{len(g.tensors)} tensors")
    for c in ("name", "shape", "type", "bits/weight", "bytes"):
        tt.add_column(c, justify="right" if c in ("bits/weight", "bytes") else "left")
    total_bytes = total_el = 0
    for t in g.tensors:
        n = 1
        for s in t.shape:
            n *= s
        total_bytes += t.nbytes
        total_el += n
        tt.add_row(t.name, "x".join(map(str, t.shape)), t.ggml_type, f"{8 * t.nbytes / n:.3f}", f"{t.nbytes:,}")
    console.print(tt)
    console.print(
        f"total: {total_el:,} weights, {_fmt_bytes(total_bytes)} of tensor data, "
        f"{8 * total_bytes / max(total_el, 1):.3f} bits/weight"
    )


def print_quantize_report(src: Path, report, console: Console | None = None) -> None:
    console = console or Console()
    counts = Counter(t.dst_type for t in report.tensors)
    t = Table(title=f"{src.name} -> {report.output} ({report.ftype})")
    for c in ("type", "tensors", "bytes"):
        t.add_column(c, justify="right" if c != "type" else "left")
    for ty, n in counts.most_common():
        t.add_row(ty, str(n), _fmt_bytes(sum(x.dst_bytes for x in report.tensors if x.dst_type == ty)))
    console.print(t)
    src_bytes = sum(x.src_bytes for x in report.tensors)
    im = sum(x.used_imatrix for x in report.tensors)
    console.print(
        f"wrote {report.output}: {_fmt_bytes(report.total_bytes)} of tensors "
        f"({report.bits_per_weight:.3f} bits/weight; source {_fmt_bytes(src_bytes)}), "
        f"{len(report.tensors)} tensors, {im} quantized with an imatrix, in {report.seconds:.1f} s"
    )
    requant = Counter(x.src_type for x in report.tensors
                      if x.src_type != x.dst_type and x.src_type not in ("F32", "F16", "BF16"))
    if requant:
        src = ", ".join(f"{n} from {ty}" for ty, n in requant.most_common())
        console.print(f"note: requantized {src}: the source was already quantized, so its rounding error is kept")


def print_eval(res, label: str, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"eval: {label}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("chunks × ctx", f"{res.n_chunks} × {res.ctx} ({res.n_scored} scored tokens)")
    t.add_row("PPL", f"{res.ppl:.4f} ± {res.ppl_err:.4f}")
    if res.kld_mean is not None:
        t.add_row("mean KLD", f"{res.kld_mean:.6f} ± {res.kld_err:.6f}")
        t.add_row("median KLD", f"{res.kld_median:.6f}")
        t.add_row("99th pct KLD", f"{res.kld_p99:.6f}")
        t.add_row("same top token", f"{100 * res.same_top:.2f} ± {100 * res.same_top_err:.2f} %")
    t.add_row("time", f"{res.seconds:.1f} s")
    console.print(t)


def print_bench(res, label: str, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"bench: {label} ({res.iterations} iterations)")
    for c in ("test", "tokens/s", "ms/token", "TTFT ms"):
        t.add_column(c, justify="right" if c != "test" else "left")
    t.add_row(f"prompt {res.prompt_len}", f"{res.prefill_tok_s.mean:.2f} ± {res.prefill_tok_s.std:.2f}",
              f"{1e3 / res.prefill_tok_s.mean:.2f}", f"{res.ttft_ms.mean:.1f} ± {res.ttft_ms.std:.1f}")
    t.add_row(f"decode {res.gen_len}", f"{res.decode_tok_s.mean:.2f} ± {res.decode_tok_s.std:.2f}",
              f"{res.tpot_ms.mean:.2f} ± {res.tpot_ms.std:.2f}", "")
    console.print(t)


def print_uqff_report(report, console: Console | None = None) -> None:
    """One table per UQFF output: stored types and fallbacks, with the files written."""
    console = console or Console()
    for out in report.outputs:
        t = Table(title=f"UQFF {out.quant}: {out.path}")
        t.add_column("stored as")
        t.add_column("layers", justify="right")
        for k, v in out.actual_counts.items():
            t.add_row(k, str(v))
        console.print(t)
        if out.fallbacks:
            console.print(f"{len(out.fallbacks)} layers kept in float (shape does not fit {out.quant}; see uqff_report.json)")
        console.print("shards: " + ", ".join(out.shards))
    console.print(f"done in {report.seconds:.1f} s; beside the shards: " + ", ".join(report.files))


def print_convert_report(report, console: Console | None = None) -> None:
    """What ``quantbench convert`` wrote (a ``quantbench.jobs.convert.ConvertReport``)."""
    console = console or Console()
    t = Table(title=f"convert {report.src_kind} → {report.dst_kind}: {report.dst}")
    t.add_column("file")
    t.add_column("size", justify="right")
    root = Path(report.dst)
    base = root if root.is_dir() else root.parent
    for name in report.files:
        f = base / name
        t.add_row(name, _fmt_bytes(f.stat().st_size) if f.is_file() else "-")
    console.print(t)
    console.print(f"{report.tensors} tensors" + (f", dtype {report.dtype}" if report.dtype else ""))


def print_uqff(u, console: Console | None = None) -> None:
    """UQFF layers: stored type, shape, bytes and bits/weight per layer, then totals by type."""
    console = console or Console()
    console.print(f"UQFF {'.'.join(map(str, u.version))}: {len(u.shards)} shard(s), {len(u.layers)} quantized layers")
    t = Table(title=str(u.shards[0]))
    for c in ("layer", "stored", "format", "shape", "bytes", "bits/weight"):
        t.add_column(c, justify="right" if c in ("bytes", "bits/weight") else "left")
    totals: Counter = Counter()
    for key, layer in u.layers.items():
        nbytes = sum(i.nbytes for i in layer.tensors.values())
        numel = 1
        for d in layer.shape:
            numel *= d
        totals[layer.label] += 1
        t.add_row(key, layer.label, layer.family, "×".join(map(str, layer.shape)), _fmt_bytes(nbytes),
                  f"{8 * nbytes / max(numel, 1):.3f}")
    console.print(t)
    console.print("by type: " + ", ".join(f"{k} ×{v}" for k, v in sorted(totals.items())))


def print_hf_dir(m, console: Console | None = None) -> None:
    """A HF model dir: architecture, quantization config and every tensor (name, dtype, shape, bytes)."""
    console = console or Console()
    cfg = getattr(m, "config", None) or {}
    console.print(f"{m.root}: model_type={cfg.get('model_type', '?')}, "
                  f"quantization={cfg.get('quantization_config', cfg.get('quantization', 'none'))}")
    t = Table(title=f"{len(m.tensors)} tensors in {len(m.files)} file(s)")
    for c in ("tensor", "dtype", "shape", "bytes"):
        t.add_column(c, justify="right" if c == "bytes" else "left")
    total = 0
    for name, info in sorted(m.tensors.items()):
        total += info.nbytes
        t.add_row(name, info.dtype, "×".join(map(str, info.shape)), _fmt_bytes(info.nbytes))
    console.print(t)
    console.print(f"total {_fmt_bytes(total)}")
