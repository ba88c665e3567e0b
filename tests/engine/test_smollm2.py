"""The engine on the real SmolLM2-135M against llama.cpp itself: logits, PPL, greedy text (KLD: test_smollm2_kl.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantbench.engine import load_model
from quantbench.engine.generate import generate
from quantbench.engine.perplexity import evaluate
from tests import llama_tools
from tests.engine import smollm2_case as case
from tests.oracles import llama_cpp_py

pytestmark = pytest.mark.oracle
WIKI = case.WIKI


@pytest.fixture(scope="module")
def f32_path() -> Path:
    return case.f32_path()


@pytest.fixture(scope="module")
def passage(f32_path) -> list[int]:
    return case.passage(f32_path)


@pytest.fixture(scope="module")
def f32_model(f32_path):
    return load_model(f32_path)


def test_f32_logits_match_llama_cpp(f32_path, f32_model, passage):
    ref = llama_cpp_py.llama_logits(f32_path, passage)
    ours = case.logits(f32_model, passage)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-2


def test_perplexity_matches_llama_perplexity(f32_path, f32_model):
    ours = evaluate(f32_model, WIKI.read_text(encoding="utf-8"), ctx=512, chunks=20)
    ref = llama_tools.llama_perplexity(f32_path, WIKI, chunks=20, ctx=512, f32_kv=True)
    assert ours.n_chunks == 20
    assert abs(ours.ppl - ref) / ref < 0.005, (ours.ppl, ref)


def test_greedy_generation_matches_llama_cpp(f32_path, f32_model):
    tok = f32_model.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}]),
                        add_special=False)
    ref = llama_cpp_py.llama_greedy(f32_path, prompt, 32)
    ours = generate(f32_model, prompt, 32).tokens
    assert ours == ref
