"""Deterministic sentences from WikiText's raw files (``wiki.test.raw``) for embedding benchmarks.

WikiText-2 raw is tokenized text: one paragraph per line, punctuation set off by spaces
(``actor . He``), headings as `` = Title = `` / `` = = Section = = ``, and number separators
written ``@-@``, ``@,@``, ``@.@``. A sentence ends at a standalone ``.``, ``!`` or ``?`` token;
the ``@x@`` separators are joined back (``two @-@ part`` -> ``two-part``) because BERT's tokenizer
would otherwise see stray ``@`` characters. Spacing around other punctuation is left alone: BERT's
pre-tokenizer splits punctuation from words, so ``actor .`` and ``actor.`` tokenize identically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from quantbench.errors import FormatError, InputValueError

_HEADING = re.compile(r"^\s*=(\s*=)*\s.*\s=(\s*=)*\s*$")
_AT_SEP = re.compile(r" @([-,.])@ ")
_END = re.compile(r"(?<= [.!?]) (?=\S)")


def paragraph_sentences(line: str) -> list[str]:
    """Sentences of one WikiText paragraph line, separators rejoined, whitespace trimmed."""
    text = _AT_SEP.sub(r"\1", " " + line.strip() + " ").strip()
    return [s.strip() for s in _END.split(text) if s.strip()]


def iter_wikitext_sentences(path: str | Path, min_words: int = 4) -> Iterator[str]:
    """Every sentence of ``path`` in file order, skipping headings, blank lines and sentences of
    fewer than ``min_words`` space-separated tokens (stray fragments like ``" .``)."""
    p = Path(path)
    try:
        fh = p.open(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{p}: no such text file") from None
    with fh:
        try:
            for line in fh:
                if not line.strip() or _HEADING.match(line):
                    continue
                for s in paragraph_sentences(line):
                    if len(s.split()) >= min_words:
                        yield s
        except UnicodeDecodeError as e:
            raise FormatError(f"{p}: not UTF-8 text ({e})") from None


def wikitext_sentences(path: str | Path, n: int | None = None, min_words: int = 4) -> list[str]:
    """The first ``n`` sentences of ``path`` (all when ``n`` is None); fewer available is an error
    so a benchmark never silently runs on less text than it reports."""
    if n is not None and n <= 0:
        raise InputValueError(f"number of sentences must be positive, got {n}")
    out: list[str] = []
    for s in iter_wikitext_sentences(path, min_words):
        out.append(s)
        if n is not None and len(out) == n:
            break
    if not out:
        raise InputValueError(f"{path}: no sentences found (is it WikiText raw text?)")
    if n is not None and len(out) < n:
        raise InputValueError(f"{path}: only {len(out)} sentences of at least {min_words} words, {n} requested")
    return out
