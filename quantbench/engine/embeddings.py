"""Sentence embeddings from an HF BERT directory, and how much each quantization scheme moves them.

Why: decoder quality tables here start from a GGUF that was itself quantized (SmolLM2 Q4_1), so
they flatter schemes sharing that grid. A sentence-transformers model shipped in fp32 is a
genuinely float reference: quantize only its linear layers, embed the same sentences, and the
cosine similarity to the fp32 embeddings measures the damage.

The pipeline reproduces sentence-transformers for a ``Transformer -> Pooling [-> Normalize]``
``modules.json``: tokens from ``tokenizer.json`` (truncated to ``sentence_bert_config.json``'s
``max_seq_length``, padded to the longest in the batch, text stripped), the encoder's last hidden
state, mean pooling over the attention mask, then L2 normalization when the ``Normalize`` module
is listed. A directory without ``modules.json`` gets mean pooling and no normalization, as
sentence-transformers does for a plain HF model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from quantbench.engine.linear import QLinear
from quantbench.engine.models.bert import BertConfig, BertModel, load_bert_weights
from quantbench.errors import FormatError, InputValueError, QuantbenchError, ShapeError
from quantbench.quant import QTensor, quantize
from quantbench.quant.registry import is_ggml_type

DEFAULT_MAX_SEQ_LENGTH = 256

# GGML types the embedding table covers (the llama.cpp types a 384/1536-wide model can take,
# k-quants through llama.cpp's fallback); the data-free schemes are all of quantbench.quant.schemes.
GGML_TABLE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                    "IQ4_NL", "IQ4_XS", "MXFP4")


def default_schemes() -> list[str]:
    """Every scheme of the embedding quality table: the GGML types above, then every data-free scheme."""
    from quantbench.quant.schemes import all_schemes

    return list(GGML_TABLE_TYPES) + [s.name for s in all_schemes()]

_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PipelineSpec:
    """What sentence-transformers' config files say to do after the encoder."""

    max_seq_length: int
    normalize: bool


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def read_pipeline(model_dir: Path, max_positions: int) -> PipelineSpec:
    """Pooling/normalization/max length from ``modules.json`` and the module configs."""
    normalize = False
    modules_path = model_dir / "modules.json"
    if modules_path.exists():
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise FormatError(f"{modules_path}: expected a list of modules")
        kinds = [m.get("type") if isinstance(m, dict) else None for m in modules]
        unknown = [k for k in kinds if k not in (_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE)]
        if unknown:
            raise FormatError(f"{modules_path}: module type(s) {', '.join(map(str, unknown))} are not supported "
                              "(only Transformer -> Pooling -> Normalize)")
        normalize = _ST_NORMALIZE in kinds
        for m in modules:
            if m.get("type") == _ST_POOLING:
                _check_pooling(model_dir / str(m.get("path", "")) / "config.json")
    max_len = DEFAULT_MAX_SEQ_LENGTH
    sbert_path = model_dir / "sentence_bert_config.json"
    if sbert_path.exists():
        sbert = _read_json(sbert_path)
        if not isinstance(sbert, dict):
            raise FormatError(f"{sbert_path}: expected a JSON object")
        v = sbert.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH)
        if not isinstance(v, int) or v <= 0:
            raise FormatError(f"{sbert_path}: max_seq_length must be a positive integer, got {v!r}")
        max_len = v
    return PipelineSpec(max_seq_length=min(max_len, max_positions), normalize=normalize)


def _check_pooling(path: Path) -> None:
    if not path.exists():
        return  # sentence-transformers' Pooling defaults to mean tokens
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: expected a JSON object")
    on = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True)
    if on != ["pooling_mode_mean_tokens"]:
        raise FormatError(f"{path}: pooling {', '.join(on) or 'none'} is not supported (only pooling_mode_mean_tokens)")


