"""Tokenizers rebuilt from GGUF metadata must give llama.cpp's token ids.

The oracle is llama.cpp itself through its Python binding (tests/oracles/llama_cpp_py.py).
Vocabularies: SmolLM2's real ``gpt2`` BPE vocabulary (and copies of it relabelled with other
``tokenizer.ggml.pre`` values, so each pre-tokenizer regex chain meets llama.cpp's), and
``llama`` (SentencePiece) vocabularies trained here with ``sentencepiece`` on WikiText-2, since no
real SentencePiece model is available offline.
"""

from __future__ import annotations

import io
import json
import random
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from quantbench.engine.tokenizer import PRE_TOKENIZERS, Tokenizer, load_tokenizer
from quantbench.errors import FormatError, QuantbenchError
from quantbench.formats.gguf import KV, GGUFFile, GGUFStreamWriter, read_gguf
from quantbench.sources import resolve_model
from tests.conftest import DATA
from tests.oracles import llama_cpp_py as oracle

pytestmark = pytest.mark.oracle

WIKI = DATA / "wiki.test.raw"

# Strings that stress the pre-tokenizers: contractions in both cases, digit runs, whitespace
# runs of every kind (incl. NBSP, thin space, ideographic space, NEL, line separator), accents,
# combining marks, CJK, emoji with modifiers, code punctuation.
CRAFTED = [
    "DON'T you'LL WE'VE it's I'M 's'S 'll 'LL",
    "x   \n\n  y\t\tz \r\n w",
    "3.14159 1,000,000 12345678 2024-01-31",
    "naïve café Straße ÉCOLE ǅungla Ωmega ΣΊΣΥΦΟΣ",
    "中文字符和日本語のテキスト 한국어",
    "emoji 😀👍🏽 mixed",
    "a\u00a0b\u2009c\u3000d\u0085e\u2028f",
    "path/to/file.py:12 <tag> {x: [1,2]} $5 ^~| @user #tag",
    "  leading and trailing  ",
    "x\u0301y\u0308z",
    "(bar) $foo #include <stdio.h>\n`code` here",
    "Hello!!\n\nWorld...\r\n\r\nx",
    "a,b;c:d\n\n\n  e",
    "क्षि नमस्ते ไทย",
    "don't stop\tnow  \n  ",
    " = = Heading = = \n \n",
    " ",
    "\n",
    "a",
    "",
]


@lru_cache(maxsize=1)
def wiki_text() -> str:
    return WIKI.read_text(encoding="utf-8")


def passages(n: int, seed: int) -> list[str]:
    """``CRAFTED`` plus ``n`` WikiText-2 windows of mixed lengths at random offsets."""
    text = wiki_text()
    rng = random.Random(seed)
    out = list(CRAFTED)
    for _ in range(n):
        length = rng.choice([1, 3, 10, 50, 200, 1000, 5000])
        start = rng.randrange(len(text) - length)
        out.append(text[start:start + length])
    return out


def mismatches(tok: Tokenizer, path: Path, texts: list[str], *, add_special: bool = True,
               parse_special: bool = True) -> list[tuple[str, list[int], list[int]]]:
    bad = []
    for t in texts:
        ours = tok.encode(t, add_special=add_special, parse_special=parse_special)
        ref = oracle.llama_tokenize(path, t, add_bos=add_special, special=parse_special)
        if ours != ref:
            bad.append((t[:120], ours[:40], ref[:40]))
    return bad


# --------------------------------------------------------------------------------------------
# SmolLM2 (gpt2 BPE, pre=smollm)
# --------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    return resolve_model("smollm2")


@lru_cache(maxsize=1)
def smollm2_file() -> GGUFFile:
    return read_gguf(smollm2_path())


@lru_cache(maxsize=1)
def smollm2_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_file())


def test_smollm2_tokenizer_metadata():
    tok = smollm2_tokenizer()
    assert tok.vocab_size == 49152
    assert tok.bos_id == 1 and tok.bos_token == "<|im_start|>"
    assert tok.eos_id == 2 and tok.eos_token == "<|im_end|>"
    assert tok.add_bos is False and tok.add_eos is False
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # every id we stop on is one llama.cpp stops on (llama.cpp also stops on FIM tokens)
    eog = set(oracle.llama_eog_ids(smollm2_path()))
    assert {0, 2} <= set(tok.eos_ids) <= eog


def test_smollm2_matches_llama_cpp_on_wiki_passages():
    bad = mismatches(smollm2_tokenizer(), smollm2_path(), passages(200, seed=0))
    assert not bad, f"{len(bad)} passages differ from llama.cpp, first: {bad[0]}"


def test_smollm2_matches_llama_cpp_on_first_100kb():
    text = wiki_text()[:100_000]
    ours = smollm2_tokenizer().encode(text)
    ref = oracle.llama_tokenize(smollm2_path(), text)
    assert len(ours) > 20_000
    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    assert ours == ref, f"first difference at token {first} (lengths {len(ours)} vs {len(ref)})"


