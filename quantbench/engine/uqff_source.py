"""A UQFF output (quantbench's or mistral.rs's) as a weight source for the engine.

A UQFF output holds only the quantized linear modules; everything else (norms, a float
embedding, biases of unquantized layers...) lives in ``residual.safetensors`` and the model's
shape in ``config.json``, both written beside the shards by mistral.rs and by quantbench. The
engine loads HF names, so this module yields ``(HF name, Tensor | QTensor)`` pairs: each UQFF
module ``<key>`` becomes ``<key>.weight`` (and ``<key>.bias``), stacked experts keep their
``[E, out, in]`` stack (the engine's layout), and residual tensors pass through unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from quantbench.errors import FormatError
from quantbench.formats.safetensors_dir import SafetensorsModel
from quantbench.formats.uqff import RESIDUAL_NAME, UqffFile

Item = tuple[str, "torch.Tensor | QTensor"]


def uqff_model_dir(uqff_path: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``config.json``/``residual.safetensors`` are: ``model_dir`` if given, else beside the shards."""
    if model_dir is not None:
        d = Path(model_dir)
        if not d.is_dir():
            raise FormatError(f"{d}: not a directory (the model dir that goes with the UQFF)")
        return d
    p = Path(uqff_path)
    return p if p.is_dir() else p.parent


def read_config(directory: Path, uqff_path: str | os.PathLike[str]) -> dict:
    cfg = directory / "config.json"
    if not cfg.is_file():
        raise FormatError(f"{uqff_path}: no config.json beside the UQFF (looked in {directory}); "
                          "give the model directory it was made from")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{cfg}: not a JSON object")
    return data


def uqff_items(uqff_path: str | os.PathLike[str],
               model_dir: str | os.PathLike[str] | None = None) -> tuple[dict, Iterator[Item]]:
    """(config dict, iterator of (HF name, Tensor | QTensor)) for a UQFF output.

    ``uqff_path`` names the output (``q4k.uqff``, a shard ``q4k-0.uqff`` or a directory with one
    output). ``model_dir`` holds ``config.json`` and ``residual.safetensors`` when they are not
    beside the shards; for a residual, the UQFF's own folder is searched first. Without a
    residual file, the rest of the model is read from ``model_dir``'s safetensors (what mistral.rs
    does when it loads ``from_uqff`` against the original model).
    """
    uq = UqffFile(uqff_path)  # version checks and layer index happen here, before any yield
    base = uqff_model_dir(uqff_path, model_dir)
    config = read_config(base, uqff_path)
    residual = None
    for d in dict.fromkeys([uq.root, base]):
        if (d / RESIDUAL_NAME).is_file():
            residual = d / RESIDUAL_NAME
            break
    if residual is None and model_dir is None:
        raise FormatError(f"{uqff_path}: no {RESIDUAL_NAME} beside it; give the original model directory as well")
    rest = SafetensorsModel(residual if residual is not None else base)
    return config, _items(uq, rest, residual is None)


def _items(uq: UqffFile, rest: SafetensorsModel, filter_rest: bool) -> Iterator[Item]:
    claimed: set[str] = set()
    try:
        for key in uq.layers:
            w, b = uq.read_layer(key)
            yield f"{key}.weight", w
            claimed.add(f"{key}.weight")
            if b is not None:
                yield f"{key}.bias", b
                claimed.add(f"{key}.bias")
        for name in rest.names():
            if name in claimed:
                if filter_rest:
                    continue
                raise FormatError(f"{rest.root}: tensor {name} is both in the UQFF and in {RESIDUAL_NAME}")
            if filter_rest and _covered(name, uq):
                continue  # a float weight of the original model that the UQFF replaces
            yield name, rest.read(name)
    finally:
        uq.close()
        rest.close()


def _covered(name: str, uq: UqffFile) -> bool:
    """Whether a tensor of the original float checkpoint belongs to a module the UQFF holds
    (``<key>.weight``, or one expert ``<prefix>.experts.<e>.<proj>.weight`` of a stack)."""
    module = name.rsplit(".", 1)[0]
    if module in uq.layers:
        return True
    parts = module.split(".")
    if "experts" in parts:
        i = parts.index("experts")
        if i + 2 < len(parts) and parts[i + 1].isdigit():
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(parts[i + 2], parts[i + 2])
            return ".".join(parts[: i + 1] + [proj]) in uq.layers
    return False


def load_uqff_model(uqff_path: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None,
                    dtype: str | torch.dtype = "f32", device: str = "cpu", with_tokenizer: bool = True,
                    act_quant: str = "none"):
    """The engine's ``LoadedModel`` for a UQFF output (``--from-uqff``): packed layers stay
    QTensors and run through ``QLinear``; the tokenizer comes from the files beside the UQFF
    (or ``model_dir``)."""
    from quantbench.engine.loader import LoadedModel, _build, hf_args, resolve_device, resolve_dtype
    from quantbench.engine.weights import load_weights
    from quantbench.errors import InputValueError

    if act_quant not in ("none", "ggml"):
        raise InputValueError(f"act_quant must be 'none' or 'ggml', got {act_quant!r}")
    device = resolve_device(device)
    dt = resolve_dtype(dtype, device)
    base = uqff_model_dir(uqff_path, model_dir)
    cfg, items = uqff_items(uqff_path, model_dir)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = dict(cfg["text_config"], model_type=cfg["text_config"].get("model_type", cfg.get("model_type")))
    args = hf_args(base, cfg)
    model = _build(args, dt, device)
    load_weights(model, items, str(uqff_path), dt, device)
    model.set_act_quant(act_quant)
    tok = None
    if with_tokenizer:
        from quantbench.engine.tokenizer import Tokenizer

        tok = Tokenizer.from_hf_dir(base)
    return LoadedModel(model.eval(), tok, args, Path(uqff_path), "uqff")
