"""Tokenizers for the engine, rebuilt with the ``tokenizers`` library.

A GGUF carries no ``tokenizer.json``: only llama.cpp's ``tokenizer.ggml.*`` metadata.  We turn
that metadata back into a ``tokenizers.Tokenizer`` whose ids equal llama.cpp's own tokenization
(llama-vocab.cpp), because the engine is judged against llama.cpp's logits and the prompt ids must
be the same for that comparison to mean anything:

* ``gpt2`` vocabularies (byte-level BPE): the merges are in the file; the pre-tokenizer is the
  chain of regexes llama.cpp selects by ``tokenizer.ggml.pre``, each applied to the pieces of the
  previous one ("isolated" splits), then GPT-2's byte-to-unicode mapping.  Where llama.cpp had to
  rewrite a Hugging Face regex for std::regex we use llama.cpp's spelling, since llama.cpp is the
  reference here.
* ``llama`` vocabularies (SentencePiece): llama.cpp does not run SentencePiece; it merges adjacent
  symbols whose concatenation is a token, best token score first, over the whole text (no word
  splitting), then falls back to ``<0xXX>`` byte tokens.  A ``tokenizers`` BPE model with merges
  ranked by the merged token's score, no pre-tokenizer and byte fallback does exactly that.
  The optional space prefix is added to every text segment between special tokens (llama.cpp
  adds it after each special token), which a ``Prepend`` normalizer reproduces.

A Hugging Face directory is loaded from its own ``tokenizer.json`` plus ``tokenizer_config.json``
(bos/eos/chat template) and ``generation_config.json`` (extra end-of-generation ids).
``Tokenizer.to_hf_files`` writes the same pair of files back out, so the UQFF/HF writers can ship
a tokenizer with every artifact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from quantbench.errors import FormatError, QuantbenchError
from quantbench.formats.atomic import atomic_output

# llama.cpp token types (gguf TokenType)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp treats as end-of-generation (and forces to CONTROL) whatever their type.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})

# ---- pre-tokenizer regexes, as llama-vocab.cpp (llm_tokenizer_bpe) spells them --------------
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_UPPERISH = r"((?=[\p{L}])([^a-z]))"  # llama.cpp's stand-in for [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
_LOWERISH = r"((?=[\p{L}])([^A-Z]))"  # ... and for [\p{Ll}\p{Lm}\p{Lo}\p{M}]
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?" + _UPPERISH + "*" + _LOWERISH + r"+|[^\r\n\p{L}\p{N}]?" + _UPPERISH + "+"
           + _LOWERISH + r"*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPERISH + "*" + _LOWERISH + "+" + _CONTRACTIONS + r"?|[^\r\n\p{L}\p{N}]?"
          + _UPPERISH + "+" + _LOWERISH + "*" + _CONTRACTIONS
          + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]


class _Pre:
    """What one ``tokenizer.ggml.pre`` value means to llama.cpp."""

    def __init__(self, regexes: list[str], *, ignore_merges: bool = False, add_bos: bool = False) -> None:
        self.regexes = regexes
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos  # llama.cpp's default before tokenizer.ggml.add_bos_token overrides it


def _pre_table() -> dict[str, _Pre]:
    t: dict[str, _Pre] = {}

    def put(names: str, pre: _Pre) -> None:
        for n in names.split():
            t[n] = pre

    put("default", _Pre([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]))
    put("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        _Pre([_LLAMA3], ignore_merges=True, add_bos=True))
    put("dbrx smaug-bpe chatglm-bpe", _Pre([_LLAMA3]))
    put("glm4 glm5", _Pre([_LLAMA3], ignore_merges=True))
    put("falcon", _Pre([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]))
    put("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", _Pre([r"\p{N}", _GPT2]))
    put("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo "
        "jais trillion granite-docling exaone4", _Pre([_GPT2]))
    put("qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 megrez hunyuan solar-open", _Pre([_QWEN2]))
    put("qwen35", _Pre([_QWEN35]))
    put("tekken", _Pre([_TEKKEN], ignore_merges=True, add_bos=True))
    put("gpt-4o llama4 kanana2 talkie minimax-m2", _Pre([_GPT4O]))
    put("deepseek-v3 hunyuan-dense joyai-llm hy_v4", _Pre(list(_DEEPSEEK3)))
    put("seed-coder", _Pre([_SEED_CODER]))
    put("grok-2", _Pre([_QWEN2]))
    return t


PRE_TOKENIZERS = _pre_table()


def _meta_value(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = meta.get(key, default)
    return getattr(v, "value", v)  # quantbench.formats.gguf.KV or a plain value


class Tokenizer:
    """One tokenizer for the engine, whatever it was built from.

    ``hf`` is the underlying ``tokenizers.Tokenizer``; its post-processor adds BOS/EOS exactly when
    the source says to, so ``encode(text)`` and a Hugging Face ``AutoTokenizer`` built from
    ``to_hf_files`` agree.
    """

    def __init__(self, hf: HFTokenizer, *, bos_token: str | None, eos_token: str | None,
                 add_bos: bool, add_eos: bool, eos_ids: list[int] | None = None,
                 unk_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, source: str = "") -> None:
        self.hf = hf
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.bos_id = self._id_of(bos_token, "bos_token")
        self.eos_id = self._id_of(eos_token, "eos_token")
        ids = ([self.eos_id] if self.eos_id is not None else []) + list(eos_ids or [])
        self.eos_ids: list[int] = sorted(dict.fromkeys(ids))

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        i = self.hf.token_to_id(token)
        if i is None:
            raise FormatError(f"{self.source}: {what} {token!r} is not in the vocabulary")
        return i

    # ------------------------------------------------------------------ basic operations
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_special`` adds BOS/EOS where the vocabulary asks for them (llama.cpp's
        ``add_special``); ``parse_special`` turns control tokens written in the text, such as
        ``<|im_start|>`` in a rendered chat template, into their ids (llama.cpp's
        ``parse_special``).  User-defined tokens are always matched whole, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise QuantbenchError(f"tokenizer input must be a str, got {type(text).__name__}")
        if parse_special:
            return self.hf.encode(text, add_special_tokens=add_special).ids
        old = self.hf.encode_special_tokens
        self.hf.encode_special_tokens = True
        try:
            return self.hf.encode(text, add_special_tokens=add_special).ids
        finally:
            self.hf.encode_special_tokens = old

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < n]
        if bad:
            raise QuantbenchError(f"cannot decode token ids {bad[:5]}: vocabulary has {n} tokens")
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The rendered chat prompt (see ``quantbench.engine.chat.render_chat``)."""
        from quantbench.engine.chat import render_chat

        return render_chat(self, messages, add_generation_prompt=add_generation_prompt, **extra)

    # ------------------------------------------------------------------ HF files
    def to_hf_files(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        out = [d / "tokenizer.json", d / "tokenizer_config.json"]
        with atomic_output(out[0]) as tmp:
            tmp.write_text(self.hf.to_str(pretty=False), encoding="utf-8")
        with atomic_output(out[1]) as tmp:
            tmp.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        return out

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf(cls, source: Any) -> "Tokenizer":
        """From a GGUF path, a ``GGUFFile`` (``quantbench.formats.gguf``) or its metadata dict."""
        if isinstance(source, (str, os.PathLike)):
            from quantbench.formats.gguf import read_gguf

            g = read_gguf(source)
            meta, name = g.metadata, str(g.path)
        elif hasattr(source, "metadata"):
            meta, name = source.metadata, str(getattr(source, "path", "<gguf>"))
        elif isinstance(source, Mapping):
            meta, name = source, "<gguf metadata>"
        else:
            raise QuantbenchError(f"cannot build a tokenizer from {type(source).__name__}")
        return _from_gguf_metadata(meta, name)

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike[str]) -> "Tokenizer":
        """From a Hugging Face model directory (``tokenizer.json`` + configs)."""
        return _from_hf_dir(Path(directory))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids}, "
                f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})")


