"""Llama-family Q/K biases are row-permuted in GGUF like their weights; loading must undo both."""

from __future__ import annotations

import torch

from quantbench.engine import load_model
from quantbench.jobs.convert import convert
from tests.formats import make_tokenizer


def test_llama_attention_bias_survives_gguf(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, attention_bias=True)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    for n, p in m.named_parameters():
        if n.endswith("bias"):
            p.data.normal_()
    m.save_pretrained(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf", 512)
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "f32")
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        ref = m(x).logits
        got = load_model(tmp_path / "m.gguf", with_tokenizer=False).model(x)
    assert (got - ref).abs().max() < 1e-4
