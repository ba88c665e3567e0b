"""Hugging Face safetensors models: a lazy reader and a streaming, sharded, atomic writer.

The reader parses the safetensors headers itself and reads tensor bytes with ``preadv`` into
freshly allocated tensors instead of going through a memory map: pages of a map that has been
read stay resident (and count in RSS) until the map is closed, so streaming a 16 GB checkpoint
through ``safe_open`` would grow RSS with model size. ``safetensors.safe_open`` is still used as
the second opinion on what a valid file is (tests compare against it).

The writer takes the full list of tensors (name, dtype, shape) up front, because a safetensors
header precedes the data, then pulls each tensor's bytes from a producer one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from quantbench.errors import FormatError, QuantbenchError
from quantbench.formats.atomic import atomic_output

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors crate enforces
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype tag -> (torch dtype, element size)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
}
TORCH_TO_TAG = {v[0]: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``nbytes`` bytes at absolute ``offset`` of ``path``."""

    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1


def read_config(directory: str | os.PathLike[str]) -> dict:
    """A model directory's ``config.json``; a missing or malformed file is a ``FormatError``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FormatError(f"{directory}: not a model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from None


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor entries and ``__metadata__`` of one safetensors file, validated against its size.

    Raises ``FormatError`` naming the file for a short file, a bad header, overlapping or
    out-of-range offsets, or a truncated data section.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{p}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(f"{p}: header length {n} does not fit a {size}-byte file (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{p}: cannot read: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            tag, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{p}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if tag not in DTYPES:
            raise FormatError(f"{p}: tensor {name!r} has unsupported dtype {tag}")
        numel = int(np.prod(shape)) if shape else 1
        if end - start != numel * DTYPES[tag][1] or start < 0:
            raise FormatError(f"{p}: tensor {name!r} ({tag} {list(shape)}) has data_offsets {start}..{end} of the wrong size")
        infos[name] = TensorInfo(name, tag, shape, p, data_start + start, end - start)
        spans.append((start, end, name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            raise FormatError(f"{p}: tensor {name!r} starts at {start}, expected {pos} (gap or overlap in data_offsets)")
        pos = end
    if data_start + pos > size:
        raise FormatError(
            f"{p}: truncated: tensors need {data_start + pos} bytes, file has {size}"
            + (f" (last tensor {spans[-1][2]!r})" if spans else "")
        )
    return infos, {str(k): str(v) for k, v in metadata.items()}


def index_files(files: Sequence[Path]) -> dict[str, TensorInfo]:
    """One name -> tensor map over several shards; a name in two shards is a ``FormatError``."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = read_header(f)
        for name, info in infos.items():
            if name in out:
                raise FormatError(f"tensor {name!r} appears in two shards: {out[name].path} and {f}")
            out[name] = info
    return out


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """The whole tensor, read with ``preadv`` into a new CPU tensor."""
    return read_rows(info, 0, info.rows, fd).reshape(info.shape)


