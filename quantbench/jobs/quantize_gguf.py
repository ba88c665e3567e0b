"""GGUF → GGUF quantization, streaming one tensor (and one slab of rows) at a time.

Mirrors ``llama-quantize``: the same per-tensor types (``quantbench.plan.llama_mixture``), the
same tensor order (llama.cpp's loader sorts by layer number, then name), the same metadata keys
(input keys in order, then ``general.quantization_version``, ``general.file_type`` and the
``quantize.imatrix.*`` keys appended), and the same bytes (the quantizers are byte-exact).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quantbench.devices import resolve_device
from quantbench.errors import ImatrixError
from quantbench.formats.gguf import KV, GGUFFile, GGUFStreamWriter, GGUFTensor, read_gguf
from quantbench.imatrix.files import Imatrix, read_imatrix
from quantbench.quant.registry import get_type, quantize_rows

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
LLAMA_FTYPE_GUESSED = 1024


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    src_type: str
    dst_type: str
    reason: str
    src_bytes: int
    dst_bytes: int
    used_imatrix: bool


@dataclass
class QuantizeReport:
    output: Path
    ftype: str
    tensors: list[TensorReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_elements(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.dst_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.n_elements, 1)


@dataclass(frozen=True)
class IsqChoice:
    """What ``--isq`` asked for: a llama.cpp ftype (mixture rules) or one GGML type (pure)."""

    ftype: str  # ftype whose rules drive the plan
    file_type: int  # general.file_type written
    pure: bool
    single_type: str | None  # set when --isq named a GGML type that is no ftype


def resolve_isq(isq: str, pure: bool = False) -> IsqChoice:
    """llama-quantize's ftype names (and its Q3_K/Q4_K/Q5_K aliases) select its mixtures; any other
    GGML type name quantizes every quantizable tensor to that type, with llama.cpp's shape fallbacks."""
    from quantbench.errors import UnknownTypeError
    from quantbench.plan.llama_mixture import FTYPES, get_ftype

    try:
        ft = get_ftype(isq)
        get_type(ft.default_type)
        return IsqChoice(ft.name, ft.file_type, pure, None)
    except UnknownTypeError:
        pass
    try:
        t = get_type(isq)
    except UnknownTypeError:
        from quantbench.quant.registry import all_types

        supported = [n for n, f in FTYPES.items() if _supported(f.default_type)]
        raise UnknownTypeError(
            f"unknown --isq {isq!r}: not a llama.cpp ftype ({', '.join(supported)}) "
            f"nor a GGML type ({', '.join(x.name for x in all_types())})"
        ) from None
    return IsqChoice("Q8_0", LLAMA_FTYPE_GUESSED, True, t.name)


def _supported(type_name: str) -> bool:
    from quantbench.errors import UnknownTypeError

    try:
        get_type(type_name)
        return True
    except UnknownTypeError:
        return False






