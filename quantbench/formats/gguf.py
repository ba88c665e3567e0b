"""GGUF files through the ``gguf`` package: lazy reading of tensors as quantized values, and a
streaming v3 writer that takes one tensor at a time and commits atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantbench.errors import FormatError
from quantbench.formats.atomic import atomic_output
from quantbench.quant.qtensor import QTensor
from quantbench.quant.registry import dequantize, get_type

GGUF_MAGIC = b"GGUF"


@dataclass
class KV:
    """A metadata value with its GGUF value type (and element type for arrays)."""

    value: Any
    vtype: Any
    sub_type: Any = None


@dataclass
class GGUFTensor:
    """A tensor entry; its bytes stay in the memory-mapped file until asked for."""

    name: str
    ggml_type: str
    ggml_id: int
    shape: tuple[int, ...]  # torch order: ne reversed, last dim = row length
    nbytes: int
    offset: int  # absolute file offset of the tensor's bytes
    _raw: np.ndarray = field(repr=False)
    path: Path = field(repr=False, default=Path())

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_per_row(self) -> int:
        return self.shape[-1]

    @property
    def nrows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    def raw_rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """uint8 ``[rows, row_bytes]`` for rows ``start:stop``.

        Read with ``pread`` rather than through the reader's memory map: pages of a map that
        were touched count in the process's resident set until unmapped, which would make a
        streaming job's peak RSS grow with the model; a read keeps only this slab in memory.
        """
        row_bytes = self.nbytes // self.nrows
        stop = self.nrows if stop is None else stop
        n = (stop - start) * row_bytes
        buf = bytearray(n)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], self.offset + start * row_bytes)
        finally:
            os.close(fd)
        if got != n:
            raise FormatError(f"{self.path}: truncated: tensor {self.name} rows {start}..{stop} incomplete")
        return torch.frombuffer(buf, dtype=torch.uint8).reshape(stop - start, row_bytes)

    def qtensor(self) -> QTensor:
        return QTensor(self.ggml_type, self.shape, {"data": self.raw_rows()})

    def float_rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 ``[rows, n_per_row]`` for rows ``start:stop`` (dequantizing if needed)."""
        raw = self.raw_rows(start, stop)
        q = QTensor(self.ggml_type, (raw.shape[0], self.n_per_row), {"data": raw})
        try:
            return dequantize(q)
        except Exception as e:  # an unsupported type is a user-facing limitation
            raise FormatError(f"{self.path}: tensor {self.name} of type {self.ggml_type} cannot be dequantized: {e}") from e


