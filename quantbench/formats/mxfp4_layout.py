"""The gpt-oss MXFP4 checkpoint layout (transformers ``Mxfp4Config``, ``quant_method: mxfp4``).

Why: gpt-oss ships its MoE expert weights as OCP MX blocks, and transformers / vLLM / llama.cpp
converters read exactly these tensors. For an expert parameter ``X`` (transformers'
``GptOssExperts.gate_up_proj`` / ``down_proj``, float shape ``[E, in, out]``)::

    X_blocks   uint8 [E, out, in/32, 16]   16 bytes = 32 E2M1 codes, low nibble = even element
    X_scales   uint8 [E, out, in/32]       E8M0 exponent, value 2^(s - 127)

Note the orientation: blocks run along the *input* dimension, so the blocks describe the
transpose of transformers' parameter (its ``convert_moe_packed_tensors`` dequantizes to
``[E, out, in]`` and then transposes). Our MXFP4 QTensor's ``blocks`` are the same bytes viewed as
``[E, out, in/2]``.

Reading yields ``(X, QTensor)`` with the QTensor's logical shape ``[E, out, in]`` (the
stored orientation; a consumer wanting transformers' parameter transposes the last two dims
after dequantizing). Writing quantizes only such expert tensors (``*.experts.gate_up_proj``,
``*.experts.down_proj``, 3-D), as transformers' MXFP4 quantizer does; attention, router,
embeddings and head stay float and are named in ``modules_to_not_convert`` as gpt-oss does. A
model without such experts is refused — for dense models, MXFP4 goes to the MLX layout.
"""

from __future__ import annotations

import copy
import re
from typing import Iterator

import torch

from quantbench.errors import FormatError, ShapeError
from quantbench.formats.checkpoint import Group, matches_any
from quantbench.quant.qtensor import QTensor

EXPERT = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


class Mxfp4Writer:
    metadata = None

    def __init__(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> None:
        if options:
            raise FormatError(f"mxfp4 layout takes no options (got {', '.join(sorted(options))})")
        self.cfg, self.skip, self.count = cfg, skip, 0

    def target(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        if not (EXPERT.search(name) and t.ndim == 3 and t.is_floating_point()) or matches_any(name, self.skip):
            return None
        if t.shape[1] % 32:
            raise ShapeError(f"{name}: MXFP4 blocks run along the input dim ({t.shape[1]}), which is not a multiple of 32")
        return t.transpose(-1, -2).contiguous()

    def encode(self, name: str, q: QTensor, src: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        self.count += 1
        return encode(name, q)

    def config(self) -> dict:
        if self.count == 0:
            raise FormatError(
                f"the mxfp4 (gpt-oss) layout holds MoE expert tensors (*.experts.gate_up_proj / down_proj); "
                f"this {self.cfg.get('model_type', 'model')} has none — write MXFP4 to the mlx layout instead"
            )
        out = copy.deepcopy(self.cfg)
        out["quantization_config"] = {"modules_to_not_convert": NOT_CONVERTED + list(self.skip), "quant_method": "mxfp4"}
        return out


def encode(name: str, q: QTensor) -> list[tuple[str, torch.Tensor]]:
    b = q.tensors["blocks"]
    lead, half = tuple(b.shape[:-1]), b.shape[-1]
    return [(f"{name}_blocks", b.reshape(*lead, half // 16, 16)), (f"{name}_scales", q.tensors["scales"])]


def decode(g: Group, base: str) -> QTensor:
    bkey, skey = f"{base}_blocks", f"{base}_scales"
    blocks = g.get(bkey)
    scales = g.get(skey, needed_by=bkey)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise FormatError(f"{g.where(bkey)}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} / {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise FormatError(f"{g.where(bkey)}: shape {list(blocks.shape)} with scales {list(scales.shape)}; "
                          "expected blocks [..., n/32, 16] and scales [..., n/32]")
    lead = tuple(blocks.shape[:-2])
    n = blocks.shape[-2] * 32
    return QTensor("MXFP4_OCP", (*lead, n), {"blocks": blocks.reshape(*lead, n // 2), "scales": scales},
                   {"rule": "ocp", "block_size": 32})


class Mxfp4Layout:
    name = "mxfp4"
    quant_methods = ("mxfp4",)
    schemes = frozenset({"MXFP4_OCP", "MXFP4_ISQ"})

    def writer(self, scheme: str, cfg: dict, skip: list[str], options: dict) -> Mxfp4Writer:
        return Mxfp4Writer(scheme, cfg, skip, options)

    def read(self, st, cfg: dict, origin: str) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
        g = Group(st)
        names = st.names()
        nameset = set(names)
        for name in names:
            if name.endswith("_scales"):
                if name[: -len("_scales")] + "_blocks" not in nameset:
                    raise FormatError(f"{g.where(name)}: MXFP4 scales without {name[:-len('_scales')]}_blocks")
                continue
            if name.endswith("_blocks"):
                yield name[: -len("_blocks")], decode(g, name[: -len("_blocks")])
                continue
            yield name, st.read(name)


LAYOUT = Mxfp4Layout()