def read_rows(info: TensorInfo, start: int, stop: int, fd: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of the tensor viewed as ``[rows, shape[-1]]`` (a 1-D/0-D tensor is one row)."""
    row_bytes = info.nbytes // max(info.rows, 1)
    cols = info.shape[-1] if info.shape else 1
    out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
    _pread_into(info.path, out.numpy(), info.offset + start * row_bytes, fd)
    return out.view(info.torch_dtype).reshape(stop - start, cols)


def _pread_into(path: Path, buf: np.ndarray, offset: int, fd: int | None) -> None:
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise FormatError(f"{path}: unexpected end of file at byte {offset + done}")
            done += n
    finally:
        if own:
            os.close(fd)


class SafetensorsModel:
    """A model directory (``config.json`` + one ``model.safetensors`` or shards with an index).

    Nothing but headers is read on open; tensors come one at a time from :meth:`read`,
    :meth:`read_rows` or by iterating.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._index: Path | None = None
        if self.root.is_file():
            files = [self.root]
            self.root = self.root.parent
        elif self.root.is_dir():
            files = self._shard_files()
        else:
            raise FormatError(f"{root}: no such file or directory")
        self.files = files
        self.tensors = index_files(files)
        self._check_index()
        self.config: dict = read_config(self.root) if (self.root / "config.json").is_file() else {}
        self._fds: dict[Path, int] = {}

    def _shard_files(self) -> list[Path]:
        index = self.root / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{index}: not a safetensors index ({e})") from None
            self._index = index
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.root / n).is_file()]
            if missing:
                raise FormatError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
            return [self.root / n for n in names]
        single = self.root / SINGLE_NAME
        if single.is_file():
            return [single]
        found = sorted(self.root.glob("*.safetensors"))
        if not found:
            raise FormatError(f"{self.root}: no model.safetensors, no {INDEX_NAME} and no *.safetensors files")
        return found

    def _check_index(self) -> None:
        index = self._index
        if index is None:
            return
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            info = self.tensors.get(name)
            if info is None or info.path.name != shard:
                raise FormatError(f"{index}: index maps {name!r} to {shard}, which does not hold it")

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SafetensorsModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise FormatError(f"{self.root}: no tensor named {name!r}")
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return read_tensor(info, self._fd(info.path))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.info(name)
        return read_rows(info, start, stop, self._fd(info.path))

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, one tensor in memory at a time."""
        for info in sorted(self.tensors.values(), key=lambda i: (str(i.path), i.offset)):
            yield info.name, read_tensor(info, self._fd(info.path))


def resolve_model_dir(spec: str | os.PathLike[str]) -> Path:
    """A local path as is; otherwise a Hugging Face hub id fetched by ``snapshot_download``.

    ``HF_HUB_OFFLINE=1`` makes huggingface_hub answer from its cache only; a miss becomes a
    ``QuantbenchError`` naming the id.
    """
    p = Path(spec).expanduser()
    if p.exists():
        return p
    s = str(spec)
    if s.count("/") != 1 or s.startswith((".", "/")):
        raise QuantbenchError(f"{s}: no such file or directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise QuantbenchError(f"{s}: reading a hub id needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        path = snapshot_download(
            repo_id=s,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"],
        )
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: only cached snapshots are used)" if offline else ""
        raise QuantbenchError(f"{s}: cannot fetch from the Hugging Face hub{hint}: {type(e).__name__}: {e}") from None
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Writing

Chunks = Iterable["torch.Tensor | bytes"]


@dataclass
class Entry:
    """One tensor to write: its header fields and a producer of its bytes (called once)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Chunks]

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape)) if self.shape else 1
        return n * DTYPES[self.dtype][1]


def tensor_entry(name: str, t: torch.Tensor) -> Entry:
    """An entry for a tensor already in memory."""
    if t.dtype not in TORCH_TO_TAG:
        raise FormatError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
    return Entry(name, TORCH_TO_TAG[t.dtype], tuple(t.shape), lambda: [t])


def _as_bytes(chunk: "torch.Tensor | bytes") -> memoryview:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return memoryview(chunk).cast("B")
    c = chunk.detach().contiguous().cpu()
    return memoryview(c.reshape(-1).view(torch.uint8).numpy()) if c.numel() else memoryview(b"")


def header_bytes(entries: Sequence[Entry], metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed JSON header for ``entries`` laid out in the given order.

    Padded with spaces to a multiple of 8 like the safetensors crate, so data starts aligned.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_stream(path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> int:
    """Write ``entries`` to ``path`` (not atomic by itself: callers pass a staging name).

    Each producer runs when its tensor's turn comes, so at most one tensor's chunks are alive.
    A producer yielding more or fewer bytes than the header promised is a ``FormatError``.
    Returns the file size.
    """
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise FormatError(f"{path}: duplicate tensor name(s) {dup}")
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for e in entries:
            written = 0
            for chunk in e.produce():
                mv = _as_bytes(chunk)
                f.write(mv)
                written += len(mv)
            if written != e.nbytes:
                raise FormatError(f"{path}: tensor {e.name!r} produced {written} bytes, header says {e.nbytes}")
        return f.tell()


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split in order at ``max_shard_bytes`` without splitting a tensor (an oversize tensor gets a shard)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_model_dir(
    out_dir: str | os.PathLike[str],
    entries: Sequence[Entry],
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> list[Path]:
    """A Hugging Face style model directory: ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, plus ``extra_files``
    (``config.json``, tokenizer files...).

    Every file is staged under a temporary name and renamed only once all of them are complete,
    so a failure leaves nothing new under the final names.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QuantbenchError(f"{out}: exists and is not a directory")
    shards = plan_shards(entries, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        for name, shard in zip(names, shards):
            tmp = stack.enter_context(atomic_output(out / name))
            write_safetensors_stream(tmp, shard, meta)
            written.append(out / name)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard},
            }
            tmp = stack.enter_context(atomic_output(out / INDEX_NAME))
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            written.append(out / INDEX_NAME)
        for fname, data in (extra_files or {}).items():
            tmp = stack.enter_context(atomic_output(out / fname))
            tmp.write_bytes(data)
            written.append(out / fname)
    return written
