"""``quantbench convert SRC -o DST``: between HF safetensors directories, GGUF files and UQFF.

Kinds are told apart by the path: ``*.gguf`` is GGUF, ``*.uqff`` (or a folder holding one UQFF
output) is UQFF, anything else is a HF model directory (or hub id). Supported:

* GGUF → HF dir: dequantized tensors under HF names (Q/K un-permuted, Gemma norms un-shifted,
  experts per expert), ``config.json``, ``generation_config.json``, tokenizer files.
* HF dir → GGUF: as llama.cpp's ``convert_hf_to_gguf.py`` (``quantbench.formats.hf_to_gguf``).
* HF dir / GGUF → UQFF: ``quantbench.jobs.quantize_uqff`` (needs ``isq``).
* UQFF → HF dir: every layer dequantized, plus the residual tensors and sibling files.
* HF dir → HF dir: re-cast (``dtype``) and re-shard.

Everything streams one tensor at a time and appears under ``dst`` only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from quantbench.errors import FormatError, InputValueError, QuantbenchError
from quantbench.formats.safetensors_dir import TORCH_TO_TAG, Entry, SafetensorsModel, write_model_dir

FLOAT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
DEFAULT_SHARD = 5 * 2**30  # transformers' save_pretrained default max_shard_size "5GB"-ish
Progress = Callable[[str, int, int], None]


@dataclass
class ConvertReport:
    src: str
    dst: Path
    src_kind: str
    dst_kind: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    dtype: str | None = None

    def to_json(self) -> dict:
        return {"src": self.src, "dst": str(self.dst), "from": self.src_kind, "to": self.dst_kind,
                "files": self.files, "tensors": self.tensors, "dtype": self.dtype}


def kind_of(path: str | os.PathLike[str], *, output: bool = False) -> str:
    """``gguf``, ``uqff`` or ``hf`` for a source or destination path."""
    p = Path(path)
    if p.suffix == ".gguf":
        return "gguf"
    if p.suffix == ".uqff":
        return "uqff"
    if not output and p.is_dir() and any(p.glob("*-0.uqff")) and not (p / "model.safetensors").exists() \
            and not any(p.glob("model-*.safetensors")):
        return "uqff"
    if not output and p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
    return "hf"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory beside ``path``, renamed onto it when the block succeeds and removed
    when it fails. ``path`` must not exist yet (or be an empty directory)."""
    final = Path(path)
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        raise QuantbenchError(f"{final}: already exists; choose a new output directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rmdir()
    os.replace(tmp, final)


def _dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in FLOAT_DTYPES:
        raise InputValueError(f"--dtype {dtype!r}: choose f32, bf16 or f16")
    return FLOAT_DTYPES[dtype]


def _finite(name: str, t: torch.Tensor, origin: str) -> torch.Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InputValueError(f"{origin}: tensor {name} contains NaN or inf values")
    return t


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str | None = None, *,
            isq: Sequence[str] | str | None = None, shard_size: int = DEFAULT_SHARD,
            model_dir: str | os.PathLike[str] | None = None, device: str = "cpu",
            progress: Progress | None = None) -> ConvertReport:
    """Convert ``src`` into ``dst`` (kinds from the paths; see the module docstring).

    ``dtype``: float type of a HF-dir or GGUF output (``f32``/``bf16``/``f16``; default: the
    source's, or for GGUF outputs llama.cpp's ``auto``). ``isq``: ISQ type(s) for a UQFF output.
    ``model_dir``: the model directory that goes with a UQFF source when its ``config.json`` and
    ``residual.safetensors`` are not beside it.
    """
    from quantbench.sources import resolve_model

    # a UQFF output is named by its stem (``q4k.uqff`` for ``q4k-0.uqff``...), which need not exist
    s_kind = kind_of(src) if Path(src).exists() or Path(src).suffix == ".uqff" else None
    if s_kind is None:
        try:
            src_path = resolve_model(str(src))  # packaged aliases (smollm2)
        except QuantbenchError:
            from quantbench.formats.safetensors_dir import resolve_model_dir

            src_path = resolve_model_dir(src)  # hub ids
        s_kind = kind_of(src_path)
    else:
        src_path = Path(src)
    d_kind = kind_of(dst, output=True)
    dt = _dtype(dtype)
    if shard_size <= 0:
        raise InputValueError(f"shard size must be positive, got {shard_size}")
    if d_kind == "uqff":
        if not isq:
            raise InputValueError(f"{dst}: a UQFF output needs --isq (e.g. q4k or q8_0)")
        from quantbench.jobs.quantize_uqff import quantize_uqff

        r = quantize_uqff(src_path, dst, isq, device=device, progress=progress)
        return ConvertReport(str(src), Path(dst), s_kind, "uqff", r.files, sum(len(o.layers) for o in r.outputs))
    if isq:
        raise InputValueError("--isq applies only to UQFF outputs (DST ending in .uqff)")
    if s_kind == "gguf" and d_kind == "hf":
        return gguf_to_hf_dir(src_path, dst, dtype, shard_size=shard_size, progress=progress)
    if s_kind == "hf" and d_kind == "gguf":
        from quantbench.formats.hf_to_gguf import convert_hf_to_gguf

        n = convert_hf_to_gguf(src_path, dst, outtype=dtype or "auto", progress=progress)
        return ConvertReport(str(src), Path(dst), "hf", "gguf", [Path(dst).name], n, dtype or "auto")
    if s_kind == "uqff" and d_kind == "hf":
        return uqff_to_hf_dir(src_path, dst, dt, model_dir=model_dir, shard_size=shard_size, progress=progress)
    if s_kind == "hf" and d_kind == "hf":
        return hf_to_hf_dir(src_path, dst, dt, shard_size=shard_size, progress=progress)
    hint = {("gguf", "gguf"): "use `quantbench quantize` to change GGML types",
            ("uqff", "gguf"): "convert the UQFF to a HF directory first, then that to GGUF"}.get((s_kind, d_kind), "")
    raise InputValueError(f"cannot convert {s_kind} ({src}) to {d_kind} ({dst})" + (f": {hint}" if hint else ""))


