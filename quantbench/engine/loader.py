"""Loading a model for the engine from a HF directory / hub id or a GGUF file.

Weights stream from the source one tensor at a time (safetensors mmap, GGUF ``pread``); float
weights are cast to the compute dtype, quantized GGUF tensors stay packed as QTensors and run
through :class:`~quantbench.engine.linear.QLinear`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from quantbench.devices import resolve_device
from quantbench.engine import gguf_names
from quantbench.engine.models import module_for_gguf, module_for_hf
from quantbench.engine.models.base import Model, ModelArgs
from quantbench.engine.models.config_keys import Source
from quantbench.engine.weights import Item, load_weights
from quantbench.errors import FormatError, InputValueError, QuantbenchError
from quantbench.quant import QTensor

DTYPES = {"f32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "f16": torch.float16, "float16": torch.float16}
FLOAT_GGML = {"F32", "F16", "BF16"}


@dataclass
class LoadedModel:
    model: Model
    tokenizer: Any
    args: ModelArgs
    source: Path
    kind: str  # "gguf" | "hf"

    @property
    def arch(self) -> str:
        return self.args.arch

    @property
    def config(self) -> ModelArgs:
        return self.args


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise InputValueError(f"unknown dtype {dtype!r} (choose f32, bf16, f16 or auto)")
    return DTYPES[dtype]


def load_model(spec: str | os.PathLike[str], dtype: str | torch.dtype = "f32", device: str = "cpu",
               with_tokenizer: bool = True, act_quant: str = "none") -> LoadedModel:
    """Build the model that ``spec`` names: a ``.gguf`` file, a HF model dir, a hub id or an alias.

    ``act_quant="ggml"`` quantizes each packed layer's input the way llama.cpp's CPU backend
    does (Q8_0/Q8_1/Q8_K), to reproduce its numbers; ``"none"`` keeps activations in float.
    """
    from quantbench.sources import resolve_model

    if act_quant not in ("none", "ggml"):
        raise InputValueError(f"act_quant must be 'none' or 'ggml', got {act_quant!r}")
    device = resolve_device(device)
    dt = resolve_dtype(dtype, device)
    path = _locate(str(spec), resolve_model)
    if path.is_dir():
        lm = _load_hf_dir(path, dt, device, with_tokenizer)
    else:
        lm = _load_gguf(path, dt, device, with_tokenizer)
    lm.model.set_act_quant(act_quant)
    return lm


def _locate(spec: str, resolve_model) -> Path:
    try:
        return Path(resolve_model(spec))
    except QuantbenchError:
        if "/" in spec and not Path(spec).exists() and spec.count("/") == 1:
            return _hub_snapshot(spec)
        raise


def _hub_snapshot(repo_id: str) -> Path:
    """A hub id → local snapshot dir (config, safetensors, tokenizer); honours ``HF_HUB_OFFLINE``."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except Exception as e:
        raise FormatError(f"{repo_id}: cannot fetch from the Hugging Face hub ({type(e).__name__}: {e})") from e


def _build(args: ModelArgs, dtype: torch.dtype, device: str) -> Model:
    with torch.device("meta"):
        model = Model(args)
    model.dtype = dtype
    # norms are the only parameters; give them real storage before weights are assigned
    for name, p in list(model.named_parameters()):
        owner_path, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner_path), leaf,
                torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False))
    for r in (model.rope_global, model.rope_local):
        if r is not None:
            r.inv_freq = r.inv_freq.to(device)
            if r.long_inv_freq is not None:
                r.long_inv_freq = r.long_inv_freq.to(device)
    return model


# --- HF directories -------------------------------------------------------------------------


def read_hf_config(path: Path) -> dict:
    """config.json, with a multimodal checkpoint's ``text_config`` taken as the model's config."""
    from quantbench.formats.safetensors_dir import read_config

    cfg = read_config(path)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = dict(cfg["text_config"], model_type=cfg["text_config"].get("model_type", cfg.get("model_type")))
    return cfg


def hf_args(path: Path, cfg: dict) -> ModelArgs:
    origin = str(path / "config.json")
    if "model_type" not in cfg:
        raise FormatError(f"{origin}: missing required key 'model_type'")
    return module_for_hf(cfg["model_type"], origin).from_hf(Source(cfg, origin))


def _load_hf_dir(path: Path, dtype: torch.dtype, device: str, with_tokenizer: bool) -> LoadedModel:
    cfg = read_hf_config(path)
    args = hf_args(path, cfg)
    model = _build(args, dtype, device)
    from quantbench.formats.checkpoint import read_checkpoint_items

    # float dirs and quantized checkpoints (bnb, MLX, FP8, compressed-tensors) alike
    load_weights(model, read_checkpoint_items(path), str(path), dtype, device)
    tok = None
    if with_tokenizer:
        from quantbench.engine.tokenizer import Tokenizer

        tok = Tokenizer.from_hf_dir(path)
    return LoadedModel(model.eval(), tok, args, path, "hf")


# --- GGUF -----------------------------------------------------------------------------------


def gguf_args(gf) -> tuple[ModelArgs, Any]:
    arch = gf.architecture
    origin = str(gf.path)
    mod = module_for_gguf(arch, origin)
    meta = Source(gf.values(), origin, prefix=f"{arch}.")
    toks = gf.metadata.get("tokenizer.ggml.tokens")
    n_vocab = len(toks.value) if toks is not None else 0
    names = {t.name for t in gf.tensors}
    args = mod.from_gguf(meta, n_vocab, names)
    args.tie_word_embeddings = "output.weight" not in names
    if "rope_freqs.weight" in names:
        args.rope_freq_factors = gf.tensor("rope_freqs.weight").float_rows().reshape(-1)
    if "rope_factors_long.weight" in names:
        orig = int(meta.get("rope.scaling.original_context_length", args.max_position_embeddings))
        args.rope_scaling = {
            "rope_type": "longrope",
            "long_factor": gf.tensor("rope_factors_long.weight").float_rows().reshape(-1).tolist(),
            "short_factor": gf.tensor("rope_factors_short.weight").float_rows().reshape(-1).tolist(),
            "original_max_position_embeddings": orig,
            "attention_factor": meta.get("rope.scaling.attn_factor"),
        }
    return args, mod


def gguf_items(gf, args: ModelArgs, mod, dequantize: bool = False) -> Iterator[Item]:
    """(HF name, float tensor or packed QTensor) for every model tensor of a GGUF file."""
    for t, hf in gguf_names.model_tensors(gf, args):
        if t.ggml_type in FLOAT_GGML or dequantize:
            value: torch.Tensor | QTensor = t.float_rows().reshape(t.shape)
        else:
            value = t.qtensor()
        heads = gguf_names.permuted_heads(hf, args.num_heads, args.num_kv_heads, mod.GGUF_PERMUTES_QK)
        if heads is not None:  # Q/K biases are permuted like their weights' rows
            value = gguf_names.unpermute_rows(value, heads)
        yield hf, value


def _load_gguf(path: Path, dtype: torch.dtype, device: str, with_tokenizer: bool) -> LoadedModel:
    from quantbench.formats.gguf import read_gguf

    gf = read_gguf(path)
    args, mod = gguf_args(gf)
    model = _build(args, dtype, device)
    load_weights(model, gguf_items(gf, args, mod), str(path), dtype, device)
    tok = None
    if with_tokenizer:
        from quantbench.engine.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(gf)
    return LoadedModel(model.eval(), tok, args, path, "gguf")
