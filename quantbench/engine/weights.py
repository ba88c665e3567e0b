"""Placing named tensors (HF names) into a built model, with shape checks and MoE expert stacking."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from quantbench.engine.linear import QExperts, QLinear
from quantbench.engine.models.base import Embedding, Model
from quantbench.errors import FormatError, ShapeError
from quantbench.quant import QTensor

Item = tuple[str, "torch.Tensor | QTensor"]

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_ALIAS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rope\.freqs)$")


def stack_experts(items: Iterable[Item], n_experts: int, origin: str = "") -> Iterator[Item]:
    """HF checkpoints store one tensor per expert (or v5's fused ``gate_up_proj``); the engine
    keeps ``[E, out, in]`` stacks. Buffers only the experts of one projection at a time."""
    pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in items:
        m = _PER_EXPERT.match(name)
        if m:
            if isinstance(t, QTensor):
                raise FormatError(f"{name}: per-expert quantized checkpoints are not supported; "
                                  "use a float checkpoint, GGUF or UQFF for quantized MoE models")
            which = _EXPERT_ALIAS.get(m.group(3), m.group(3))
            key = (m.group(1), which)
            slot = pending.setdefault(key, {})
            slot[int(m.group(2))] = t
            if len(slot) == n_experts:
                del pending[key]
                yield f"{key[0]}.{which}.weight", torch.stack([slot[e] for e in range(n_experts)])
            continue
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.gate_up_proj.weight"):
            base = name[: name.index(".experts.") + len(".experts")]
            g, u = t.chunk(2, dim=1)
            yield f"{base}.gate_proj.weight", g.contiguous()
            yield f"{base}.up_proj.weight", u.contiguous()
            continue
        if name.endswith(".experts.down_proj"):
            yield name + ".weight", t
            continue
        yield name, t
    if pending:
        (prefix, which), got = next(iter(pending.items()))
        where = f"{origin}: " if origin else ""
        raise FormatError(f"{where}expert weights {prefix}.N.{which}: found {len(got)} of {n_experts} experts")


def _moe_block_alias(name: str, block: str) -> str:
    """transformers 5 keeps Mixtral's router and fused experts under ``mlp.`` (its state_dict and
    any file saved from it), while v4 files — and the engine — say ``block_sparse_moe.``."""
    if block != "mlp" and (".mlp.gate." in name or ".mlp.experts." in name):
        return name.replace(".mlp.", f".{block}.", 1)
    return name


def expected_names(model: Model) -> dict[str, tuple[torch.nn.Module, str, tuple[int, ...]]]:
    """Every weight the model needs: HF name → (module, attribute, shape)."""
    out: dict[str, tuple[torch.nn.Module, str, tuple[int, ...]]] = {}
    for mod in model.modules():
        if isinstance(mod, QLinear):
            out[f"{mod.hf_name}.weight"] = (mod, "weight", (mod.out_features, mod.in_features))
            if mod.has_bias:
                out[f"{mod.hf_name}.bias"] = (mod, "bias", (mod.out_features,))
        elif isinstance(mod, QExperts):
            E, h, f = mod.n_experts, mod.hidden, mod.ff
            out[f"{mod.hf_name}.gate_proj.weight"] = (mod, "gate_proj", (E, f, h))
            out[f"{mod.hf_name}.up_proj.weight"] = (mod, "up_proj", (E, f, h))
            out[f"{mod.hf_name}.down_proj.weight"] = (mod, "down_proj", (E, h, f))
        elif isinstance(mod, Embedding):
            out["model.embed_tokens.weight"] = (mod, "weight", (mod.vocab, mod.dim))
    for pname, p in model.named_parameters():
        out[pname] = (model, pname, tuple(p.shape))
    return out


def load_weights(model: Model, items: Iterable[Item], origin: str, dtype: torch.dtype,
                 device: torch.device | str) -> None:
    """Assign every tensor; refuse unknown names, wrong shapes and anything missing."""
    want = expected_names(model)
    seen: set[str] = set()
    embed = None
    for name, t in stack_experts(items, model.args.num_experts, origin):
        if _IGNORED.search(name):
            continue
        if name not in want:
            name = _moe_block_alias(name, model.args.moe_block_name)
        if name not in want:
            raise FormatError(f"{origin}: unexpected tensor {name!r} for a {model.args.arch} model of this config")
        mod, attr, shape = want[name]
        if tuple(t.shape) != shape:
            raise ShapeError(f"{origin}: tensor {name} has shape {list(t.shape)}, the config implies {list(shape)}")
        if isinstance(t, QTensor):
            value = t.to(device)
        else:
            value = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if name == "model.embed_tokens.weight":
            embed = value
        _assign(model, mod, attr, value)
        seen.add(name)
    if "lm_head.weight" not in seen and embed is not None and model.args.tie_word_embeddings:
        model.lm_head.set_weight(embed)
        seen.add("lm_head.weight")
    missing = [n for n in want if n not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FormatError(f"{origin}: missing tensors: {', '.join(missing[:5])}{more}")


def _assign(model: Model, mod: torch.nn.Module, attr: str, value) -> None:
    if isinstance(mod, QLinear):
        if attr == "weight":
            mod.set_weight(value)
        else:
            mod.bias = value
    elif isinstance(mod, QExperts):
        mod.set_weight(attr, value)
    elif isinstance(mod, Embedding):
        mod.set_weight(value)
    else:  # a parameter of the model (norm weights)
        owner_path, _, leaf = attr.rpartition(".")
        owner = model.get_submodule(owner_path)
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))