def _safetensors_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wm = _read_json(index)
        if not isinstance(wm, dict) or not isinstance(wm.get("weight_map"), dict):
            raise FormatError(f"{index}: no weight_map object")
        return [model_dir / f for f in sorted(set(wm["weight_map"].values()))]
    raise FormatError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the unpadded token states (sentence-transformers' ``pooling_mode_mean_tokens``)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class SentenceEncoder:
    """An fp32 (or quantized) BERT plus its tokenizer and pooling, loaded from an HF directory."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu",
                 max_seq_length: int | None = None) -> None:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FormatError(f"{self.model_dir}: not a directory (expected an HF model directory)")
        self.device = torch.device(device)
        self.config = BertConfig.from_file(self.model_dir / "config.json")
        self.pipeline = read_pipeline(self.model_dir, self.config.max_position_embeddings)
        if max_seq_length is not None:
            if max_seq_length <= 0 or max_seq_length > self.config.max_position_embeddings:
                raise InputValueError(f"max_seq_length {max_seq_length} must be in 1..{self.config.max_position_embeddings}")
            self.pipeline = PipelineSpec(max_seq_length, self.pipeline.normalize)
        tok_path = self.model_dir / "tokenizer.json"
        if not tok_path.exists():
            raise FormatError(f"{self.model_dir}: no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises its own Exception type
            raise FormatError(f"{tok_path}: cannot be read by tokenizers ({e})") from None
        self.tokenizer.enable_truncation(max_length=self.pipeline.max_seq_length)
        pad_id = self.config.pad_token_id
        pad_tok = self.tokenizer.id_to_token(pad_id) or "[PAD]"
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_tok)  # to the longest in a batch

        self.model = BertModel(self.config)
        files = _safetensors_files(self.model_dir)
        handles = {}
        owner: dict[str, Path] = {}
        for f in files:
            if not f.exists():
                raise FormatError(f"{f}: listed in the index but missing")
            handles[f] = safe_open(str(f), framework="pt")
            for k in handles[f].keys():
                owner[k] = f
        load_bert_weights(self.model, list(owner), lambda n: handles[owner[n]].get_tensor(n),
                          str(self.model_dir), device=self.device)
        self.model.eval()
        self._float_weights = {lin.hf_name: lin.weight for lin in self.model.linear_layers()}

    def linear_layers(self) -> list[QLinear]:
        return list(self.model.linear_layers())

    def float_weight(self, hf_name: str) -> torch.Tensor:
        """The checkpoint's own weight of a linear layer, whatever is set on it now."""
        return self._float_weights[hf_name]

    def restore_float(self) -> None:
        for lin in self.model.linear_layers():
            lin.set_weight(self._float_weights[lin.hf_name])

    def tokenize(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, token_type_ids)`` as int64 ``[B, T]`` on the model's device."""
        enc = self.tokenizer.encode_batch([s.strip() for s in sentences])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=self.device)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long, device=self.device)
        types = torch.tensor([e.type_ids for e in enc], dtype=torch.long, device=self.device)
        return ids, mask, types

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Float32 ``[N, hidden]`` sentence embeddings, in input order.

        Batches are formed from sentences sorted by length (as sentence-transformers does), so
        padding costs little; the result does not depend on the batching since padded keys are
        masked and pooling ignores padded positions.
        """
        if not sentences:
            raise InputValueError("no sentences to embed")
        if batch_size <= 0:
            raise InputValueError(f"batch_size must be positive, got {batch_size}")
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = torch.empty(len(sentences), self.config.hidden_size, dtype=torch.float32, device=self.device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask, types = self.tokenize([sentences[i] for i in idx])
            hidden = self.model(ids, mask, types)
            emb = mean_pool(hidden.float(), mask)
            if self.pipeline.normalize:
                emb = F.normalize(emb, p=2, dim=1)
            out[torch.tensor(idx, device=self.device)] = emb
        return out


# ----------------------------------------------------------------------------------------------
# Quantizing the linear layers


def ggml_fallback(hf_name: str, in_features: int, out_features: int, qtype: str) -> tuple[str, str | None]:
    """The GGML type llama-quantize stores for a weight whose rows are ``in_features`` long.

    llama.cpp's ``tensor_type_fallback`` (ported in :mod:`quantbench.plan.llama_mixture`):
    a 256-block k-quant that does not divide the row becomes a 32-block type (Q2_K/Q3_K -> Q4_0,
    Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL), and F16 when that fails too.
    Returns ``(type, reason or None)``.
    """
    from quantbench.plan.llama_mixture import TensorSpec, _fallback

    return _fallback(TensorSpec(f"{hf_name}.weight", (in_features, out_features), "F32"), qtype)


def check_scheme_name(name: str) -> None:
    """:class:`UnknownTypeError` listing the known names unless ``name`` is a GGML type or scheme."""
    if is_ggml_type(name):
        return
    from quantbench.quant import schemes as _schemes

    _schemes.get_scheme(name)


@dataclass
class QuantizedLayers:
    """What one scheme did to the encoder's linear layers."""

    scheme: str
    stored_types: dict[str, int] = field(default_factory=dict)  # stored type -> number of layers
    fallbacks: list[str] = field(default_factory=list)  # "layer: reason" (GGML fallback taken)
    unfit: list[str] = field(default_factory=list)  # "layer: error" (scheme cannot store it)
    bits: int = 0  # storage bits of all quantized linear weights, every scale byte included
    numel: int = 0

    @property
    def bits_per_weight(self) -> float | None:
        return self.bits / self.numel if self.numel else None