@dataclass
class GGUFFile:
    path: Path
    version: int
    alignment: int
    metadata: dict[str, KV]
    tensors: list[GGUFTensor]

    @property
    def architecture(self) -> str:
        kv = self.metadata.get("general.architecture")
        if kv is None:
            raise FormatError(f"{self.path}: missing general.architecture")
        return str(kv.value)

    def tensor(self, name: str) -> GGUFTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise FormatError(f"{self.path}: no tensor named {name}")

    def values(self) -> dict[str, Any]:
        return {k: v.value for k, v in self.metadata.items()}


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file lazily; any structural problem becomes a ``FormatError`` naming the file."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{p}: no such file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise FormatError(f"{p}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        r = gguf.GGUFReader(p)
    except Exception as e:
        raise FormatError(f"{p}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from e
    metadata: dict[str, KV] = {}
    for key, fld in r.fields.items():
        if key.startswith("GGUF."):
            continue
        sub = fld.types[1] if len(fld.types) > 1 else None
        try:
            value = fld.contents()
        except Exception as e:
            raise FormatError(f"{p}: metadata key {key} is unreadable: {e}") from e
        metadata[key] = KV(value, fld.types[0], sub)
    size = p.stat().st_size
    tensors = []
    for t in r.tensors:
        if t.data_offset + t.n_bytes > size:
            raise FormatError(f"{p}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, file has {size}")
        ne = [int(x) for x in t.shape]
        tensors.append(
            GGUFTensor(
                name=t.name,
                ggml_type=t.tensor_type.name,
                ggml_id=int(t.tensor_type),
                shape=tuple(reversed(ne)),
                nbytes=int(t.n_bytes),
                offset=int(t.data_offset),
                _raw=t.data,
                path=p,
            )
        )
    version = int(r.fields["GGUF.version"].contents())
    return GGUFFile(p, version, int(r.alignment), metadata, tensors)


class GGUFStreamWriter:
    """GGUF v3 writer: declare metadata and every tensor's type/shape, then stream the data.

    Tensors must be written in declaration order. The file appears under its final name only
    after :meth:`close` succeeds; on error the partial temp file is removed.
    """

    def __init__(self, path: str | os.PathLike[str], arch: str, alignment: int = 32) -> None:
        self.path = Path(path)
        self._ctx = atomic_output(self.path)
        self._tmp = self._ctx.__enter__()
        import gguf

        self._gguf = gguf
        self._w = gguf.GGUFWriter(self._tmp, arch)
        # GGUFWriter seeds general.architecture; keep it only if the caller sets it again,
        # so the key order follows the caller's exactly.
        self._w.kv_data[0].clear()
        self._w.data_alignment = alignment
        self._pending: list[tuple[str, int]] = []
        self._started = False

    def add_kv(self, key: str, kv: KV) -> None:
        v = kv.value
        if kv.vtype == self._gguf.GGUFValueType.ARRAY:
            self._w.add_key_value(key, list(v), kv.vtype, sub_type=kv.sub_type)
        else:
            self._w.add_key_value(key, v, kv.vtype)

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: str) -> None:
        t = get_type(ggml_type)
        n_per_row = shape[-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        nbytes = rows * t.row_bytes(n_per_row)
        qtype = self._gguf.GGMLQuantizationType[t.name]
        self._w.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._pending.append((name, nbytes))

    def _start(self) -> None:
        self._w.write_header_to_file()
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()
        self._started = True

    def write_tensor(self, name: str, data: torch.Tensor | np.ndarray) -> None:
        """Write the next tensor's bytes (uint8, any shape) in declaration order."""
        if not self._started:
            self._start()
        exp_name, exp_bytes = self._pending.pop(0)
        arr = data.numpy() if isinstance(data, torch.Tensor) else data
        arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        if exp_name != name or arr.nbytes != exp_bytes:
            raise FormatError(f"{self.path}: expected tensor {exp_name} ({exp_bytes} bytes), got {name} ({arr.nbytes} bytes)")
        self._w.write_tensor_data(arr)

    def write_tensor_chunks(self, name: str, chunks) -> None:
        """Write one tensor's bytes from an iterable of uint8 pieces (bounded memory)."""
        if not self._started:
            self._start()
        exp_name, exp_bytes = self._pending.pop(0)
        if exp_name != name:
            raise FormatError(f"{self.path}: expected tensor {exp_name}, got {name}")
        w = self._w
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        written = 0
        for c in chunks:
            arr = c.numpy() if isinstance(c, torch.Tensor) else c
            arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            arr.tofile(fout)
            written += arr.nbytes
        if written != exp_bytes:
            raise FormatError(f"{self.path}: tensor {name} wrote {written} bytes, expected {exp_bytes}")
        w.write_padding(fout, written)
        # keep GGUFWriter's bookkeeping in step with what we wrote ourselves
        w.tensors[0].pop(name)
        w.state = self._gguf.gguf_writer.WriterState.WEIGHTS

    def close(self) -> None:
        if not self._started:
            self._start()
        if self._pending:
            raise FormatError(f"{self.path}: {len(self._pending)} declared tensors were never written")
        self._w.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        try:
            self._w.close()
        except Exception:
            pass
        try:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass

    def __enter__(self) -> "GGUFStreamWriter":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if ev is None:
            self.close()
        else:
            self.abort(ev)
