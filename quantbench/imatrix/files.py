"""Importance-matrix files: llama.cpp's GGUF imatrix and its legacy ``.dat``.

An entry holds, per tensor (GGUF name, e.g. ``blk.0.attn_q.weight``), the running sum of squared
input activations per column (``sums``, ``n_mat * ne0`` values, one slice per expert) and the
number of rows that contributed (``counts``, one per expert). ``quant_weights`` turns an entry
into what llama-quantize hands the quantizers.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantbench.errors import ImatrixError
from quantbench.formats.atomic import atomic_output


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 [n_mat * ne0]
    counts: np.ndarray  # int64 [n_mat]


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    path: Path | None = None

    def quant_weights(self, name: str) -> np.ndarray | None:
        """Per-column weights as llama-quantize computes them: sums/count per expert.

        GGUF files divide by each expert's count (an expert never seen gets all ones); legacy
        files store already-averaged sums times ``ncall``, so they are divided by ``ncall``.
        """
        e = self.entries.get(name)
        if e is None:
            return None
        sums = e.sums.astype(np.float32)
        if self.is_legacy:
            ncall = int(e.counts[0]) if len(e.counts) else 0
            return sums / np.float32(ncall) if ncall > 0 else sums.copy()
        n = len(e.counts)
        ne0 = sums.size // n
        out = np.empty_like(sums)
        for j in range(n):
            c = np.float32(e.counts[j])
            seg = slice(j * ne0, (j + 1) * ne0)
            out[seg] = sums[seg] / c if c > 0 else np.float32(1.0)
        return out


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF imatrix, or a legacy ``.dat`` when the file is not GGUF (as llama.cpp does)."""
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{p}: no such imatrix file")
    with open(p, "rb") as f:
        magic = f.read(4)
    im = _read_gguf(p) if magic == b"GGUF" else _read_legacy(p)
    for name, e in im.entries.items():
        if not np.isfinite(e.sums).all():
            raise ImatrixError(f"{p}: entry {name} contains non-finite values")
    im.path = p
    return im


def _read_gguf(p: Path) -> Imatrix:
    from quantbench.formats.gguf import read_gguf
    from quantbench.errors import FormatError

    try:
        g = read_gguf(p)
    except FormatError as e:
        raise ImatrixError(f"imatrix {e}") from e
    meta = g.values()
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in g.tensors:
        for suffix, part in ((".in_sum2", "sums"), (".counts", "counts")):
            if t.name.endswith(suffix):
                if t.ggml_type != "F32":
                    raise ImatrixError(f"{p}: {t.name} must be F32, is {t.ggml_type}")
                pairs.setdefault(t.name[: -len(suffix)], {})[part] = np.asarray(t._raw, dtype=np.float32).reshape(-1)
    if not pairs:
        raise ImatrixError(f"{p}: GGUF file holds no imatrix tensors (*.in_sum2 / *.counts)")
    has_meta = all(k in meta for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"))
    if not has_meta:
        raise ImatrixError(f"{p}: missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)")
    entries = {}
    for name, d in sorted(pairs.items()):
        if "sums" not in d or "counts" not in d:
            raise ImatrixError(f"{p}: mismatched sums and counts for {name}")
        counts = np.array([int(round(float(c))) for c in d["counts"]], dtype=np.int64)  # std::lround
        if len(counts) == 0 or d["sums"].size % len(counts):
            raise ImatrixError(f"{p}: {name}: {d['sums'].size} sums do not split into {len(counts)} experts")
        entries[name] = ImatrixEntry(d["sums"].copy(), counts)
    ds = meta.get("imatrix.datasets", [])
    return Imatrix(
        entries,
        list(ds) if isinstance(ds, list) else [str(ds)],
        int(meta.get("imatrix.chunk_count", 0)),
        int(meta.get("imatrix.chunk_size", 0)),
        is_legacy=False,
    )


def _read_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    off = 0

    def take(fmt: str) -> tuple:
        nonlocal off
        size = struct.calcsize(fmt)
        if off + size > len(data):
            raise ImatrixError(f"{p}: truncated legacy imatrix at byte {off}")
        vals = struct.unpack_from(fmt, data, off)
        off += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise ImatrixError(f"{p}: not an imatrix file (neither GGUF nor a legacy .dat with a sane entry count)")
    entries = {}
    for i in range(n_entries):
        (length,) = take("<i")
        if length < 0 or length > 4096:
            raise ImatrixError(f"{p}: entry {i}: bad name length {length}")
        name = data[off : off + length].decode("utf-8", errors="replace")
        off += length
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{p}: entry {name}: no values")
        if off + 4 * nval > len(data):
            raise ImatrixError(f"{p}: truncated legacy imatrix in entry {name}")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
        off += 4 * nval
        entries[name] = ImatrixEntry(sums, np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if off + 4 <= len(data):
        (chunk_count,) = take("<i")
        if off + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets.append(data[off : off + length].decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets, chunk_count, 0, is_legacy=True)


def write_imatrix_gguf(im: Imatrix, path: str | os.PathLike[str]) -> None:
    """llama.cpp's GGUF imatrix: ``<name>.in_sum2`` [n_mat, ne0] and ``<name>.counts`` [n_mat, 1]."""
    import gguf

    from quantbench.formats.gguf import KV, GGUFStreamWriter

    VT = gguf.GGUFValueType
    with GGUFStreamWriter(path, "imatrix") as w:
        w.add_kv("general.type", KV("imatrix", VT.STRING))
        w.add_kv("imatrix.datasets", KV(list(im.datasets), VT.ARRAY, VT.STRING))
        w.add_kv("imatrix.chunk_count", KV(int(im.chunk_count), VT.UINT32))
        w.add_kv("imatrix.chunk_size", KV(int(im.chunk_size), VT.UINT32))
        order = sorted(im.entries)
        for name in order:
            e = im.entries[name]
            n = len(e.counts)
            w.add_tensor(f"{name}.in_sum2", (n, e.sums.size // n), "F32")
            w.add_tensor(f"{name}.counts", (n, 1), "F32")
        for name in order:
            e = im.entries[name]
            w.write_tensor(f"{name}.in_sum2", e.sums.astype(np.float32))
            w.write_tensor(f"{name}.counts", e.counts.astype(np.float32))


def write_imatrix_dat(im: Imatrix, path: str | os.PathLike[str]) -> None:
    """Legacy ``.dat``: per entry the per-call mean times ncall, then chunk count and dataset."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(im.entries)))
        for name in sorted(im.entries):
            e = im.entries[name]
            raw = name.encode()
            if im.is_legacy:
                ncall, vals = int(e.counts[0]), e.sums.astype(np.float32)
            else:
                ncall = int(im.chunk_count)
                w = im.quant_weights(name)
                vals = (w * np.float32(ncall)).astype(np.float32)
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size))
            f.write(vals.astype("<f4").tobytes())
        f.write(struct.pack("<i", int(im.chunk_count)))
        ds = (im.datasets[0] if im.datasets else "").encode()
        f.write(struct.pack("<i", len(ds)) + ds)
