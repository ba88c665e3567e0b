"""BERT-family encoder (BertModel without the pooler), every projection a :class:`QLinear`.

Why its own file rather than a :class:`~quantbench.engine.models.base.ModelArgs` switch: an
encoder has no cache, no causal mask, absolute learned positions, token types and post-LN
blocks — nothing the decoder shares except the linear seam. Attribute names follow the HF
``BertModel`` so each layer's ``hf_name`` is the checkpoint name without ``.weight``
(``encoder.layer.0.attention.self.query``); checkpoints saved from a task head
(``BertForMaskedLM`` etc.) carry a ``bert.`` prefix, which the loader strips.

The math follows transformers' ``modeling_bert``: embeddings = word + position + token type,
then LayerNorm; each layer is self-attention (scaled dot product, padded keys masked out) ->
dense -> residual -> LayerNorm, then dense -> activation -> dense -> residual -> LayerNorm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.engine.linear import QLinear
from quantbench.errors import FormatError, ShapeError

# transformers' ACT2FN names BERT configs use; "gelu" is the exact erf form.
BERT_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

BERT_MODEL_TYPES = ("bert",)


@dataclass(frozen=True)
class BertConfig:
    """The fields of an HF ``config.json`` that the forward pass depends on."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "BertConfig":
        """Validate and read an HF BERT config; ``source`` names the file in error messages."""
        model_type = cfg.get("model_type")
        if model_type not in BERT_MODEL_TYPES:
            raise FormatError(f"{source}: model_type {model_type!r} is not a BERT encoder (expected 'bert')")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise FormatError(f"{source}: missing field(s) {', '.join(missing)}")
        for k in required:
            v = cfg[k]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise FormatError(f"{source}: field {k} must be a positive integer, got {v!r}")
        pos_type = cfg.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise FormatError(f"{source}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        act = cfg.get("hidden_act", "gelu")
        if act not in BERT_ACTIVATIONS:
            raise FormatError(f"{source}: hidden_act {act!r} is not supported; known: {', '.join(BERT_ACTIVATIONS)}")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise FormatError(
                f"{source}: hidden_size {cfg['hidden_size']} is not a multiple of "
                f"num_attention_heads {cfg['num_attention_heads']}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            hidden_act=act,
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "BertConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise FormatError(f"{path}: no config.json (not an HF model directory)") from None
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{path}: expected a JSON object")
        return cls.from_hf(cfg, str(path))


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(pos)[None]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig, prefix: str) -> None:
        super().__init__()
        h = c.hidden_size
        self.n_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.query = QLinear(h, h, True, f"{prefix}.query")
        self.key = QLinear(h, h, True, f"{prefix}.key")
        self.value = QLinear(h, h, True, f"{prefix}.value")

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # key_mask [B, 1, 1, T] (True = attend): padded keys get no weight, any query length.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return o.transpose(1, 2).reshape(b, t, h)


class BertSelfOutput(nn.Module):
    """Projection back to hidden size, residual, post-LayerNorm (attention and FFN alike)."""

    def __init__(self, in_features: int, c: BertConfig, prefix: str) -> None:
        super().__init__()
        self.dense = QLinear(in_features, c.hidden_size, True, f"{prefix}.dense")
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(y) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig, prefix: str) -> None:
        super().__init__()
        setattr(self, "self", BertSelfAttention(c, f"{prefix}.self"))
        self.output = BertSelfOutput(c.hidden_size, c, f"{prefix}.output")

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(getattr(self, "self")(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig, prefix: str) -> None:
        super().__init__()
        self.dense = QLinear(c.hidden_size, c.intermediate_size, True, f"{prefix}.dense")
        self.act = BERT_ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig, i: int) -> None:
        super().__init__()
        p = f"encoder.layer.{i}"
        self.attention = BertAttention(c, f"{p}.attention")
        self.intermediate = BertIntermediate(c, f"{p}.intermediate")
        self.output = BertSelfOutput(c.intermediate_size, c, f"{p}.output")

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, key_mask)
        return self.output(self.intermediate(a), a)


class BertEncoderStack(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c, i) for i in range(c.num_hidden_layers))


class BertModel(nn.Module):
    """``forward(input_ids, attention_mask, token_type_ids=None) -> last hidden state [B, T, H]``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoderStack(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ShapeError(f"BERT input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ShapeError(
                f"BERT input has {input_ids.shape[1]} tokens; the model has "
                f"{self.config.max_position_embeddings} positions")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x

    def linear_layers(self) -> Iterator[QLinear]:
        """Every projection, in checkpoint order (what a quantization scheme rewrites)."""
        for m in self.modules():
            if isinstance(m, QLinear):
                yield m

    def set_act_quant(self, mode: str) -> None:
        """``"ggml"``: packed layers quantize their input as llama.cpp's CPU backend does (the
        encoder's other ops have no exact-ggml variant); ``"none"``: float activations."""
        for layer in self.linear_layers():
            layer.act_quant = mode


def _strip_prefix(names: list[str]) -> str:
    """``"bert."`` when the checkpoint came from a task head, else ``""``."""
    return "bert." if any(n.startswith("bert.embeddings.") for n in names) else ""


def load_bert_weights(
    model: BertModel,
    names: list[str],
    get: Callable[[str], torch.Tensor],
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> None:
    """Fill ``model`` from a checkpoint whose tensors are ``names``, read one at a time by ``get``.

    Tensors the encoder does not use (the pooler, task heads, ``position_ids``) are ignored;
    a missing or mis-shaped tensor is a :class:`FormatError` naming it and ``source``.
    """
    prefix = _strip_prefix(names)
    available = set(names)

    def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = prefix + name
        if full not in available:
            raise FormatError(f"{source}: tensor {full} is missing")
        t = get(full)
        if tuple(t.shape) != shape:
            raise FormatError(f"{source}: tensor {full} has shape {tuple(t.shape)}, config implies {shape}")
        if not t.is_floating_point():
            raise FormatError(f"{source}: tensor {full} has dtype {t.dtype}, expected a float type")
        return t.to(device=device, dtype=dtype)

    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if isinstance(mod, QLinear):
                mod.set_weight(fetch(f"{mod.hf_name}.weight", (mod.out_features, mod.in_features)))
                mod.bias = fetch(f"{mod.hf_name}.bias", (mod.out_features,))
            elif isinstance(mod, (nn.Embedding, nn.LayerNorm)):
                for pname, p in mod.named_parameters(recurse=False):
                    p.copy_(fetch(f"{mod_name}.{pname}", tuple(p.shape)))
    model.to(device=device, dtype=dtype)
