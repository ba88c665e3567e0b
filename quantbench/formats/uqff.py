"""UQFF 1.2: mistral.rs's quantized-weights format, read and written as mistral.rs 0.9.5 does.

What the files are (established from the bytes the ``mistralrs`` 0.9.5 wheel writes):

* One output is ``<stem>-0.uqff``, ``<stem>-1.uqff``...: plain safetensors files. Shard 0 starts
  with three U32 scalars ``uqff.version.major|minor|patch`` = 1, 2, 0; every shard's
  ``__metadata__`` carries ``uqff.producer`` and ``uqff.version`` ("1.2.0").
* Each quantized module ``<key>`` (``model.layers.0.mlp.down_proj``, ``lm_head``,
  ``model.embed_tokens``...) has ``<key>.weight.format`` (U8 scalar, the serde type below) and
  the type's own tensors, plus ``<key>.bias`` when the layer has one:

  - 0 Gguf: ``weight`` U8 ``[nbytes]`` raw GGML blocks, ``weight.dtype`` U32 (the GGML type id:
    F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q8_1 9, Q2K..Q8K 10..15, BF16 30),
    ``weight.shape`` U32 ``[out, in]`` (``[E, out, in]`` for stacked experts). Layers no GGML
    type fits are stored this way as F32 (report label ``f32``).
  - 1 Unquant: ``weight`` in its float dtype.
  - 2 Hqq: ``weight`` (packed codes), ``weight.scales``, ``weight.zeros`` (F32),
    ``weight.shape`` U32, ``weight.bits`` U8, ``weight.group_size`` U32, ``weight.axis`` U8,
    ``weight.optimization_steps`` U32 (0 = none), ``weight.round_zeros`` U8, ``weight.channel_wise`` U8.
  - 3 Fp8: ``weight`` F8_E4M3, ``weight.dequant_w_scale``/``dequant_x_scale``/``quant_scale`` F32
    scalars, ``weight.dtype`` U32 (candle dtype code, 9 = F8E4M3).
  - 4 Afq: ``weight`` U32 packed, ``weight.scales``, ``weight.biases``, ``weight.bits`` U8,
    ``weight.group_size`` U8.
  - 5 F8Q8: ``weight`` U8 ``[num_blocks*33]``, ``weight.num_blocks`` U32, ``weight.shape`` U32.
  - 6 Mxfp4: ``weight`` U8 ``[out, in/2]``, ``weight.scales`` U8 ``[out, in/32]``.

* Routed experts are one stacked module ``<prefix>.experts.{gate,up,down}_proj`` of shape
  ``[E, out, in]``.
* Beside the shards: ``residual.safetensors`` (every tensor that is not part of a quantized
  module), ``config.json`` (``quantization_config`` removed everywhere), tokenizer files,
  ``generation_config.json`` and ``uqff_report.json``.
* mistral.rs starts a new shard before a tensor that would take the current one past 10 GiB
  (and after one that reaches it); tensors are never split.

The reader checks versions as mistral.rs's ``UqffReader::open`` does: names that are all numbers
or a missing version tag mean a pre-1.0 ("legacy") UQFF file; another major version, or a newer
minor one, is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from quantbench.errors import FormatError, QuantbenchError
from quantbench.formats.atomic import atomic_output
from quantbench.formats.safetensors_dir import (
    TORCH_TO_TAG,
    Entry,
    TensorInfo,
    index_files,
    read_header,
    read_tensor,
    write_safetensors_stream,
)
from quantbench.quant.qtensor import QTensor

UQFF_VERSION = (1, 2, 0)
VERSION_KEYS = ("uqff.version.major", "uqff.version.minor", "uqff.version.patch")
MAX_UQFF_SIZE_BYTES = 10 * 1024**3  # mistral.rs MAX_UQFF_SIZE_BYTES
RESIDUAL_NAME = "residual.safetensors"
REPORT_NAME = "uqff_report.json"
SIBLING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
    "processor_config.json", "preprocessor_config.json", "special_tokens_map.json",
)


class SerdeType(IntEnum):
    """``QuantizedSerdeType``: the ``<key>.weight.format`` byte."""

    GGUF = 0
    UNQUANT = 1
    HQQ = 2
    FP8 = 3
    AFQ = 4
    F8Q8 = 5
    MXFP4 = 6


FAMILY_SERDE = {"gguf": SerdeType.GGUF, "unquant": SerdeType.UNQUANT, "hqq": SerdeType.HQQ,
                "fp8": SerdeType.FP8, "afq": SerdeType.AFQ, "f8q8": SerdeType.F8Q8, "mxfp4": SerdeType.MXFP4}

# GGML type -> UQFF ``weight.dtype`` code (equal to the GGML type id for every type it lists).
GGUF_CODES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
              "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "BF16": 30}
GGUF_BY_CODE = {v: k for k, v in GGUF_CODES.items()}
GGUF_LABELS = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0",
               "Q5_1": "q5_1", "Q8_0": "q8_0", "Q8_1": "q8_1", "Q2_K": "q2k", "Q3_K": "q3k", "Q4_K": "q4k",
               "Q5_K": "q5k", "Q6_K": "q6k", "Q8_K": "q8k"}
# candle dtype codes used by FP8's ``weight.dtype`` (mistralrs-quant utils dtype_to_uqff_code)
CANDLE_DTYPE_CODES = {"U8": 0, "U32": 1, "I32": 2, "I64": 3, "F16": 4, "BF16": 5, "F32": 6, "F64": 7,
                      "I16": 8, "F8E4M3": 9}
FLOAT_GGML = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def producer_metadata() -> dict[str, str]:
    from quantbench import __version__

    v = ".".join(map(str, UQFF_VERSION))
    return {"uqff.producer": "quantbench", "uqff.version": v, "uqff.producer.quantbench.version": __version__}


# ----------------------------------------------------------------------------------------------
# Entries (what a layer writes)


def _u8(name: str, v: int) -> Entry:
    return Entry(name, "U8", (), lambda: [bytes([int(v)])])


def _u32(name: str, v: int) -> Entry:
    return Entry(name, "U32", (), lambda: [np.uint32(v).tobytes()])


def _u32_vec(name: str, values: Sequence[int]) -> Entry:
    arr = np.asarray(values, dtype="<u4")
    return Entry(name, "U32", (len(arr),), lambda: [arr.tobytes()])


def _tensor(name: str, t: torch.Tensor) -> Entry:
    if t.dtype not in TORCH_TO_TAG:
        raise FormatError(f"{name}: dtype {t.dtype} cannot be stored in UQFF")
    return Entry(name, TORCH_TO_TAG[t.dtype], tuple(t.shape), lambda: [t])


def version_entries() -> list[Entry]:
    return [_u32(k, v) for k, v in zip(VERSION_KEYS, UQFF_VERSION)]


def gguf_layer(key: str, ggml: str, shape: Sequence[int], nbytes: int,
               weight_chunks: Callable[[], Iterable], bias: torch.Tensor | None = None) -> list[Entry]:
    """A Gguf (type 0) layer whose ``nbytes`` of GGML blocks come from ``weight_chunks``
    (called when the weight's turn comes, so a caller can quantize slab by slab)."""
    if ggml not in GGUF_CODES:
        raise FormatError(f"{key}: GGML type {ggml} has no UQFF code (UQFF knows {', '.join(GGUF_CODES)})")
    out = [
        Entry(f"{key}.weight", "U8", (nbytes,), weight_chunks),
        _u32(f"{key}.weight.dtype", GGUF_CODES[ggml]),
        _u8(f"{key}.weight.format", SerdeType.GGUF),
        _u32_vec(f"{key}.weight.shape", list(shape)),
    ]
    if bias is not None:
        out.append(_tensor(f"{key}.bias", bias.to(torch.float32)))  # mistral.rs keeps GGUF biases in F32
    return out


def unquant_layer(key: str, dtype: str, shape: Sequence[int], weight_chunks: Callable[[], Iterable],
                  bias: torch.Tensor | None = None) -> list[Entry]:
    """An Unquant (type 1) layer: the weight as is, in ``dtype`` (a safetensors tag)."""
    out = [Entry(f"{key}.weight", dtype, tuple(shape), weight_chunks), _u8(f"{key}.weight.format", SerdeType.UNQUANT)]
    if bias is not None:
        out.append(_tensor(f"{key}.bias", bias))
    return out


def qtensor_layer(key: str, family: str, q: QTensor, bias: torch.Tensor | None = None,
                  fetch: Callable[[str], torch.Tensor] | None = None) -> list[Entry]:
    """Entries for a layer in a QTensor of ``family``'s layout (``quantbench.quant.{hqq,fp8,afq,
    f8q8,mxfp4_ocp}``, or a GGML QTensor for ``gguf``).

    ``q`` may live on the ``meta`` device: header fields come from it, and each tensor's bytes
    from ``fetch(part)`` when its turn comes (default: ``q.tensors[part]``). That is how the
    quantize job writes a layer's header before quantizing it.
    """
    get = fetch or (lambda part: q.tensors[part])
    p = q.params
    w = f"{key}.weight"

    def part(name: str, qname: str, f: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Entry:
        spec = f(q.tensors[qname])
        if spec.dtype not in TORCH_TO_TAG:
            raise FormatError(f"{name}: dtype {spec.dtype} cannot be stored in UQFF")
        return Entry(name, TORCH_TO_TAG[spec.dtype], tuple(spec.shape), lambda: [f(get(qname))])

    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    scalar = lambda t: t.to(torch.float32).reshape(())  # noqa: E731
    if family == "gguf":
        data = q.tensors["data"]
        return gguf_layer(key, q.qtype, q.shape, data.numel(), lambda: [get("data")], bias)
    if family == "hqq":
        out = [
            part(w, "w_q"),
            _u8(f"{w}.axis", p["axis"]),
            _u8(f"{w}.bits", p["bits"]),
            _u8(f"{w}.channel_wise", int(p.get("channel_wise", True))),
            _u8(f"{w}.format", SerdeType.HQQ),
            _u32(f"{w}.group_size", p["group_size"]),
            _u32(f"{w}.optimization_steps", int(p.get("optimization_steps") or 0)),
            _u8(f"{w}.round_zeros", int(p.get("round_zeros", False))),
            part(f"{w}.scales", "scales", f32),
            _u32_vec(f"{w}.shape", list(q.shape)),
            part(f"{w}.zeros", "zeros", f32),
        ]
    elif family == "fp8":
        if p.get("granularity") != "mistralrs":
            raise FormatError(f"{key}: UQFF FP8 stores mistral.rs's per-tensor FP8Linear, not {p.get('granularity')!r} scales")
        out = [
            part(w, "weight"),
            part(f"{w}.dequant_w_scale", "dequant_w_scale", scalar),
            part(f"{w}.dequant_x_scale", "dequant_x_scale", scalar),
            _u32(f"{w}.dtype", CANDLE_DTYPE_CODES[p.get("dtype", "F8E4M3")]),
            _u8(f"{w}.format", SerdeType.FP8),
            part(f"{w}.quant_scale", "quant_scale", scalar),
        ]
    elif family == "afq":
        out = [
            part(w, "w_q"),
            part(f"{w}.biases", "biases"),
            _u8(f"{w}.bits", p["bits"]),
            _u8(f"{w}.format", SerdeType.AFQ),
            _u8(f"{w}.group_size", p["group_size"]),
            part(f"{w}.scales", "scales"),
        ]
    elif family == "f8q8":
        out = [
            part(w, "weight", lambda t: t.reshape(-1)),
            _u8(f"{w}.format", SerdeType.F8Q8),
            _u32(f"{w}.num_blocks", p["num_blocks"]),
            _u32_vec(f"{w}.shape", list(q.shape)),
        ]
    elif family == "mxfp4":
        out = [part(w, "blocks"), _u8(f"{w}.format", SerdeType.MXFP4), part(f"{w}.scales", "scales")]
    else:
        raise FormatError(f"{key}: no UQFF serialization for family {family!r}")
    if bias is not None:
        out.append(_tensor(f"{key}.bias", bias))
    return out


# ----------------------------------------------------------------------------------------------
# Writing shards


class Staging:
    """Temporary names for a group of output files, renamed onto the final names together at
    the end of the ``with`` block, and all removed if it fails (``atomic_output`` per file)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Staging":
        self._stack.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def path(self, final: str | os.PathLike[str]) -> Path:
        return self._stack.enter_context(atomic_output(final))


def split_shards(tensors: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """mistral.rs's rule: flush before a tensor that would overflow a non-empty shard, and right
    after a tensor that brings the shard to the cap."""
    shards: list[list[Entry]] = []
    cur: list[Entry] = []
    size = 0
    for e in tensors:
        if cur and size + e.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e.nbytes
        if size >= max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    return shards


def write_uqff_output(
    output: str | os.PathLike[str],
    layers: Sequence[Sequence[Entry]],
    staging: Staging,
    *,
    max_shard_bytes: int = MAX_UQFF_SIZE_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write one output ``<dir>/<stem>.uqff`` as ``<stem>-N.uqff`` shards (staged); returns the
    shard file names. ``layers`` must come sorted by module key (mistral.rs's order); inside a
    layer the tensors keep their order, so one layer's producers run back to back."""
    out = Path(output)
    if out.suffix != ".uqff":
        raise QuantbenchError(f"{out}: a UQFF output path must end in .uqff")
    stream = version_entries() + [e for layer in layers for e in layer]
    names = [e.name for e in stream]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise FormatError(f"{out}: duplicate UQFF tensor key {dup!r}")
    meta = metadata or producer_metadata()
    shard_names = []
    for i, shard in enumerate(split_shards(stream, max_shard_bytes)):
        name = f"{out.stem}-{i}.uqff"
        write_safetensors_stream(staging.path(out.parent / name), shard, meta)
        shard_names.append(name)
    return shard_names


def sanitize_config(config: dict) -> dict:
    """``config.json`` without any ``quantization_config`` (at any depth), like mistral.rs."""

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "quantization_config"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(config)


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class UqffLayer:
    """One quantized module in a UQFF output."""

    key: str
    serde: SerdeType
    label: str  # mistral.rs's stored label: q4k, f32, unquant, hqq4, fp8, afq6, f8q8, mxfp4
    shape: tuple[int, ...]
    tensors: dict[str, TensorInfo] = field(repr=False, default_factory=dict)  # suffix -> info

    @property
    def family(self) -> str:
        """``gguf``, ``unquant``, ``hqq``, ``fp8``, ``afq``, ``f8q8`` or ``mxfp4``."""
        return {v: k for k, v in FAMILY_SERDE.items()}[self.serde]


_LEGACY_HINT = "regenerate it with `mistralrs quantize` or `quantbench quantize`"


def resolve_shards(path: str | os.PathLike[str]) -> list[Path]:
    """The shard files of one UQFF output named by ``path``: a shard (``q4k-0.uqff`` -> all of
    ``q4k-<i>.uqff`` present from 0 on), the output name (``q4k.uqff``), or a directory holding a
    single output (``uqff_report.json`` decides when present)."""
    p = Path(path)
    if p.is_dir():
        report = p / REPORT_NAME
        if report.is_file():
            try:
                outputs = json.loads(report.read_text())["outputs"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{report}: not a UQFF report ({e})") from None
            if len(outputs) != 1:
                quants = ", ".join(o.get("quant", "?") for o in outputs)
                raise FormatError(f"{p}: holds {len(outputs)} UQFF outputs ({quants}); name one, e.g. {p}/{outputs[0].get('quant')}.uqff")
            shards = [p / s for s in outputs[0]["shards"]]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise FormatError(f"{report}: lists shard(s) that are missing: {', '.join(missing)}")
            return shards
        firsts = sorted(p.glob("*-0.uqff"))
        if len(firsts) != 1:
            raise FormatError(f"{p}: expected one UQFF output (*-0.uqff), found {len(firsts)}")
        p = firsts[0]
    m = re.match(r"^(?P<stem>.+)-(?P<idx>\d+)\.uqff$", p.name)
    stem = m.group("stem") if m else p.stem
    if not m and p.is_file():
        return [p]  # a single unindexed .uqff file
    shards = []
    i = 0
    while (p.parent / f"{stem}-{i}.uqff").is_file():
        shards.append(p.parent / f"{stem}-{i}.uqff")
        i += 1
    if not shards:
        raise FormatError(f"{path}: no UQFF file (looked for {p.parent / (stem + '-0.uqff')})")
    return shards


class UqffFile:
    """One UQFF output opened lazily: headers parsed, versions checked, layers indexed."""

    def __init__(self, path: str | os.PathLike[str]):
        self.shards = resolve_shards(path)
        self.tensors = index_files(self.shards)  # duplicate keys across shards -> FormatError
        self.metadata = read_header(self.shards[0])[1]
        self.version = self._check_version()
        self.layers = self._index_layers()
        self._fds: dict[Path, int] = {}

    @property
    def root(self) -> Path:
        return self.shards[0].parent

    def _check_version(self) -> tuple[int, int, int]:
        names = list(self.tensors)
        where = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} (+{len(self.shards) - 1} shards)"
        if names and all(n.isdigit() for n in names):
            raise FormatError(f"{where}: legacy UQFF (pre-1.0, numbered tensors) is not supported; {_LEGACY_HINT}")
        if VERSION_KEYS[0] not in self.tensors:
            raise FormatError(f"{where}: legacy UQFF: no uqff.version tag (a pre-1.0 file); {_LEGACY_HINT}")
        ver = []
        for k in VERSION_KEYS:
            info = self.tensors.get(k)
            if info is None or info.dtype != "U32" or info.shape != ():
                raise FormatError(f"{where}: UQFF version tensor {k} must be a scalar U32")
            ver.append(int(read_tensor(info).item()))
        major, minor, patch = ver
        ours = ".".join(map(str, UQFF_VERSION))
        if major != UQFF_VERSION[0]:
            raise FormatError(f"{where}: UQFF version {major}.{minor}.{patch} is incompatible with this reader ({ours}); {_LEGACY_HINT}")
        if minor > UQFF_VERSION[1]:
            raise FormatError(f"{where}: UQFF version {major}.{minor}.{patch} is newer than this reader ({ours}); upgrade quantbench")
        return major, minor, patch

    def _index_layers(self) -> dict[str, UqffLayer]:
        layers: dict[str, UqffLayer] = {}
        for name in self.tensors:
            if not name.endswith(".weight.format"):
                continue
            key = name[: -len(".weight.format")]
            suffixes = {n[len(key) + 1:]: info for n, info in self.tensors.items()
                        if n.startswith(key + ".") and (n[len(key) + 1:] in ("weight", "bias") or n[len(key) + 1:].startswith("weight."))}
            fmt = self._scalar(name)
            try:
                serde = SerdeType(fmt)
            except ValueError:
                raise FormatError(f"{self.shards[0]}: layer {key}: unknown UQFF format byte {fmt}") from None
            if "weight" not in suffixes:
                raise FormatError(f"{self.shards[0]}: layer {key} has a format byte but no {key}.weight")
            label, shape = self._describe(key, serde, suffixes)
            layers[key] = UqffLayer(key, serde, label, shape, suffixes)
        return dict(sorted(layers.items()))

    def _scalar(self, name: str) -> int:
        return int(read_tensor(self.tensors[name]).reshape(()).item())

    def _vec(self, name: str) -> tuple[int, ...]:
        return tuple(int(v) for v in read_tensor(self.tensors[name]).reshape(-1).tolist())

    def _need(self, key: str, suffixes: dict, *names: str) -> None:
        missing = [n for n in names if n not in suffixes]
        if missing:
            raise FormatError(f"{self.shards[0]}: layer {key} lacks {', '.join(key + '.' + n for n in missing)}")

    def _describe(self, key: str, serde: SerdeType, s: dict[str, TensorInfo]) -> tuple[str, tuple[int, ...]]:
        w = s["weight"]
        if serde == SerdeType.GGUF:
            self._need(key, s, "weight.dtype", "weight.shape")
            code = self._scalar(f"{key}.weight.dtype")
            if code not in GGUF_BY_CODE:
                raise FormatError(f"{self.shards[0]}: layer {key}: unknown GGML dtype code {code}")
            shape = self._vec(f"{key}.weight.shape")
            ggml = GGUF_BY_CODE[code]
            from quantbench.quant.registry import get_type

            t = get_type(ggml)
            numel = int(np.prod(shape))
            if not shape or shape[-1] % t.block_size or numel // t.block_size * t.type_size != w.nbytes:
                raise FormatError(f"{self.shards[0]}: layer {key}: {w.nbytes} bytes do not hold a {ggml} tensor of shape {list(shape)}")
            return GGUF_LABELS[ggml], shape
        if serde == SerdeType.UNQUANT:
            return "unquant", w.shape
        if serde == SerdeType.HQQ:
            self._need(key, s, "weight.scales", "weight.zeros", "weight.shape", "weight.bits", "weight.group_size",
                       "weight.axis", "weight.optimization_steps", "weight.round_zeros", "weight.channel_wise")
            return f"hqq{self._scalar(f'{key}.weight.bits')}", self._vec(f"{key}.weight.shape")
        if serde == SerdeType.FP8:
            self._need(key, s, "weight.dequant_w_scale", "weight.dequant_x_scale", "weight.quant_scale", "weight.dtype")
            return "fp8", w.shape
        if serde == SerdeType.AFQ:
            self._need(key, s, "weight.scales", "weight.biases", "weight.bits", "weight.group_size")
            bits = self._scalar(f"{key}.weight.bits")
            return f"afq{bits}", (*w.shape[:-1], w.shape[-1] * 32 // bits)
        if serde == SerdeType.F8Q8:
            self._need(key, s, "weight.num_blocks", "weight.shape")
            return "f8q8", self._vec(f"{key}.weight.shape")
        self._need(key, s, "weight.scales")
        return "mxfp4", (*w.shape[:-1], w.shape[-1] * 2)

    def _read(self, info: TensorInfo) -> torch.Tensor:
        if info.path not in self._fds:
            self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        return read_tensor(info, self._fds[info.path])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "UqffFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_layer(self, key: str) -> tuple[QTensor | torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of one module: a QTensor in quantbench's layout for quantized types,
        a float tensor for Unquant and float GGUF storage."""
        if key not in self.layers:
            raise FormatError(f"{self.shards[0]}: no UQFF layer {key!r}")
        L = self.layers[key]
        s = L.tensors
        rd = lambda suffix: self._read(s[suffix])  # noqa: E731
        sc = lambda suffix: self._scalar(f"{key}.{suffix}")  # noqa: E731
        bias = rd("bias") if "bias" in s else None
        if L.serde == SerdeType.GGUF:
            ggml = GGUF_BY_CODE[sc("weight.dtype")]
            raw = rd("weight")
            if ggml in FLOAT_GGML:
                return raw.view(FLOAT_GGML[ggml]).reshape(L.shape), bias
            from quantbench.quant.registry import get_type

            t = get_type(ggml)
            rows = int(np.prod(L.shape[:-1])) if len(L.shape) > 1 else 1
            return QTensor(t.name, L.shape, {"data": raw.reshape(rows, t.row_bytes(L.shape[-1]))}), bias
        if L.serde == SerdeType.UNQUANT:
            return rd("weight"), bias
        if L.serde == SerdeType.HQQ:
            params = {"bits": sc("weight.bits"), "group_size": sc("weight.group_size"), "axis": sc("weight.axis"),
                      "optimization_steps": sc("weight.optimization_steps"), "round_zeros": bool(sc("weight.round_zeros")),
                      "channel_wise": bool(sc("weight.channel_wise"))}
            tensors = {"w_q": rd("weight"), "scales": rd("weight.scales"), "zeros": rd("weight.zeros")}
            return QTensor(_qtype("hqq", params), L.shape, tensors, params), bias
        if L.serde == SerdeType.FP8:
            code = sc("weight.dtype")
            params = {"granularity": "mistralrs", "dtype": {v: k for k, v in CANDLE_DTYPE_CODES.items()}.get(code, str(code))}
            tensors = {k: rd(f"weight{'.' + k if k != 'weight' else ''}")
                       for k in ("weight", "dequant_w_scale", "dequant_x_scale", "quant_scale")}
            return QTensor(_qtype("fp8", params), L.shape, tensors, params), bias
        if L.serde == SerdeType.AFQ:
            params = {"bits": sc("weight.bits"), "group_size": sc("weight.group_size")}
            tensors = {"w_q": rd("weight"), "scales": rd("weight.scales"), "biases": rd("weight.biases")}
            return QTensor(_qtype("afq", params), L.shape, tensors, params), bias
        if L.serde == SerdeType.F8Q8:
            params = {"num_blocks": sc("weight.num_blocks")}
            return QTensor(_qtype("f8q8", params), L.shape, {"weight": rd("weight")}, params), bias
        params = {"rule": "mistralrs", "block_size": 32}
        tensors = {"blocks": rd("weight"), "scales": rd("weight.scales")}
        return QTensor(_qtype("mxfp4", params), L.shape, tensors, params), bias

    def layer_tensor_names(self) -> set[str]:
        return {f"{k}.{s}" for k, L in self.layers.items() for s in L.tensors}


def _qtype(family: str, params: dict) -> str:
    """quantbench's scheme name (``quantbench.quant.schemes``) for a non-GGML UQFF layer, so
    ``quantbench.quant.dequantize`` and the engine can run it."""
    if family == "hqq":
        return f"HQQ{params['bits']}"
    if family == "afq":
        gs = params["group_size"]
        return f"AFQ{params['bits']}" if gs == 64 else f"AFQ{params['bits']}_G{gs}"
    if family == "mxfp4":
        return "MXFP4_ISQ"  # decoding does not depend on how the scales were chosen
    return family.upper()  # FP8, F8Q8


def read_report(root: str | os.PathLike[str]) -> dict | None:
    p = Path(root) / REPORT_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None