def quantize_linears(enc: SentenceEncoder, scheme: str, fallback: str = "llama",
                     quant_input_dtype: torch.dtype = torch.float32) -> QuantizedLayers:
    """Quantize every linear weight of ``enc`` (from its fp32 originals) to ``scheme``, in place.

    ``fallback="llama"`` lets GGML types whose block does not divide a row take llama.cpp's
    fallback type; ``"none"`` records those layers as unfit instead. Data-free schemes have no
    fallback. When any layer is unfit, nothing is changed (the scheme cannot run as asked) and
    the unfit layers are listed. Biases, embeddings and LayerNorms stay float (as in GGUF/UQFF).
    """
    if fallback not in ("llama", "none"):
        raise InputValueError(f"fallback must be 'llama' or 'none', got {fallback!r}")
    check_scheme_name(scheme)
    ggml = is_ggml_type(scheme)
    res = QuantizedLayers(scheme.upper())
    packed: dict[str, QTensor] = {}
    for lin in enc.linear_layers():
        w = enc.float_weight(lin.hf_name).to(quant_input_dtype)
        target = scheme.upper()
        if ggml and fallback == "llama":
            try:
                target, why = ggml_fallback(lin.hf_name, lin.in_features, lin.out_features, target)
            except ShapeError as e:
                res.unfit.append(f"{lin.hf_name}: {e}")
                continue
            if why:
                res.fallbacks.append(f"{lin.hf_name}: {why} -> {target}")
        try:
            q = quantize(w, target, name=f"{lin.hf_name}.weight")
        except (ShapeError, InputValueError) as e:
            res.unfit.append(f"{lin.hf_name}: {e}")
            continue
        packed[lin.hf_name] = q
        res.stored_types[target] = res.stored_types.get(target, 0) + 1
        res.bits += 8 * q.nbytes  # packed codes + scales/zeros/maps: each scheme's bits_per_weight count
        res.numel += q.numel
    if res.unfit:
        res.stored_types, res.bits, res.numel = {}, 0, 0
        return res
    for lin in enc.linear_layers():
        # Decide caching here: QLinear's own default reads ``w.data``, which only GGML QTensors have.
        # On CPU the dequantized weight is cached (one dequantization per scheme, not per batch).
        lin.cache_dequantized = enc.device.type != "cuda"
        lin.set_weight(packed[lin.hf_name])
    return res


# ----------------------------------------------------------------------------------------------
# The quality table


@dataclass
class EmbeddingQualityRow:
    """One scheme's effect on sentence embeddings (cosines vs the fp32 model on the same text)."""

    scheme: str
    status: str  # "ok" | "n/a"
    bits_per_weight: float | None
    mean_cos: float | None
    min_cos: float | None
    p05_cos: float | None  # 5th percentile: the tail a mean hides
    stored_types: dict[str, int]
    fallbacks: list[str]
    unfit: list[str]
    n_sentences: int
    quantize_s: float
    encode_s: float

    def to_json(self) -> dict:
        return asdict(self)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity in float64 (embeddings may or may not be normalized)."""
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def embedding_quality(
    model_dir: str | Path,
    schemes: Iterable[str],
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    fallback: str = "llama",
    device: str | torch.device = "cpu",
    quant_input_dtype: torch.dtype = torch.float32,
    encoder: SentenceEncoder | None = None,
    progress: Callable[[EmbeddingQualityRow], None] | None = None,
) -> list[EmbeddingQualityRow]:
    """Cosine similarity of each scheme's sentence embeddings to the fp32 model's, with bits/weight.

    Only the linear layers are quantized (every Q/K/V/output and FFN projection); bits/weight
    is over those weights. A scheme that cannot store some layer gives an ``n/a`` row listing
    them, never an exception; an unknown scheme name raises :class:`UnknownTypeError`.
    """
    schemes = list(schemes)
    for s in schemes:
        check_scheme_name(s)
    enc = encoder or SentenceEncoder(model_dir, device=device)
    enc.restore_float()
    ref = enc.encode(sentences, batch_size)
    rows: list[EmbeddingQualityRow] = []
    for s in schemes:
        t0 = time.perf_counter()
        try:
            ql = quantize_linears(enc, s, fallback, quant_input_dtype)
        except QuantbenchError:
            enc.restore_float()
            raise
        t1 = time.perf_counter()
        if ql.unfit:
            row = EmbeddingQualityRow(ql.scheme, "n/a", None, None, None, None, {}, ql.fallbacks, ql.unfit,
                                      len(sentences), t1 - t0, 0.0)
        else:
            try:
                emb = enc.encode(sentences, batch_size)
            finally:
                enc.restore_float()
            t2 = time.perf_counter()
            cos = cosine_rows(emb, ref)
            if not bool(torch.isfinite(cos).all()):
                raise InputValueError(f"{ql.scheme}: quantized model produced non-finite embeddings")
            row = EmbeddingQualityRow(
                ql.scheme, "ok", ql.bits_per_weight, float(cos.mean()), float(cos.min()),
                float(torch.quantile(cos, 0.05)), dict(ql.stored_types), ql.fallbacks, [],
                len(sentences), t1 - t0, t2 - t1)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def format_table(rows: Sequence[EmbeddingQualityRow]) -> str:
    """A plain-text table: scheme, bits/weight, mean/p05/min cosine, stored types."""
    head = f"{'scheme':<12} {'bpw':>7} {'mean cos':>10} {'p05 cos':>10} {'min cos':>10}  stored"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.scheme:<12} {'n/a':>7} {'n/a':>10} {'n/a':>10} {'n/a':>10}  "
                         f"{len(r.unfit)} layer(s) do not fit: {r.unfit[0]}")
            continue
        stored = ", ".join(f"{t}x{n}" for t, n in sorted(r.stored_types.items()))
        lines.append(f"{r.scheme:<12} {r.bits_per_weight:>7.3f} {r.mean_cos:>10.6f} {r.p05_cos:>10.6f} "
                     f"{r.min_cos:>10.6f}  {stored}")
    return "\n".join(lines)