# ======================================================================================
# GGUF
# ======================================================================================


def _post_processor(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool,
                    ids: dict[str, int]) -> Any:
    """``<bos> $A <eos>`` as far as the flags ask; ``None`` when nothing is added."""
    head = [bos] if add_bos and bos is not None else []
    tail = [eos] if add_eos and eos is not None else []
    if not head and not tail:
        return None
    single = head + ["$A:0"] + tail
    pair = single + head + ["$B:1"] + tail
    special = [(t, ids[t]) for t in dict.fromkeys(head + tail)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def _from_gguf_metadata(meta: Mapping[str, Any], name: str) -> Tokenizer:
    model = _meta_value(meta, "tokenizer.ggml.model")
    if model is None:
        raise FormatError(f"{name}: no tokenizer.ggml.model key: the file carries no tokenizer")
    tokens = _meta_value(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise FormatError(f"{name}: tokenizer.ggml.tokens is missing or empty")
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    types = _meta_value(meta, "tokenizer.ggml.token_type")
    if types is None:
        types = [TT_NORMAL] * n
    types = [int(x) for x in types]
    if len(types) < n:
        raise FormatError(f"{name}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    if len(set(tokens)) != n:
        raise FormatError(f"{name}: tokenizer.ggml.tokens holds duplicate token texts")

    def special_id(key: str) -> int | None:
        v = _meta_value(meta, f"tokenizer.ggml.{key}")
        if v is None:
            return None
        v = int(v)
        if v == -1 or v == 0xFFFFFFFF:
            return None
        if not 0 <= v < n:
            raise FormatError(f"{name}: tokenizer.ggml.{key}={v} is outside the vocabulary of {n} tokens")
        return v

    bos_i, eos_i = special_id("bos_token_id"), special_id("eos_token_id")
    unk_i, pad_i = special_id("unknown_token_id"), special_id("padding_token_id")
    extra_eog = [i for i in (special_id("eot_token_id"), special_id("eom_token_id")) if i is not None]

    if model == "gpt2":
        pre_name = _meta_value(meta, "tokenizer.ggml.pre") or "default"
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise FormatError(f"{name}: tokenizer.ggml.pre={pre_name!r} is not supported "
                              f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        hf = _bpe_gpt2(tokens, _meta_value(meta, "tokenizer.ggml.merges"), pre, name)
        add_bos_default = pre.add_bos
        if pre_name in ("chatglm-bpe", "glm4", "glm5"):
            bos_i = None  # llama.cpp drops BOS for these
    elif model == "llama":
        if unk_i is None and "<unk>" in tokens:
            unk_i = tokens.index("<unk>")
        add_prefix = bool(_meta_value(meta, "tokenizer.ggml.add_space_prefix", True))
        scores = _meta_value(meta, "tokenizer.ggml.scores")
        if scores is None or len(scores) < n:
            raise FormatError(f"{name}: a 'llama' (SentencePiece) vocabulary needs tokenizer.ggml.scores for all {n} tokens")
        hf = _bpe_spm(tokens, [float(s) for s in scores], None if unk_i is None else tokens[unk_i], add_prefix)
        add_bos_default = True
    else:
        raise FormatError(f"{name}: tokenizer.ggml.model={model!r} is not supported (supported: gpt2, llama)")

    _add_partition_tokens(hf, tokens, types)

    add_bos = bool(_meta_value(meta, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_meta_value(meta, "tokenizer.ggml.add_eos_token", False))
    bos = None if bos_i is None else tokens[bos_i]
    eos = None if eos_i is None else tokens[eos_i]
    if add_bos and bos is None:
        add_bos = False
    vocab_ids = {t: i for i, t in enumerate(tokens)}
    pp = _post_processor(bos, eos, add_bos, add_eos, vocab_ids)
    if pp is not None:
        hf.post_processor = pp
    eog = extra_eog + [i for i, t in enumerate(tokens) if t in EOG_TEXTS]
    template = _meta_value(meta, "tokenizer.chat_template")
    return Tokenizer(hf, bos_token=bos, eos_token=eos, add_bos=add_bos, add_eos=add_eos, eos_ids=eog,
                     unk_token=None if unk_i is None else tokens[unk_i],
                     pad_token=None if pad_i is None else tokens[pad_i],
                     chat_template=None if template is None else str(template), source=name)


def _add_partition_tokens(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Register the tokens llama.cpp cuts out of the text before tokenizing (its
    tokenizer_st_partition): control/unknown ones (and EOG-looking texts, which llama.cpp
    promotes to control) as special tokens, skipped when ``parse_special`` is off; user-defined
    ones as plain added tokens, always matched."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (TT_CONTROL, TT_UNKNOWN) or t in EOG_TEXTS]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TT_USER_DEFINED and t not in EOG_TEXTS]
    hf.add_special_tokens(special)
    hf.add_tokens(user)


def _bpe_gpt2(tokens: list[str], merges: Any, pre: _Pre, name: str) -> HFTokenizer:
    if not merges:
        raise FormatError(f"{name}: a 'gpt2' vocabulary needs tokenizer.ggml.merges")
    pairs = []
    for k, m in enumerate(merges):
        m = str(m)
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut < 0:
            raise FormatError(f"{name}: tokenizer.ggml.merges[{k}]={m!r} is not 'left right'")
        pairs.append((m[:cut], m[cut + 1:]))
    vocab = {t: i for i, t in enumerate(tokens)}
    missing = next(((a, b) for a, b in pairs if a not in vocab or b not in vocab or a + b not in vocab), None)
    if missing is not None:
        raise FormatError(f"{name}: merge {missing[0]!r} + {missing[1]!r} uses tokens that are not in the vocabulary")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges, fuse_unk=False,
                                byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every pair of tokens whose concatenation is a token, best merged-token score first.

    This is llama.cpp's SentencePiece merge rule (llm_tokenizer_spm_session::try_add_bigram) as a
    ranked merge list: it merges any two adjacent symbols that form a token, highest score first.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for t, i in vocab.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, k, a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def _bpe_spm(tokens: list[str], scores: list[float], unk: str | None, add_prefix: bool) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), unk_token=unk,
                                byte_fallback=True, fuse_unk=False))
    space = [normalizers.Replace(" ", "\u2581")]
    hf.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if add_prefix else []) + space)
    hf.pre_tokenizer = None
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    return hf


# ======================================================================================
# Hugging Face directory
# ======================================================================================


def _token_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, Mapping):
        return v.get("content")
    return str(v)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: unreadable JSON ({e})") from e