def _imatrix_for(
    im: Imatrix | None, t: GGUFTensor, report_missing: list[str]
) -> np.ndarray | None:
    """Per-expert-stacked weights for tensor ``t``, checked as llama-quantize checks them."""
    if im is None:
        return None
    n_mat = int(np.prod(t.shape[:-2])) if len(t.shape) > 2 else 1
    w = im.quant_weights(t.name, n_mat)
    if w is None:
        report_missing.append(t.name)
        return None
    if w.size != t.n_per_row * n_mat:
        if t.name.startswith("token_embd"):
            return None  # llama.cpp ignores a mismatched token_embd entry
        raise ImatrixError(
            f"{im.path}: entry {t.name} has {w.size} values, tensor needs {t.n_per_row * n_mat} "
            f"({t.n_per_row} columns x {n_mat} experts): imatrix is for another model"
        )
    return w


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    isq: str,
    *,
    imatrix: str | os.PathLike[str] | None = None,
    pure: bool = False,
    device: str = "auto",
    slab_elements: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantizeReport:
    """Quantize GGUF ``src`` to ``dst`` with a llama.cpp ftype (``Q4_K_M``) or a single GGML type."""
    from quantbench.plan.llama_mixture import TensorSpec, loader_order_key, plan_tensors

    t0 = time.perf_counter()
    dev = resolve_device(device)
    g: GGUFFile = read_gguf(src)
    choice = resolve_isq(isq, pure)
    im = read_imatrix(imatrix) if imatrix is not None else None

    tensors = sorted(g.tensors, key=lambda t: loader_order_key(t.name))
    specs = [TensorSpec(t.name, t.ne, t.ggml_type) for t in tensors]
    overrides = [(".*", choice.single_type)] if choice.single_type else []
    plans = plan_tensors(specs, g.architecture, g.values(), choice.ftype, pure=choice.pure,
                         has_imatrix=im is not None, tensor_type_overrides=overrides)

    missing: list[str] = []
    weights: dict[str, np.ndarray | None] = {}
    for t, p in zip(tensors, plans):
        if p.target_type != t.ggml_type:
            get_type(p.target_type)  # unknown target types fail before any output exists
            weights[t.name] = _imatrix_for(im, t, missing)
    if im is not None and weights and all(w is None for w in weights.values()):
        raise ImatrixError(
            f"{im.path}: none of its {len(im.entries)} entries matches a tensor of {g.path} "
            f"(e.g. {next(iter(im.entries), '?')}): imatrix is for another model"
        )

    if slab_elements is None:
        slab_elements = (1 << 26) if dev.type == "cuda" else (1 << 22)
    report = QuantizeReport(Path(dst), choice.single_type or choice.ftype)
    with GGUFStreamWriter(dst, g.architecture, alignment=g.alignment) as w:
        for key, kv in g.metadata.items():
            if key in SPLIT_KEYS or key in ("general.quantization_version", "general.file_type"):
                continue
            w.add_kv(key, kv)
        import gguf

        VT = gguf.GGUFValueType
        w.add_kv("general.quantization_version", KV(QUANTIZATION_VERSION, VT.UINT32))
        w.add_kv("general.file_type", KV(choice.file_type, VT.UINT32))
        if im is not None:
            w.add_kv("quantize.imatrix.file", KV(str(imatrix)[:127], VT.STRING))
            if im.datasets:
                w.add_kv("quantize.imatrix.dataset", KV(im.datasets[0][:127], VT.STRING))
            w.add_kv("quantize.imatrix.entries_count", KV(len(im.entries), VT.UINT32))
            if im.chunk_count > 0:
                w.add_kv("quantize.imatrix.chunks_count", KV(int(im.chunk_count), VT.UINT32))
        for t, p in zip(tensors, plans):
            w.add_tensor(t.name, t.shape, p.target_type)

        for i, (t, p) in enumerate(zip(tensors, plans)):
            if p.target_type == t.ggml_type:
                w.write_tensor_chunks(t.name, _copy_chunks(t, slab_elements))
                dst_bytes = t.nbytes
            else:
                qw = weights.get(t.name)
                w.write_tensor_chunks(t.name, _quantized_chunks(t, p.target_type, qw, dev, slab_elements))
                dst_bytes = t.nrows * get_type(p.target_type).row_bytes(t.n_per_row)
            report.tensors.append(
                TensorReport(t.name, t.shape, t.ggml_type, p.target_type, p.reason, t.nbytes, dst_bytes,
                             weights.get(t.name) is not None)
            )
            if progress:
                progress(t.name, i + 1, len(tensors))
    report.seconds = time.perf_counter() - t0
    return report


def _rows_per_slab(t: GGUFTensor, slab_elements: int) -> int:
    return max(1, slab_elements // t.n_per_row)


def _copy_chunks(t: GGUFTensor, slab_elements: int):
    step = _rows_per_slab(t, slab_elements)
    for r in range(0, t.nrows, step):
        yield t.raw_rows(r, min(t.nrows, r + step))


def _quantized_chunks(t: GGUFTensor, target: str, qw: np.ndarray | None, dev: torch.device, slab_elements: int):
    qt = get_type(target)
    step = _rows_per_slab(t, slab_elements)
    rows_per_expert = t.shape[-2] if len(t.shape) > 1 else 1
    qw_t = torch.from_numpy(qw).to(dev) if qw is not None else None
    for e0 in range(0, t.nrows, rows_per_expert):
        e = e0 // rows_per_expert
        w_e = None if qw_t is None else qw_t[e * t.n_per_row : (e + 1) * t.n_per_row]
        for r in range(e0, e0 + rows_per_expert, step):
            stop = min(e0 + rows_per_expert, r + step)
            x = t.float_rows(r, stop).to(dev)
            if not torch.isfinite(x).all():
                from quantbench.errors import InputValueError

                raise InputValueError(f"{t.path}: tensor {t.name} has NaN/inf values in rows {r}..{stop}")
            yield quantize_rows(qt, x, w_e).cpu()
