"""HF safetensors model -> one UQFF output per ``--isq`` type, streaming, as mistral.rs writes it.

Why streaming: headers are planned from shapes alone (GGML byte counts are arithmetic; other
families' part shapes come from running their quantizer on a ``meta`` tensor), then each layer
is read, quantized and written when its turn comes. GGML types go slab by slab of rows, so
peak memory is one slab plus the largest non-GGML layer, independent of model size.

What gets quantized, promoted, and what falls back is ``quantbench.plan.isq`` (mistral.rs's
rules); ``--topology`` is ``quantbench.plan.topology``. Everything under the output names is
staged and renamed at the very end: a failure leaves nothing new behind.

Every layer is quantized the way mistral.rs's own ISQ would, so a UQFF from quantbench holds the
bytes mistral.rs would have written: K-quants through candle's search
(:mod:`quantbench.quant.ggml.candle_kquants`, not llama.cpp's current one, which the GGUF path
uses), FP8/F8Q8/AFQ/MXFP4 with mistral.rs's rules (see each scheme module).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from quantbench.devices import resolve_device
from quantbench.errors import InputValueError, QuantbenchError, ShapeError
from quantbench.formats.safetensors_dir import Entry, SafetensorsModel, resolve_model_dir, write_safetensors_stream
from quantbench.formats.uqff import (
    MAX_UQFF_SIZE_BYTES,
    REPORT_NAME,
    RESIDUAL_NAME,
    SIBLING_FILES,
    UQFF_VERSION,
    Staging,
    gguf_layer,
    producer_metadata,
    qtensor_layer,
    sanitize_config,
    unquant_layer,
    write_uqff_output,
)
from quantbench.plan.isq import IsqType, LayerPlan, Module, find_modules, parse_isq_list, plan_layer
from quantbench.plan.topology import Topology
from quantbench.quant.qtensor import QTensor
from quantbench.quant.ggml.candle_kquants import CANDLE_TYPES, quantize_rows_candle
from quantbench.quant.registry import get_type, quantize_rows

Progress = Callable[[str, int, int], None]
HQQ_GROUP, AFQ_GROUP, HQQ_STEPS = 64, 64, 10  # mistral.rs ISQ settings


@dataclass
class LayerReport:
    module: str
    default_target: str
    resolved_target: str
    stored: str
    shape: tuple[int, ...]
    reason: str = ""


@dataclass
class OutputReport:
    quant: str
    path: Path  # <dir>/<stem>.uqff as asked
    shards: list[str]
    layers: list[LayerReport]

    @property
    def actual_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for L in self.layers:
            counts[L.stored] = counts.get(L.stored, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def fallbacks(self) -> list[LayerReport]:
        """mistral.rs's notion: layers left in a float format although a quantized type was asked."""
        return [L for L in self.layers if L.stored != L.resolved_target and L.stored in ("unquant", "f32", "f16", "bf16")]

    def to_json(self) -> dict:
        return {
            "quant": self.quant,
            "shards": self.shards,
            "layers": len(self.layers),
            "actual_counts": self.actual_counts,
            "fallback_count": len(self.fallbacks),
            "fallbacks": [{"module": L.module, "from": L.resolved_target, "to": L.stored, "shape": list(L.shape),
                           "reason": L.reason} for L in self.fallbacks],
            "layer_details": [
                {"module": L.module, "default_target": L.default_target, "resolved_target": L.resolved_target,
                 "stored": L.stored, "shape": list(L.shape), **({"reason": L.reason} if L.reason else {})}
                for L in self.layers
            ],
        }


@dataclass
class UqffJobReport:
    root: Path
    source: str
    outputs: list[OutputReport] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        from quantbench import __version__

        return {
            "schema": 1,
            "generated_by": {"tool": "quantbench quantize", "quantbench_version": __version__},
            "base_model": self.source,
            "uqff_version": ".".join(map(str, UQFF_VERSION)),
            "outputs": [o.to_json() for o in self.outputs],
        }




def output_paths(out: str | os.PathLike[str], types: Sequence[IsqType]) -> list[tuple[IsqType, Path]]:
    """mistral.rs's naming: one type -> ``out`` must end in ``.uqff``; several -> ``out`` is a
    directory and each type goes to ``<out>/<label>.uqff``."""
    o = Path(out)
    if len(types) == 1:
        if o.suffix != ".uqff":
            raise QuantbenchError(f"{o}: a UQFF output path must end in .uqff (or give several --isq types and a directory)")
        return [(types[0], o)]
    if o.suffix == ".uqff":
        raise QuantbenchError(f"{o}: several --isq types need a directory as output, not a .uqff file")
    return [(t, o / f"{t.label}.uqff") for t in types]


# ----------------------------------------------------------------------------------------------
# Per-layer producers


