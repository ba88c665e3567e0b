"""Native quantized checkpoint layouts: which one a model dir uses, reading it, writing one.

Why a dispatcher: bitsandbytes, MLX, FP8 (DeepSeek-V3 / transformers FineGrainedFP8 and
compressed-tensors) and gpt-oss MXFP4 checkpoints are all "a HF directory whose config names a
quantization method and whose linear weights are split into several named tensors". They differ
only in those names, dtypes and config fields, which each ``*_layout`` module describes; the
streaming, sharding, config and tokenizer handling is shared here.

Reading: :func:`read_checkpoint_items` yields ``(hf_name, tensor_or_QTensor)`` one weight at a
time (a quantized weight together with its scales), under the float checkpoint's names, so the
engine places them like float weights and runs the QTensors through ``QLinear``.

Writing: :func:`write_quantized_checkpoint` streams the source one tensor at a time through the
scheme. A safetensors header must list every tensor before the data, and some encoded sizes are
only known after quantizing (bnb's quant_state JSON holds a float), so each encoded tensor is
spilled to a scratch file beside the output first and copied into the shards at the end: peak
memory is one source tensor, extra disk is the size of the quantized model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from quantbench.errors import FormatError, QuantbenchError, UnknownTypeError
from quantbench.quant.qtensor import QTensor

Item = tuple[str, "torch.Tensor | QTensor"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Names of tensors that belong to embeddings rather than linear layers (transformers quantizes
# only nn.Linear; MLX quantizes embeddings too).
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_positions)\.weight$")
_OUTPUT = re.compile(r"(^|\.)(lm_head|output|embed_out)\.weight$")


# --- helpers shared by the layout modules -------------------------------------------------


def module_of(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return name.rsplit(".", 1)[0] if "." in name else name


def is_embedding(name: str) -> bool:
    return bool(_EMBEDDING.search(name))


def is_output_head(name: str) -> bool:
    return bool(_OUTPUT.search(name))


def is_linear_weight(name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
    """A 2-D floating ``*.weight`` that is not an embedding table: a linear layer's weight.

    HF checkpoints do not say which module a tensor belongs to; in every decoder family the
    engine supports, 2-D float ``.weight`` tensors are linear layers or embeddings (norms are
    1-D, convolutions 3-D+).
    """
    return name.endswith(".weight") and len(shape) == 2 and dtype.is_floating_point and not is_embedding(name)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name``'s module is one of ``patterns`` (exact module names or ``fnmatch``-style
    globs, as transformers' ``modules_to_not_convert``: a pattern also matches its children)."""
    import fnmatch

    mod = module_of(name)
    for p in patterns:
        if mod == p or mod.startswith(p + ".") or fnmatch.fnmatchcase(mod, p) or fnmatch.fnmatchcase(mod, p + ".*"):
            return True
        if re.search(rf"(^|\.){re.escape(p)}($|\.)", mod):
            return True
    return False


def json_tensor(d: dict) -> torch.Tensor:
    """bitsandbytes' ``pack_dict_to_tensor``: ``json.dumps`` (default separators) as uint8."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def tensor_json(t: torch.Tensor, where: str) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: not a JSON-encoded uint8 tensor ({e})") from None


@dataclass
class Group:
    """A primary tensor with its sibling tensors, read from a checkpoint (for error messages:
    ``where(name)`` is ``"<shard file>: tensor <name>"``)."""

    st: Any  # SafetensorsModel

    def has(self, name: str) -> bool:
        return name in self.st.tensors

    def where(self, name: str) -> str:
        info = self.st.tensors.get(name)
        f = info.path if info is not None else self.st.root
        return f"{f}: tensor {name}"

    def get(self, name: str, *, needed_by: str | None = None) -> torch.Tensor:
        if name not in self.st.tensors:
            who = needed_by or name
            raise FormatError(f"{self.where(who)} has no companion tensor {name} (its scales/state are missing)")
        return self.st.read(name)


# --- layouts ---------------------------------------------------------------------------------


def layouts() -> dict[str, Any]:
    """Layout name → layout object (imported lazily: the layout modules import this one)."""
    from quantbench.formats import bnb_layout, fp8_layout, mlx_layout, mxfp4_layout

    return {
        "bnb": bnb_layout.LAYOUT,
        "mlx": mlx_layout.LAYOUT,
        "fp8": fp8_layout.BLOCK_LAYOUT,
        "compressed-tensors": fp8_layout.CT_LAYOUT,
        "mxfp4": mxfp4_layout.LAYOUT,
    }


def get_layout(name: str) -> Any:
    table = layouts()
    if name not in table:
        raise UnknownTypeError(f"unknown checkpoint layout {name!r}; known: {', '.join(table)}")
    return table[name]


def default_layout(scheme: str, src_config: dict | None = None) -> str:
    """The layout a scheme's checkpoints are written in when ``--format`` does not say."""
    s = scheme.upper()
    if src_config and src_config.get("model_type") == "gpt_oss" and s.startswith("MXFP4"):
        return "mxfp4"
    for name, lay in layouts().items():
        if s in lay.schemes:
            return name
    raise UnknownTypeError(f"scheme {scheme!r} has no native checkpoint layout (write UQFF or GGUF instead)")


