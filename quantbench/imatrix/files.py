"""Importance-matrix files: llama.cpp's GGUF imatrix, its legacy ``.dat``, and mistral.rs's ``.cimatrix``.

An entry holds, per tensor (GGUF name, e.g. ``blk.0.attn_q.weight``), ``sums`` (``n_mat * ne0``
float32 values, one slice per expert) and ``counts`` (one per expert, or one for all). What a
quantizer consumes is ``quant_weights``: ``sums / count`` per slice, all ones for a slice whose
count is 0. The three formats store different things; this is what each holds and how we convert:

* **GGUF** (``general.type=imatrix``): raw ``Σx²`` per column and the number of rows (tokens) that
  contributed, plus ``imatrix.datasets`` / ``chunk_count`` / ``chunk_size``. Carries everything.
* **legacy .dat**: per entry ``(Σx²/count)·ncall`` and one ``ncall`` (llama-imatrix writes
  ``ceil(max count / chunk_size)``), then the chunk count and one dataset name. No per-expert counts,
  no chunk size. Read: ``sums`` = the stored values, ``counts=[ncall]`` (so ``quant_weights`` divides
  by ``ncall``, exactly as llama-quantize does). Written from another format: ``ncall`` is llama's
  value rounded *down to a power of two*, so ``weights·ncall/ncall`` is exact in float32 and the
  round trip reproduces the quantizer's weights bit for bit.
* **.cimatrix** (mistral.rs, verified against ``mistralrs-quant/src/imatrix.rs`` and files written
  by mistralrs 0.9.5): ``u64`` entry count; per entry ``u64`` key length, UTF-8 key (the HF module
  name), ``u64`` value count, ``f32`` values. mistral.rs stores ``mean(x²)·ncalls`` per column
  (MoE: ``[E, in]`` expert-major, an expert that saw no token all zeros). No counts, no metadata.
  We write exactly ``quant_weights`` (the per-column mean; ones for an expert with no tokens), and
  read values back as weights (``counts`` of 1, or 0 for an all-zero expert slice). mistral.rs uses
  the values only as relative weights, so the missing ``ncalls`` scale does not change what it does.

Round trips keep ``quant_weights`` bit-exact (GGUF→cimatrix→GGUF, GGUF→dat→GGUF, all pairs).
What is lost: through ``.cimatrix`` the absolute counts (token totals), chunk count/size and
dataset names; through ``.dat`` per-expert counts, chunk size and all but the first dataset.
The counts only matter when merging imatrix files (llama-imatrix ``--in-file``).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from quantbench.errors import FormatError, ImatrixError
from quantbench.formats.atomic import atomic_output
from quantbench.imatrix.names import GGUFKey, gguf_to_hf, hf_to_gguf

FORMATS = ("gguf", "dat", "cimatrix")
_SUFFIX = {".gguf": "gguf", ".imatrix": "dat", ".dat": "dat", ".cimatrix": "cimatrix"}


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 [n_mat * ne0]
    counts: np.ndarray  # int64 [n_mat] (or [1] for all experts)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    path: Path | None = None
    fmt: str = ""  # "gguf", "dat" or "cimatrix": what ``sums``/``counts`` mean (see module doc)

    def __post_init__(self) -> None:
        if not self.fmt:
            self.fmt = "dat" if self.is_legacy else "gguf"
        self.is_legacy = self.fmt == "dat"

    def quant_weights(self, name: str, n_mat: int | None = None) -> np.ndarray | None:
        """Per-column weights as llama-quantize computes them: sums/count per expert.

        GGUF files divide by each expert's count (an expert never seen gets all ones); legacy
        files store already-averaged sums times ``ncall``, so they are divided by ``ncall``.
        ``n_mat`` (experts in the model tensor) lets a ``.cimatrix`` stack read without the model
        turn mistral.rs's all-zero "no traffic" experts into ones instead of zero weights.
        """
        e = self.entries.get(name)
        if e is None:
            return None
        sums = e.sums.astype(np.float32)
        counts = e.counts
        if self.fmt == "cimatrix" and n_mat and n_mat > 1 and len(counts) == 1 and sums.size % n_mat == 0:
            counts = _live_rows(sums, n_mat)
        if self.fmt == "dat":
            ncall = int(counts[0]) if len(counts) else 0
            return sums / np.float32(ncall) if ncall > 0 else sums.copy()
        n = len(counts)
        ne0 = sums.size // n
        out = np.empty_like(sums)
        for j in range(n):
            c = np.float32(counts[j])
            seg = slice(j * ne0, (j + 1) * ne0)
            out[seg] = sums[seg] / c if c > 0 else np.float32(1.0)
        return out


def _live_rows(values: np.ndarray, n_mat: int) -> np.ndarray:
    """Counts for a cimatrix expert stack: 1 where the expert saw tokens, 0 for an all-zero row."""
    rows = values.reshape(n_mat, -1)
    return (rows != 0).any(axis=1).astype(np.int64)


# ---------------------------------------------------------------- format choice


def format_for_path(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format to write ``path`` in: ``fmt`` if given, else from the suffix."""
    if fmt:
        if fmt not in FORMATS:
            raise ImatrixError(f"unknown imatrix format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX:
        raise ImatrixError(
            f"{path}: cannot tell the imatrix format from suffix {suffix or '(none)'!r}; "
            f"use .gguf, .imatrix/.dat or .cimatrix, or pass --format"
        )
    return _SUFFIX[suffix]


# ---------------------------------------------------------------- reading


def read_imatrix(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    n_mats: Mapping[str, int] | None = None,
) -> Imatrix:
    """Read any of the three formats.

    Without ``fmt``: GGUF magic means GGUF (whatever the suffix, as llama.cpp does); otherwise a
    ``.cimatrix`` suffix means cimatrix and anything else is tried as legacy ``.dat`` first.
    ``n_mats`` (GGUF tensor name -> expert count) splits ``.cimatrix`` expert stacks per expert.
    """
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{p}: no such imatrix file")
    if fmt is not None and fmt not in FORMATS:
        raise ImatrixError(f"unknown imatrix format {fmt!r}: use one of {', '.join(FORMATS)}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if fmt is None:
        if magic == b"GGUF":
            fmt = "gguf"
        elif p.suffix.lower() == ".cimatrix":
            fmt = "cimatrix"
    if fmt == "gguf":
        if magic != b"GGUF":
            raise ImatrixError(f"{p}: not a GGUF imatrix (magic {magic!r})")
        im = _read_gguf(p)
    elif fmt == "cimatrix":
        im = _read_cimatrix(p, n_mats)
    elif fmt == "dat":
        im = _read_legacy(p)
    else:
        try:
            im = _read_legacy(p)
        except ImatrixError as legacy_error:
            try:
                im = _read_cimatrix(p, n_mats)
            except ImatrixError:
                raise legacy_error from None
    for name, e in im.entries.items():
        if not np.isfinite(e.sums).all():
            raise ImatrixError(f"{p}: entry {name} contains non-finite values")
        if (e.counts < 0).any():
            raise ImatrixError(f"{p}: entry {name} has a negative count")
    im.path = p
    return im


def _read_gguf(p: Path) -> Imatrix:
    from quantbench.formats.gguf import read_gguf

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
        fmt="gguf",
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
    return Imatrix(entries, datasets, chunk_count, 0, fmt="dat")


def _read_cimatrix(p: Path, n_mats: Mapping[str, int] | None) -> Imatrix:
    raw = _parse_cimatrix(p)
    stacked: dict[str, np.ndarray] = {}
    per_expert: dict[str, dict[int, np.ndarray]] = {}
    origin: dict[tuple[str, int | None], str] = {}
    for key, values in raw.items():
        try:
            gk: GGUFKey = hf_to_gguf(key)
        except ImatrixError as e:
            raise ImatrixError(f"{p}: {e}") from None
        if (gk.name, gk.expert) in origin or (gk.expert is None and gk.name in per_expert) or (
            gk.expert is not None and gk.name in stacked
        ):
            raise ImatrixError(f"{p}: keys {origin.get((gk.name, gk.expert), '?')!r} and {key!r} both map to {gk.name}")
        origin[(gk.name, gk.expert)] = key
        if gk.expert is None:
            stacked[gk.name] = values
        else:
            per_expert.setdefault(gk.name, {})[gk.expert] = values
    entries: dict[str, ImatrixEntry] = {}
    for name, values in stacked.items():
        n_mat = (n_mats or {}).get(name) or _guess_experts(name, values.size, stacked)
        if n_mat > 1 and values.size % n_mat == 0:
            entries[name] = ImatrixEntry(values, _live_rows(values, n_mat))
        else:
            entries[name] = ImatrixEntry(values, np.ones(1, dtype=np.int64))
    for name, experts in per_expert.items():
        sizes = {v.size for v in experts.values()}
        if len(sizes) != 1:
            raise ImatrixError(f"{p}: experts of {name} have different lengths {sorted(sizes)}")
        ne0 = sizes.pop()
        n_mat = max((n_mats or {}).get(name, 0), max(experts) + 1)
        sums = np.zeros(n_mat * ne0, dtype=np.float32)
        counts = np.zeros(n_mat, dtype=np.int64)
        for e, v in experts.items():
            sums[e * ne0 : (e + 1) * ne0] = v
            counts[e] = int((v != 0).any())
        entries[name] = ImatrixEntry(sums, counts)
    return Imatrix(dict(sorted(entries.items())), [], 0, 0, fmt="cimatrix")


def _guess_experts(name: str, size: int, stacked: Mapping[str, np.ndarray]) -> int:
    """Expert count of a stacked gate/up entry from its layer's hidden size (attention inputs).

    Gate/up experts read the hidden state, as q/k/v do, so ``size / hidden`` is the expert count;
    down experts take the count of their layer's gate/up stack. 1 when it cannot be told.
    """
    if not name.endswith("_exps.weight"):
        return 1
    blk = name.split(".")[1]
    if "ffn_down_exps" in name:
        for sib in ("ffn_gate_exps", "ffn_up_exps"):
            other = stacked.get(f"blk.{blk}.{sib}.weight")
            if other is not None:
                return _guess_experts(f"blk.{blk}.{sib}.weight", other.size, stacked)
        return 1
    for attn in ("attn_q", "attn_k", "attn_v", "attn_qkv"):
        hidden = stacked.get(f"blk.{blk}.{attn}.weight")
        if hidden is not None and hidden.size and size % hidden.size == 0:
            return size // hidden.size
    return 1


def _parse_cimatrix(p: Path) -> dict[str, np.ndarray]:
    data = p.read_bytes()
    if len(data) < 8:
        raise ImatrixError(f"{p}: not a .cimatrix file ({len(data)} bytes, need at least 8)")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n < 1 or n > 1_000_000:
        raise ImatrixError(f"{p}: not a .cimatrix file (entry count {n})")
    off = 8
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        if off + 8 > len(data):
            raise ImatrixError(f"{p}: truncated .cimatrix at entry {i} (byte {off})")
        (klen,) = struct.unpack_from("<Q", data, off)
        off += 8
        if klen < 1 or klen > 4096 or off + klen + 8 > len(data):
            raise ImatrixError(f"{p}: entry {i}: bad key length {klen} at byte {off - 8}")
        try:
            key = data[off : off + klen].decode("utf-8")
        except UnicodeDecodeError:
            raise ImatrixError(f"{p}: entry {i}: key is not UTF-8") from None
        off += klen
        (nval,) = struct.unpack_from("<Q", data, off)
        off += 8
        if nval < 1 or off + 4 * nval > len(data):
            raise ImatrixError(f"{p}: entry {key}: {nval} values do not fit in the file")
        if key in out:
            raise ImatrixError(f"{p}: entry {key} appears twice")
        out[key] = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
        off += 4 * nval
    if off != len(data):
        raise ImatrixError(f"{p}: {len(data) - off} stray bytes after the last .cimatrix entry")
    return out


# ---------------------------------------------------------------- writing


def write_imatrix(im: Imatrix, path: str | os.PathLike[str], fmt: str | None = None, arch: str = "llama") -> str:
    """Write ``im`` in ``fmt`` (default: from the suffix); ``arch`` names HF keys for ``.cimatrix``."""
    fmt = format_for_path(path, fmt)
    if fmt == "gguf":
        write_imatrix_gguf(im, path)
    elif fmt == "dat":
        write_imatrix_dat(im, path)
    else:
        write_imatrix_cimatrix(im, path, arch)
    return fmt


def write_imatrix_gguf(im: Imatrix, path: str | os.PathLike[str]) -> None:
    """llama.cpp's GGUF imatrix: ``<name>.in_sum2`` [n_mat, ne0] and ``<name>.counts`` [n_mat, 1].

    Entries read from ``.dat``/``.cimatrix`` keep their (values, counts) pairs, which llama-quantize
    divides exactly as the source format's reader would (a legacy ``ncall`` of 0 becomes 1).
    """
    import gguf

    from quantbench.formats.gguf import KV, GGUFStreamWriter

    VT = gguf.GGUFValueType
    with GGUFStreamWriter(path, "imatrix") as w:
        w.add_kv("general.type", KV("imatrix", VT.STRING))
        # gguf-py refuses an empty array; a .cimatrix names no dataset, so say where the data came from
        datasets = list(im.datasets) or [f"unknown (from {im.path.name})" if im.path else "unknown"]
        w.add_kv("imatrix.datasets", KV(datasets, VT.ARRAY, VT.STRING))
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
            counts = e.counts
            if im.fmt == "dat":
                counts = np.where(counts > 0, counts, 1)
            w.write_tensor(f"{name}.in_sum2", e.sums.astype(np.float32))
            w.write_tensor(f"{name}.counts", counts.astype(np.float32))


def _dat_ncall(im: Imatrix, e: ImatrixEntry) -> int:
    """llama-imatrix's ``ceil(max count / chunk_size)``, rounded down to a power of two (exact scaling)."""
    if im.fmt == "gguf" and im.chunk_size > 0:
        n = -(-int(e.counts.max()) // im.chunk_size)
    elif im.fmt == "gguf":
        n = im.chunk_count
    else:
        n = 1
    return 1 << int(math.log2(n)) if n >= 1 else 1


def write_imatrix_dat(im: Imatrix, path: str | os.PathLike[str]) -> None:
    """Legacy ``.dat``: per entry the per-call mean times ncall, then chunk count and dataset."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(im.entries)))
        for name in sorted(im.entries):
            e = im.entries[name]
            raw = name.encode()
            if im.fmt == "dat":
                ncall, vals = int(e.counts[0]), e.sums.astype(np.float32)
            else:
                w = im.quant_weights(name)
                ncall = _dat_ncall(im, e)
                vals = (w * np.float32(ncall)).astype(np.float32)
                if not np.array_equal(vals / np.float32(ncall), w):  # overflow: keep the weights exact
                    ncall, vals = 1, w
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size))
            f.write(vals.astype("<f4").tobytes())
        f.write(struct.pack("<i", int(im.chunk_count)))
        ds = (im.datasets[0] if im.datasets else "").encode()
        f.write(struct.pack("<i", len(ds)) + ds)


def write_imatrix_cimatrix(im: Imatrix, path: str | os.PathLike[str], arch: str = "llama") -> None:
    """mistral.rs ``.cimatrix`` keyed by HF module name; values are exactly ``quant_weights``."""
    rows = []
    for name in sorted(im.entries):
        key = gguf_to_hf(name, arch)
        rows.append((key, im.quant_weights(name)))
    rows.sort(key=lambda kv: kv[0])
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(rows)))
        for key, vals in rows:
            raw = key.encode()
            f.write(struct.pack("<Q", len(raw)) + raw + struct.pack("<Q", vals.size))
            f.write(vals.astype("<f4").tobytes())


# ---------------------------------------------------------------- matching a model


def gguf_tensor_sizes(model: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """``name -> (columns, experts)`` for every matrix of a GGUF model (what an entry must fit)."""
    from quantbench.formats.gguf import read_gguf

    out = {}
    for t in read_gguf(model).tensors:
        if len(t.shape) >= 2:
            out[t.name] = (t.n_per_row, int(np.prod(t.shape[:-2])) if len(t.shape) > 2 else 1)
    return out


def check_imatrix_for_model(im: Imatrix, sizes: Mapping[str, tuple[int, int]], model: str) -> None:
    """Refuse an imatrix made for another model: no entry names a tensor, or a size differs."""
    matched = [n for n in im.entries if n in sizes]
    if not matched:
        raise ImatrixError(
            f"{im.path}: none of its {len(im.entries)} entries (e.g. {next(iter(im.entries), '?')}) "
            f"names a tensor of {model}: imatrix is for another model"
        )
    for name in matched:
        cols, n_mat = sizes[name]
        got = im.entries[name].sums.size
        if got != cols * n_mat and not name.startswith("token_embd"):
            raise ImatrixError(
                f"{im.path}: entry {name} has {got} values, {model} needs {cols * n_mat} "
                f"({cols} columns x {n_mat} experts): imatrix is for another model"
            )