def _finite(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise InputValueError(f"{what}: contains NaN or inf values")
    return x


def _row_slabs(src: SafetensorsModel, module: Module, slab_elements: int) -> Iterable[tuple[str, int, int]]:
    for name in module.sources:
        info = src.info(name)
        step = max(1, slab_elements // max(info.shape[-1], 1))
        for r in range(0, info.rows, step):
            yield name, r, min(info.rows, r + step)


def _gguf_chunks(src: SafetensorsModel, module: Module, ggml: str, dev: torch.device, slab_elements: int):
    """GGML bytes of the (stacked) module, one slab of rows at a time."""
    qt = get_type(ggml)
    for name, a, b in _row_slabs(src, module, slab_elements):
        x = _finite(src.read_rows(name, a, b).to(dev, torch.float32), f"{src.root}: {name} rows {a}..{b}")
        if ggml in CANDLE_TYPES:
            yield quantize_rows_candle(ggml, x).cpu()
        else:
            yield quantize_rows(qt, x.contiguous(), None).cpu() if qt.block_size > 1 else x.to(torch.float32).cpu()


def _raw_chunks(src: SafetensorsModel, module: Module, slab_elements: int):
    for name, a, b in _row_slabs(src, module, slab_elements):
        yield src.read_rows(name, a, b)


def _read_module(src: SafetensorsModel, module: Module, dev: torch.device) -> torch.Tensor:
    ts = [_finite(src.read(n).to(dev), f"{src.root}: {n}") for n in module.sources]
    return ts[0] if not module.is_expert else torch.stack(ts)


def _scheme_for(t: IsqType) -> tuple[str, dict]:
    """quantbench scheme name and extra options reproducing mistral.rs's ISQ for a non-GGML type."""
    if t.family == "hqq":
        return f"HQQ{t.bits}", {"optimization_steps": HQQ_STEPS}
    if t.family == "afq":
        # mistral.rs on CPU runs the model in F32, so its AFQ scales/biases are F32; its CPU
        # quantizer is plain min/max (afq.py, rule "mistralrs"), not MLX's
        return f"AFQ{t.bits}", {"scale_dtype": torch.float32, "rule": "mistralrs"}
    if t.family == "mxfp4":
        return "MXFP4_ISQ", {}
    if t.family in ("fp8", "f8q8"):
        return t.name, {}
    raise QuantbenchError(f"no quantizer for ISQ family {t.family!r}")


def _meta_quantize(t: IsqType, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> QTensor:
    """Part names, shapes and dtypes of the scheme's output, computed on the meta device (the
    scheme modules are written without host syncs, so they run there); raises ShapeError when
    the scheme's shape rules reject the layer."""
    from quantbench.quant import afq, f8q8, fp8, hqq, mxfp4_ocp, schemes

    scheme_name, opts = _scheme_for(t)
    fn = {"hqq": hqq.quantize, "afq": afq.quantize, "fp8": fp8.quantize, "f8q8": f8q8.quantize,
          "mxfp4": mxfp4_ocp.quantize}[t.family]
    return fn(torch.empty(shape, dtype=dtype, device="meta"), name=name, **schemes.get_scheme(scheme_name).fixed, **opts)


class _LayerCache:
    """Quantize a non-GGML layer once, on the first request for any of its parts; drop it after
    the last part has been written, so only one such layer is alive at a time."""

    def __init__(self, compute: Callable[[], QTensor], parts: Iterable[str]):
        self.compute = compute
        self.left = set(parts)
        self.q: QTensor | None = None

    def fetch(self, part: str) -> torch.Tensor:
        if self.q is None:
            self.q = self.compute()
        t = self.q.tensors[part].cpu()
        self.left.discard(part)
        if not self.left:
            self.q = None
        return t


def _layer_entries(src: SafetensorsModel, plan: LayerPlan, dev: torch.device, slab: int) -> tuple[list[Entry], LayerPlan]:
    """Entries of one planned layer; non-GGML families whose shape rules reject the layer fall
    back to Unquant (as mistral.rs does for AFQ)."""
    m, t = plan.module, plan.resolved
    bias = src.read(m.bias) if m.bias else None
    if t.family == "gguf":
        ggml = plan.ggml
        rows = 1
        for d in m.shape[:-1]:
            rows *= d
        nbytes = get_type(ggml).row_bytes(m.shape[-1]) * rows
        return gguf_layer(m.key, ggml, m.shape, nbytes, lambda: _gguf_chunks(src, m, ggml, dev, slab), bias), plan
    src_dtype = src.info(m.sources[0]).torch_dtype
    try:
        meta_q = _meta_quantize(t, m.shape, src_dtype, m.key)
    except ShapeError as e:
        fallback = LayerPlan(m, plan.default, t, "unquant", None, str(e))
        tag = src.info(m.sources[0]).dtype
        return unquant_layer(m.key, tag, m.shape, lambda: _raw_chunks(src, m, slab), bias), fallback
    from quantbench.quant import schemes

    scheme_name, opts = _scheme_for(t)
    cache = _LayerCache(lambda: schemes.quantize(_read_module(src, m, dev), scheme_name, name=m.key, **opts),
                        meta_q.tensors)
    return qtensor_layer(m.key, t.family, meta_q, bias, cache.fetch), plan


# ----------------------------------------------------------------------------------------------


def quantize_uqff(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    isq: Sequence[str] | str,
    *,
    topology: str | os.PathLike[str] | None = None,
    organization: str | None = None,
    device: str = "cpu",
    shard_size: int = MAX_UQFF_SIZE_BYTES,
    slab_elements: int | None = None,
    progress: Progress | None = None,
    _source_name: str | None = None,
) -> UqffJobReport:
    """Quantize the model ``src`` (HF directory, single .safetensors, hub id, GGUF file or a
    packaged alias such as ``smollm2``) to UQFF.

    ``isq``: mistral.rs ISQ names or numeric shorthands; several (``["q4k", "q8_0"]`` or
    ``"q4k,q8_0"``) write one output each under the directory ``out``. ``topology``: a
    mistral.rs topology YAML. ``organization="moqe"``: routed experts only. ``shard_size``:
    bytes per ``.uqff`` shard (mistral.rs: 10 GiB).
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    types = parse_isq_list(isq, dev.type)
    targets = output_paths(out, types)
    topo = Topology.from_path(topology, device=dev.type) if topology is not None else None
    if shard_size <= 0:
        raise QuantbenchError(f"--shard-size must be positive, got {shard_size}")
    root = _resolve_source(src)
    if root.is_file() and (root.suffix == ".gguf" or _is_gguf(root)):
        # A GGUF is first written out as a HF directory (dequantized, tokenizer files included)
        # in a scratch folder beside the output, then quantized like any HF model; the scratch
        # folder goes away with the job, so memory stays bounded and only disk is borrowed.
        import tempfile

        from quantbench.jobs.convert import gguf_to_hf_dir

        scratch_parent = Path(out).absolute().parent
        scratch_parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".qb-gguf-src-", dir=scratch_parent) as scratch:
            gguf_to_hf_dir(root, Path(scratch) / "hf")
            return quantize_uqff(Path(scratch) / "hf", out, isq, topology=topology, organization=organization,
                                 device=device, shard_size=shard_size, slab_elements=slab_elements,
                                 progress=progress, _source_name=str(src))
    slab = slab_elements or ((1 << 24) if dev.type == "cuda" else (1 << 22))
    with SafetensorsModel(root) as model:
        shapes = {n: i.shape for n, i in model.tensors.items()}
        modules = find_modules(shapes, organization)
        if not modules:
            raise QuantbenchError(f"{root}: found no quantizable linear layers (is this a causal LM checkpoint?)")
        claimed = {s for m in modules for s in m.sources} | {m.bias for m in modules if m.bias}
        residual = [n for n in model.tensors if n not in claimed]
        base = root.parent if root.is_file() else root
        report = UqffJobReport(Path(targets[0][1]).parent, _source_name or str(src))
        total = len(modules) * len(types)
        done = 0
        with Staging() as staging:
            for t, path in targets:
                layers: list[list[Entry]] = []
                lreports: list[LayerReport] = []
                for m in modules:
                    entries, plan = _layer_entries(model, plan_layer(m, t, topo), dev, slab)
                    layers.append(entries)
                    lreports.append(LayerReport(m.key, t.label, plan.resolved.label, plan.stored, m.shape, plan.reason))
                counter = _Counter(progress, total, done)
                layers = [_tick_after(layer, counter, m.key) for layer, m in zip(layers, modules)]
                shards = write_uqff_output(path, layers, staging, max_shard_bytes=shard_size)
                done += len(modules)
                report.outputs.append(OutputReport(t.label, path, shards, lreports))
                report.files += shards
            meta = producer_metadata()
            res_entries = [Entry(n, model.info(n).dtype, model.info(n).shape, (lambda n=n: [model.read(n)]))
                           for n in sorted(residual)]
            write_safetensors_stream(staging.path(report.root / RESIDUAL_NAME), res_entries, meta)
            report.residual = sorted(residual)
            report.files.append(RESIDUAL_NAME)
            staging.path(report.root / "config.json").write_text(json.dumps(sanitize_config(model.config), indent=2) + "\n")
            report.files.append("config.json")
            for name in SIBLING_FILES:
                f = base / name
                if f.is_file():
                    staging.path(report.root / name).write_bytes(f.read_bytes())
                    report.files.append(name)
            report.seconds = time.perf_counter() - t0
            staging.path(report.root / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
            report.files.append(REPORT_NAME)
    return report


def _resolve_source(src: str | os.PathLike[str]) -> Path:
    """A local path, a packaged model alias (``smollm2``), or a hub id."""
    p = Path(src).expanduser()
    if not p.exists():
        from quantbench.sources import PACKAGED_MODELS, resolve_model

        if str(src).lower() in PACKAGED_MODELS:
            return resolve_model(str(src))
    return resolve_model_dir(src)


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


class _Counter:
    def __init__(self, progress: Progress | None, total: int, start: int):
        self.progress, self.total, self.n = progress, total, start

    def tick(self, key: str) -> None:
        self.n += 1
        if self.progress:
            self.progress(key, self.n, self.total)


def _tick_after(entries: list[Entry], counter: _Counter, key: str) -> list[Entry]:
    """Report a layer as done when its last tensor has been produced."""
    last = entries[-1]
    inner = last.produce

    def produce():
        yield from inner()
        counter.tick(key)

    return [*entries[:-1], Entry(last.name, last.dtype, last.shape, produce)]