def detect_layout(config: dict, origin: str) -> str | None:
    """Which layout ``config.json`` says its weights use; ``None`` for a float checkpoint.

    An MLX config names ``quantization`` (mlx-lm also copies it to ``quantization_config``
    without a ``quant_method``); everything else names ``quantization_config.quant_method``.
    """
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if "quantization" in config:
        return "mlx"
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise FormatError(f"{origin}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method is None and "bits" in qc and "group_size" in qc:
        return "mlx"
    for name, lay in layouts().items():
        if method in lay.quant_methods:
            return name
    known = sorted({m for lay in layouts().values() for m in lay.quant_methods})
    raise FormatError(f"{origin}: quantization_config.quant_method {method!r} is not supported (supported: {', '.join(known)})")


def quantization_config(config: dict) -> dict:
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc or {}


# --- reading ---------------------------------------------------------------------------------


def read_checkpoint_items(path: str | os.PathLike[str]) -> Iterator[Item]:
    """``(hf_name, tensor or QTensor)`` for every weight of a HF-layout dir, quantized or not.

    Quantized weights come out under the float checkpoint's name (``...q_proj.weight``) as a
    QTensor of the matching scheme, with their scales consumed; other tensors pass through.
    """
    from quantbench.formats.safetensors_dir import SafetensorsModel

    from quantbench.formats.safetensors_dir import read_config

    root = Path(path)
    cfg_path = root / "config.json"
    cfg = read_config(root)
    name = detect_layout(cfg, str(cfg_path))
    with SafetensorsModel(root) as st:
        if name is None:
            yield from iter(st)
            return
        yield from get_layout(name).read(st, cfg, str(cfg_path))


# --- writing ---------------------------------------------------------------------------------


class _Spill:
    """Append-only scratch file of encoded tensors, read back into the shards."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".quantbench-spill-", dir=directory)
        self.fd, self.path, self.size = fd, Path(name), 0

    def put(self, t: torch.Tensor) -> tuple[int, int]:
        c = t.detach().contiguous().cpu()
        raw = c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b""
        off = self.size
        os.pwrite(self.fd, raw, off)
        self.size += len(raw)
        return off, len(raw)

    def chunks(self, off: int, n: int, step: int = 64 * 2**20) -> Iterator[bytes]:
        done = 0
        while done < n:
            b = os.pread(self.fd, min(step, n - done), off + done)
            if not b:
                raise FormatError(f"{self.path}: scratch file ended early")
            done += len(b)
            yield b

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def _source(src: str | os.PathLike[str] | Iterable[Item],
            config: dict | None) -> tuple[Iterable[Item], dict, Path | None, str | None]:
    """Items, float config (quantization keys removed), source dir, and the source's layout."""
    if isinstance(src, (str, os.PathLike)):
        from quantbench.formats.safetensors_dir import read_config

        root = Path(src)
        cfg_path = root / "config.json"
        disk = read_config(root)
        src_layout = detect_layout(disk, str(cfg_path))
        items: Iterable[Item] = read_checkpoint_items(root)
        cfg = config if config is not None else disk
    else:
        if config is None:
            raise QuantbenchError("write_quantized_checkpoint: a config dict is needed when the source is a list of tensors")
        items, cfg, root, src_layout = src, config, None, None
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config")}
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k != "quantization_config"}
    return items, cfg, root, src_layout