# ---------------------------------------------------------------------------------------------


def _entries(plan: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]], dt: torch.dtype,
             origin: str, progress: Progress | None) -> list[Entry]:
    total = len(plan)

    def entry(i: int, name: str, shape: tuple[int, ...], load: Callable[[], torch.Tensor]) -> Entry:
        def produce():
            t = _finite(name, load(), origin).to(dt).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise FormatError(f"{origin}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
            yield t
            if progress:
                progress(name, i + 1, total)

        return Entry(name, TORCH_TO_TAG[dt], tuple(shape), produce)

    return [entry(i, n, s, f) for i, (n, s, f) in enumerate(plan)]


def _json(d: dict) -> bytes:
    return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()


def gguf_to_hf_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str | None = None, *,
                   shard_size: int = DEFAULT_SHARD, progress: Progress | None = None) -> ConvertReport:
    """A GGUF file → a HF model directory transformers, mistral.rs and the engine load."""
    from quantbench.formats.gguf import read_gguf
    from quantbench.formats.gguf_source import (
        TORCH_DTYPE_NAMES, default_dtype, generation_config_from_gguf, hf_config_from_gguf, hf_tensor_plan,
        write_tokenizer_files,
    )

    gf = read_gguf(src)
    dt = _dtype(dtype) or default_dtype(gf)
    config = hf_config_from_gguf(gf, {v: k for k, v in FLOAT_DTYPES.items()}[dt])
    plan = [(h.name, h.shape, h.load) for h in hf_tensor_plan(gf, per_expert=True)]
    entries = _entries(plan, dt, str(gf.path), progress)
    with atomic_dir(dst) as tmp:
        files = write_tokenizer_files(gf, tmp)
        extra = {"config.json": _json(config), "generation_config.json": _json(generation_config_from_gguf(gf))}
        written = write_model_dir(tmp, entries, max_shard_bytes=shard_size, extra_files=extra)
    names = sorted({p.name for p in written} | {p.name for p in files})
    return ConvertReport(str(src), Path(dst), "gguf", "hf", names, len(entries), TORCH_DTYPE_NAMES[dt])


def _copy_siblings(src_dir: Path, tmp: Path, skip: set[str]) -> list[str]:
    from quantbench.formats.uqff import SIBLING_FILES

    out = []
    for name in SIBLING_FILES + ("tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json"):
        f = src_dir / name
        if f.is_file() and name not in skip:
            shutil.copyfile(f, tmp / name)
            out.append(name)
    return out