def _pick_template(t: Any, path: Path) -> str | None:
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):  # [{"name": ..., "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, Mapping)}
        return named.get("default") or next(iter(named.values()), None)
    raise FormatError(f"{path}: chat_template is neither a string nor a list of named templates")


def _from_hf_dir(d: Path) -> Tokenizer:
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise FormatError(f"{d}: no tokenizer.json (only fast-tokenizer directories are supported)")
    try:
        hf = HFTokenizer.from_file(str(tj))
    except Exception as e:
        raise FormatError(f"{tj}: not a valid tokenizers file ({e})") from e
    cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    unk, pad = _token_text(cfg.get("unk_token")), _token_text(cfg.get("pad_token"))
    template = _pick_template(cfg.get("chat_template"), d / "tokenizer_config.json")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (d / "chat_template.json").is_file():
        template = _pick_template(_read_json(d / "chat_template.json").get("chat_template"), d / "chat_template.json")

    # What the shipped post-processor already adds, unless the config states it (transformers
    # rebuilds the post-processor from add_bos_token/add_eos_token when they are given).
    probe = hf.encode("", add_special_tokens=True).ids
    bos_id = hf.token_to_id(bos) if bos else None
    eos_id = hf.token_to_id(eos) if eos else None
    add_bos = bool(cfg["add_bos_token"]) if "add_bos_token" in cfg else (bos_id is not None and bos_id in probe[:1])
    add_eos = bool(cfg["add_eos_token"]) if "add_eos_token" in cfg else (eos_id is not None and eos_id in probe[-1:])
    if "add_bos_token" in cfg or "add_eos_token" in cfg:
        ids = {t: i for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None and i is not None}
        pp = _post_processor(bos if bos_id is not None else None, eos if eos_id is not None else None,
                             add_bos, add_eos, ids)
        if pp is not None or not isinstance(hf.post_processor, processors.ByteLevel):
            hf.post_processor = pp

    eog: list[int] = []
    for extra in ("generation_config.json", "config.json"):
        if (d / extra).is_file():
            e = _read_json(d / extra).get("eos_token_id")
            eog += [int(x) for x in (e if isinstance(e, list) else [e]) if x is not None]
    added = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    eog += [hf.token_to_id(t) for t in added & EOG_TEXTS]
    return Tokenizer(hf, bos_token=bos if bos_id is not None else None, eos_token=eos if eos_id is not None else None,
                     add_bos=add_bos, add_eos=add_eos, eos_ids=eog, unk_token=unk, pad_token=pad,
                     chat_template=template, source=str(d))


@lru_cache(maxsize=4)
def _cached_gguf(path: str, mtime_ns: int) -> Tokenizer:  # noqa: ARG001 (mtime: cache key)
    return Tokenizer.from_gguf(path)


def load_tokenizer(source: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a GGUF file or a Hugging Face directory (cached per file version)."""
    p = Path(source)
    if p.is_dir():
        return Tokenizer.from_hf_dir(p)
    if p.is_file():
        return _cached_gguf(str(p.resolve()), p.stat().st_mtime_ns)
    raise QuantbenchError(f"{p}: no such file or directory")