def _float_of(name: str, t: torch.Tensor | QTensor, src_layout: str | None) -> torch.Tensor:
    """A source tensor as float; a quantized source is dequantized (gpt-oss expert blocks are
    stored transposed to transformers' parameter, see :mod:`mxfp4_layout`, and turned back)."""
    if not isinstance(t, QTensor):
        return t
    from quantbench.quant.registry import dequantize

    w = dequantize(t)
    if src_layout == "mxfp4" and t.qtype.startswith("MXFP4"):
        w = w.transpose(-1, -2).contiguous()
    return w


def write_quantized_checkpoint(
    src: str | os.PathLike[str] | Iterable[Item],
    out_dir: str | os.PathLike[str],
    scheme: str,
    *,
    layout: str | None = None,
    config: dict | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    skip: Sequence[str] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: str | torch.device = "cpu",
    progress: Callable[[str, str], None] | None = None,
    options: dict | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Quantize a HF model to ``scheme`` and write it in a native layout under ``out_dir``.

    ``src`` is a HF model dir (float, or quantized in a layout we read — it is dequantized
    first) or an iterable of ``(hf_name, tensor)`` with ``config`` given. ``layout`` defaults to
    the scheme's (:func:`default_layout`); ``skip`` lists module names/globs kept in float
    (recorded in the config the way the layout's loader expects). ``options`` are layout
    settings (e.g. bnb's ``compute_dtype``). Tokenizer and generation files are copied from
    the source dir (or ``tokenizer_dir``). Every output file appears at once at the end.

    An ``out_dir`` that already holds safetensors weights is refused unless ``overwrite``; then
    weight files of the old checkpoint that the new one does not reuse are removed after the new
    files are in place (a stale index or shard would otherwise be picked up by loaders).

    Returns the paths written. ``progress(name, action)`` is called per source tensor.
    """
    from quantbench.formats.safetensors_dir import Entry, TORCH_TO_TAG, write_model_dir
    from quantbench.quant import schemes as sch

    sc = sch.get_scheme(scheme)
    items, cfg, root, src_layout = _source(src, config)
    lname = layout or default_layout(sc.name, cfg)
    lay = get_layout(lname)
    if sc.name not in lay.schemes:
        raise UnknownTypeError(f"the {lname} layout cannot hold {sc.name}; it holds {', '.join(sorted(lay.schemes))}")
    writer = lay.writer(sc.name, cfg, list(skip), dict(options or {}))
    out = Path(out_dir)
    stale = sorted(out.glob("*.safetensors")) + sorted(out.glob("*.safetensors.index.json")) if out.is_dir() else []
    if stale and not overwrite:
        raise QuantbenchError(f"{out}: already holds a checkpoint ({', '.join(p.name for p in stale[:3])}); "
                              "choose an empty directory or overwrite it")
    spill = _Spill(out)
    entries: list[Entry] = []

    def add(key: str, t: torch.Tensor) -> None:
        if t.dtype not in TORCH_TO_TAG:
            raise FormatError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        off, n = spill.put(t)
        entries.append(Entry(key, TORCH_TO_TAG[t.dtype], tuple(t.shape), lambda o=off, k=n: spill.chunks(o, k)))

    try:
        for name, value in items:
            t = _float_of(name, value, src_layout)
            target = writer.target(name, t)
            if progress:
                progress(name, "quantize" if target is not None else "copy")
            if target is None:
                add(name, t)
                continue
            w = target.to(device)
            q = sc.quantize(w, name=name)
            for key, part in writer.encode(name, q, t):
                add(key, part)
            del q, w
        new_cfg = writer.config()
        extra = {"config.json": (json.dumps(new_cfg, indent=2, sort_keys=False) + "\n").encode()}
        tok_root = Path(tokenizer_dir) if tokenizer_dir is not None else root
        if tok_root is not None:
            for f in TOKENIZER_FILES:
                p = tok_root / f
                if p.is_file():
                    extra[f] = p.read_bytes()
        written = write_model_dir(out, entries, max_shard_bytes=max_shard_bytes, metadata=writer.metadata,
                                  extra_files=extra)
        for p in stale:
            if p not in written:
                p.unlink(missing_ok=True)
        return written
    finally:
        spill.close()