def _split_experts(name: str, t: torch.Tensor, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """An engine/UQFF ``[E, out, in]`` stack → HF's per-expert tensors."""
    from quantbench.formats.gguf_source import EXPERT_NAMES

    if ".experts." in name and t.dim() == 3:
        prefix, proj = name.rsplit(".experts.", 1)
        which = proj.removesuffix(".weight")
        alias = EXPERT_NAMES.get(arch, EXPERT_NAMES["qwen3_moe"]).get(which, which)
        for e in range(t.shape[0]):
            yield f"{prefix}.experts.{e}.{alias}.weight", t[e]
        return
    yield name, t


def uqff_to_hf_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str], dt: torch.dtype | None, *,
                   model_dir: str | os.PathLike[str] | None = None, shard_size: int = DEFAULT_SHARD,
                   progress: Progress | None = None) -> ConvertReport:
    """A UQFF output (+ residual and config) → a dequantized HF model directory."""
    from quantbench.engine.uqff_source import uqff_items, uqff_model_dir
    from quantbench.formats.safetensors_dir import DTYPES, read_header
    from quantbench.formats.uqff import RESIDUAL_NAME, UqffFile
    from quantbench.quant import dequantize
    from quantbench.quant.qtensor import QTensor

    config, _ = _peek_config(src, model_dir)
    arch = str(config.get("model_type", ""))
    out_dt = dt or DTYPES.get(_config_dtype(config), (torch.float32, 4))[0]
    # headers only: names and shapes of every output tensor, before anything is dequantized
    with UqffFile(src) as uq:
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for key, L in uq.layers.items():
            shp = tuple(L.shape)
            if ".experts." in key and len(shp) == 3:
                shapes += [(n, shp[1:]) for n, _ in _split_experts(key + ".weight", torch.empty(shp, device="meta"), arch)]
            else:
                shapes.append((f"{key}.weight", shp))
            if "bias" in L.tensors:
                shapes.append((f"{key}.bias", tuple(L.tensors["bias"].shape)))
    base = uqff_model_dir(src, model_dir)
    residual = next((d / RESIDUAL_NAME for d in (Path(src).parent if not Path(src).is_dir() else Path(src), base)
                     if (d / RESIDUAL_NAME).is_file()), None)
    if residual is not None:
        infos, _ = read_header(residual)
        have = {n for n, _ in shapes}
        shapes += [(n, i.shape) for n, i in infos.items() if n not in have]
    _, items = uqff_items(src, model_dir)

    def values() -> Iterator[tuple[str, torch.Tensor]]:
        for name, v in items:
            t = dequantize(v) if isinstance(v, QTensor) else v
            yield from _split_experts(name, t, arch)

    stream = values()
    order = [n for n, _ in shapes]
    got: dict[str, torch.Tensor] = {}

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            # items come in the order `shapes` lists them; buffer only what arrives early (expert splits)
            while name not in got:
                try:
                    n, t = next(stream)
                except StopIteration:
                    raise FormatError(f"{src}: tensor {name} was announced but never produced") from None
                got[n] = t
            return got.pop(name)

        return load

    plan = [(n, s, loader(n)) for n, s in shapes]
    entries = _entries(plan, out_dt, str(src), progress)
    cfg = dict(config, torch_dtype={v: k for k, v in {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                                        "float16": torch.float16}.items()}[out_dt])
    with atomic_dir(dst) as tmp:
        files = _copy_siblings(base, tmp, {"config.json"})
        written = write_model_dir(tmp, entries, max_shard_bytes=shard_size, extra_files={"config.json": _json(cfg)})
    if len(order) != len(set(order)):
        raise FormatError(f"{src}: duplicate tensor names in the UQFF and its residual")
    return ConvertReport(str(src), Path(dst), "uqff", "hf", sorted({p.name for p in written} | set(files)),
                         len(entries), cfg["torch_dtype"])


def _peek_config(src, model_dir) -> tuple[dict, Path]:
    from quantbench.engine.uqff_source import read_config, uqff_model_dir

    base = uqff_model_dir(src, model_dir)
    return read_config(base, src), base


def _config_dtype(config: dict) -> str:
    name = str(config.get("torch_dtype", config.get("dtype", "float32")))
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(name, "F32")


def hf_to_hf_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str], dt: torch.dtype | None, *,
                 shard_size: int = DEFAULT_SHARD, progress: Progress | None = None) -> ConvertReport:
    """Re-cast float tensors to ``dt`` and re-shard; integer tensors and sibling files are copied."""
    with SafetensorsModel(src) as m:
        plan_entries: list[Entry] = []
        names = m.names()
        for i, name in enumerate(names):
            info = m.info(name)
            src_dt = info.torch_dtype
            out_dt = dt if (dt is not None and src_dt.is_floating_point) else src_dt

            def produce(name=name, out_dt=out_dt, i=i):
                yield _finite(name, m.read(name), str(m.root)).to(out_dt)
                if progress:
                    progress(name, i + 1, len(names))

            plan_entries.append(Entry(name, TORCH_TO_TAG[out_dt], tuple(info.shape), produce))
        cfg = dict(m.config)
        if dt is not None:
            cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]
        with atomic_dir(dst) as tmp:
            files = _copy_siblings(m.root, tmp, {"config.json"})
            written = write_model_dir(tmp, plan_entries, max_shard_bytes=shard_size,
                                      extra_files={"config.json": _json(cfg)})
    return ConvertReport(str(src), Path(dst), "hf", "hf", sorted({p.name for p in written} | set(files)),
                         len(plan_entries), cfg.get("torch_dtype"))