def test_smollm2_special_tokens_follow_parse_flag():
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi <|endoftext|> there<|im_end|>\n"
    tok, path = smollm2_tokenizer(), smollm2_path()
    for parse in (True, False):
        assert tok.encode(text, parse_special=parse) == oracle.llama_tokenize(path, text, special=parse)
    assert tok.encode(text)[0] == 1  # <|im_start|> as one token
    assert 1 not in tok.encode(text, parse_special=False)


def _relabelled_vocab(path: Path, pre: str) -> dict[str, KV]:
    """SmolLM2's vocabulary (no tensors) with ``tokenizer.ggml.pre`` set to ``pre`` and no
    ``add_bos_token`` key, so llama.cpp's per-pre defaults are in play too.  Written to ``path``
    for llama.cpp; the metadata is returned so our side need not re-read the file."""
    import gguf

    meta = {k: kv for k, kv in smollm2_file().metadata.items()
            if k not in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token")}
    meta["tokenizer.ggml.pre"] = KV(pre, gguf.GGUFValueType.STRING)
    with GGUFStreamWriter(path, "llama") as w:
        for k, kv in meta.items():
            w.add_kv(k, kv)
    return meta


PRE_CASES = ["default", "llama-bpe", "qwen2", "qwen35", "gpt-2", "falcon", "tekken", "gpt-4o",
             "deepseek-v3", "seed-coder", "chatglm-bpe", "dbrx", "starcoder"]


@pytest.mark.parametrize("pre", PRE_CASES)
def test_pre_tokenizer_matches_llama_cpp(tmp_path, pre):
    assert pre in PRE_TOKENIZERS
    path = tmp_path / f"vocab-{pre}.gguf"
    tok = Tokenizer.from_gguf(_relabelled_vocab(path, pre))
    bad = mismatches(tok, path, passages(40, seed=zlib.crc32(pre.encode())))
    assert not bad, f"pre={pre}: {len(bad)} passages differ from llama.cpp, first: {bad[0]}"


# --------------------------------------------------------------------------------------------
# SentencePiece ("llama" vocabulary) trained here
# --------------------------------------------------------------------------------------------

SPM_CRAFTED = ["<s>inside</s> text <tool> x", "  two spaces", "tab\there\nnew line", " <s> ", "</s>"]


def _train_spm(model_type: str) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    lines = [ln for ln in wiki_text()[:600_000].split("\n") if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type=model_type, vocab_size=3000,
        byte_fallback=True, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, user_defined_symbols=["<tool>"],
        character_coverage=0.9995, num_threads=1, minloglevel=2,
    )
    return buf.getvalue()


def write_spm_gguf(path: Path, model_proto: bytes, *, add_space_prefix: bool | None = None,
                   add_bos: bool | None = None) -> Path:
    """A vocabulary-only GGUF with a ``llama`` (SentencePiece) vocabulary, as
    convert_hf_to_gguf.py writes one: pieces, scores, token types, special ids."""
    import gguf
    import sentencepiece as spm

    T = gguf.GGUFValueType
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]

    def ttype(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        if sp.is_unused(i):
            return 5
        return 4 if pieces[i] == "<tool>" else 1

    with GGUFStreamWriter(path, "llama") as w:
        w.add_kv("general.architecture", KV("llama", T.STRING))
        for k, v in [("context_length", 256), ("embedding_length", 64), ("block_count", 1),
                     ("feed_forward_length", 128), ("attention.head_count", 4), ("attention.head_count_kv", 4)]:
            w.add_kv(f"llama.{k}", KV(v, T.UINT32))
        w.add_kv("llama.attention.layer_norm_rms_epsilon", KV(1e-5, T.FLOAT32))
        w.add_kv("tokenizer.ggml.model", KV("llama", T.STRING))
        w.add_kv("tokenizer.ggml.tokens", KV(pieces, T.ARRAY, T.STRING))
        w.add_kv("tokenizer.ggml.scores", KV([sp.get_score(i) for i in range(n)], T.ARRAY, T.FLOAT32))
        w.add_kv("tokenizer.ggml.token_type", KV([ttype(i) for i in range(n)], T.ARRAY, T.INT32))
        w.add_kv("tokenizer.ggml.bos_token_id", KV(sp.bos_id(), T.UINT32))
        w.add_kv("tokenizer.ggml.eos_token_id", KV(sp.eos_id(), T.UINT32))
        w.add_kv("tokenizer.ggml.unknown_token_id", KV(sp.unk_id(), T.UINT32))
        if add_space_prefix is not None:
            w.add_kv("tokenizer.ggml.add_space_prefix", KV(add_space_prefix, T.BOOL))
        if add_bos is not None:
            w.add_kv("tokenizer.ggml.add_bos_token", KV(add_bos, T.BOOL))
    return path


@pytest.fixture(scope="module")
def spm_protos() -> dict[str, bytes]:
    return {mt: _train_spm(mt) for mt in ("bpe", "unigram")}


SPM_CASES = [("bpe", None, None), ("unigram", None, None), ("bpe", False, False)]


@pytest.mark.parametrize("model_type,space_prefix,add_bos", SPM_CASES)
def test_sentencepiece_vocab_matches_llama_cpp(tmp_path, spm_protos, model_type, space_prefix, add_bos):
    path = write_spm_gguf(tmp_path / "spm.gguf", spm_protos[model_type], add_space_prefix=space_prefix,
                          add_bos=add_bos)
    tok = Tokenizer.from_gguf(path)
    assert tok.add_bos is (add_bos is not False)
    texts = SPM_CRAFTED + passages(150, seed=7)
    for parse in (True, False):
        bad = mismatches(tok, path, texts, parse_special=parse)
        assert not bad, f"{model_type} (parse_special={parse}): {len(bad)} differ, first: {bad[0]}"
    big = wiki_text()[:100_000]
    assert tok.encode(big) == oracle.llama_tokenize(path, big)


@pytest.mark.parametrize("kind", ["gpt2", "spm"])
def test_decode_round_trip(tmp_path, spm_protos, kind):
    if kind == "gpt2":
        tok, path = smollm2_tokenizer(), smollm2_path()
    else:
        path = write_spm_gguf(tmp_path / "spm.gguf", spm_protos["bpe"])
        tok = Tokenizer.from_gguf(path)
    for t in passages(100, seed=3):
        ids = tok.encode(t, add_special=False)
        back = tok.decode(ids)
        assert back == t
        assert back == oracle.llama_detokenize(path, ids)


# --------------------------------------------------------------------------------------------
# Hugging Face files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "spm"])
def test_hf_files_round_trip(tmp_path, spm_protos, kind):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        tok = smollm2_tokenizer()
    else:
        tok = Tokenizer.from_gguf(write_spm_gguf(tmp_path / "spm.gguf", spm_protos["unigram"]))
    out = tmp_path / "hf"
    written = tok.to_hf_files(out)
    assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg.get("chat_template") == tok.chat_template
    assert cfg["bos_token"] == tok.bos_token and cfg["eos_token"] == tok.eos_token

    again = Tokenizer.from_hf_dir(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (again.bos_id, again.eos_id, again.add_bos, again.chat_template) == (
        tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)
    assert set(tok.eos_ids) <= set(again.eos_ids)
    for t in SPM_CRAFTED + passages(40, seed=11):
        ids = tok.encode(t)
        assert again.encode(t) == ids
        assert hf(t)["input_ids"] == ids
        assert hf.decode(ids) == tok.decode(ids)


def test_hf_dir_reads_generation_config_eos(tmp_path):
    smollm2_tokenizer().to_hf_files(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    assert Tokenizer.from_hf_dir(tmp_path).eos_ids == [0, 2, 4]
    assert load_tokenizer(tmp_path).eos_ids == [0, 2, 4]


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _meta(**over):
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<eos>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 3,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_tiny_metadata_dict_builds():
    tok = Tokenizer.from_gguf(_meta())
    assert tok.encode("abab<eos>") == [2, 2, 3]
    assert tok.eos_ids == [3]


@pytest.mark.parametrize("over,needle", [
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "bert"}, "'bert'"),
    ({"tokenizer.ggml.pre": "no-such-pre"}, "tokenizer.ggml.pre"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["a c"]}, "merge"),
    ({"tokenizer.ggml.merges": ["ab"]}, "merges[0]"),
    ({"tokenizer.ggml.eos_token_id": 99}, "eos_token_id=99"),
    ({"tokenizer.ggml.tokens": ["a", "a", "ab", "<eos>"]}, "duplicate"),
    ({"tokenizer.ggml.token_type": [1]}, "token_type"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.scores"),
])
def test_bad_metadata_names_the_field(over, needle):
    with pytest.raises(FormatError) as e:
        Tokenizer.from_gguf(_meta(**over))
    assert needle in str(e.value)


def test_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FormatError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(QuantbenchError, match="vocabulary has 49152"):
        smollm2_tokenizer().decode([1, 49152])


# --------------------------------------------------------------------------------------------
# the oracle itself
# --------------------------------------------------------------------------------------------


def test_llama_cpp_logits_oracle_smoke():
    """llama_logits on SmolLM2's Q4_1 file for 16 tokens: a real language model's logits."""
    path = smollm2_path()
    toks = oracle.llama_tokenize(path, wiki_text()[1000:3000])[:16]
    assert len(toks) == 16
    logits = oracle.llama_logits(path, toks, use_cache=False)
    assert logits.shape == (16, 49152) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # causal: a prefix run gives the same rows
    head = oracle.llama_logits(path, toks[:8], use_cache=False)
    np.testing.assert_allclose(head, logits[:8], atol=2e-3, rtol=0)
    # it predicts wiki text far better than chance (uniform: ln 49152 = 10.8 nats)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = (lse[:-1] - logits[np.arange(15), toks[1:]]).mean()
    assert nll < 6.0, nll
    # greedy decoding starts from the argmax of the last row
    greedy = oracle.llama_greedy(path, toks, 3, use_cache=False)
    assert len(greedy) == 3 and greedy[0] == int(np.argmax(logits[-1]))
    # the disk cache holds what a fresh run computes
    oracle.llama_logits(path, toks)
    assert np.array_equal(oracle.llama_logits(path, toks), logits)
