"""mistral.rs ISQ planning rules: names, shorthand, promotion, shape fallbacks, module choice.

The expected values are what mistral.rs 0.9.5 does (its ``parse_isq_value`` error message, its
``promote_for_sensitive_tensor`` and ``get_fallback``); the job tests compare whole plans with
the reports the real wheel writes.
"""

from __future__ import annotations

import pytest

from quantbench.errors import QuantbenchError, UnknownTypeError
from quantbench.plan.isq import (
    find_modules,
    ggml_for_row_length,
    parse_isq,
    parse_isq_list,
    plan_layer,
    promote_for_sensitive_tensor,
)
from quantbench.plan.topology import Topology
from tests.formats import llama_tensors


@pytest.mark.parametrize("spec,label", [
    ("2", "q2k"), ("3", "q3k"), ("4", "q4k"), ("5", "q5k"), ("6", "q6k"), ("8", "q8_0"),
    ("Q4K", "q4k"), ("q4_0", "q4_0"), ("Q8_1", "q8_1"), ("fp8", "fp8"), ("F8E4M3", "fp8"),
    ("HQQ4", "hqq4"), ("afq3", "afq3"), ("MXFP4", "mxfp4"), ("f8q8", "f8q8"),
])
def test_names_and_shorthand(spec, label):
    assert parse_isq(spec).label == label


def test_unknown_names_list_the_choices():
    for bad in ("q4_k", "Q7K", "HQQ3", "7", ""):
        with pytest.raises(UnknownTypeError, match="unknown, choose one of 2, 3, 4, 5, 6, 8, Q4_0"):
            parse_isq(bad)
    with pytest.raises(UnknownTypeError, match="F8Q8 is CPU-only"):
        parse_isq("f8q8", device="cuda")
    assert [t.label for t in parse_isq_list(["q4k,8", "hqq4"])] == ["q4k", "q8_0", "hqq4"]
    with pytest.raises(QuantbenchError, match="requested twice"):
        parse_isq_list("q8_0,8")


def test_promotion_table():
    want = {"q2k": "q6k", "q3k": "q6k", "q4k": "q6k", "q4_0": "q6k", "q4_1": "q6k",
            "q5k": "q8_0", "q6k": "q8_0", "q8k": "q8_0", "q5_0": "q8_0", "q5_1": "q8_0", "q8_0": "q8_0", "q8_1": "q8_0",
            "afq2": "afq6", "afq3": "afq6", "afq4": "afq6", "afq6": "afq8", "afq8": "afq8",
            "hqq4": "hqq4", "hqq8": "hqq8", "fp8": "fp8", "f8q8": "f8q8", "mxfp4": "mxfp4"}
    assert {k: promote_for_sensitive_tensor(parse_isq(k)).label for k in want} == want


def test_shape_fallbacks():
    assert ggml_for_row_length("Q4_K", 4096) == ("Q4_K", "")
    assert ggml_for_row_length("Q4_K", 288)[0] == "Q4_1"
    assert ggml_for_row_length("Q2_K", 288)[0] == "Q4_0"
    assert ggml_for_row_length("Q3_K", 288)[0] == "Q4_0"
    assert ggml_for_row_length("Q5_K", 288)[0] == "Q5_0"
    assert ggml_for_row_length("Q6_K", 288)[0] == "Q5_1"
    assert ggml_for_row_length("Q8_K", 288)[0] == "Q8_1"
    t, why = ggml_for_row_length("Q4_K", 304)
    assert t is None and "tensor is not quantizable" in why and "Q4_1's block of 32" in why
    assert ggml_for_row_length("Q8_0", 48)[0] is None


def _shapes(**kw):
    return {k: tuple(v.shape) for k, v in llama_tensors(**kw).items()}


def test_llama_modules_and_promotion():
    mods = find_modules(_shapes(layers=2))
    keys = [m.key for m in mods]
    assert keys == sorted(keys) and len(keys) == 2 * 7 + 2
    assert "model.embed_tokens" in keys and "lm_head" in keys and "model.norm" not in keys
    t = parse_isq("q4k")
    plans = {m.key: plan_layer(m, t) for m in mods}
    assert plans["lm_head"].stored == plans["model.embed_tokens"].stored == "q6k"
    assert plans["model.layers.1.self_attn.k_proj"].stored == "q4k"
    tied = [m.key for m in find_modules(_shapes(layers=1, tied=True))]
    assert "lm_head" not in tied and "model.embed_tokens" in tied


def test_explicit_topology_types_are_not_promoted():
    mods = {m.key: m for m in find_modules(_shapes(layers=2))}
    topo = Topology.from_str("'/embed_tokens/':\n  isq: Q4_0\n0:\n  isq: Q5K\n")
    t = parse_isq("q4k")
    assert plan_layer(mods["model.embed_tokens"], t, topo).stored == "q4_0"
    assert plan_layer(mods["lm_head"], t, topo).stored == "q6k"
    assert plan_layer(mods["model.layers.0.mlp.up_proj"], t, topo).stored == "q5k"
    assert plan_layer(mods["model.layers.1.mlp.up_proj"], t, topo).stored == "q4k"


def test_experts_are_stacked_and_moqe_keeps_only_them():
    shapes = {"model.embed_tokens.weight": (64, 32), "lm_head.weight": (64, 32),
              "model.layers.0.self_attn.q_proj.weight": (32, 32), "model.layers.0.mlp.gate.weight": (4, 32)}
    for e in range(4):
        for proj, s in (("gate_proj", (48, 32)), ("up_proj", (48, 32)), ("down_proj", (32, 48))):
            shapes[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = s
    mods = {m.key: m for m in find_modules(shapes)}
    assert mods["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 48)
    assert mods["model.layers.0.mlp.experts.gate_proj"].sources[3] == "model.layers.0.mlp.experts.3.gate_proj.weight"
    assert "model.layers.0.mlp.gate" not in mods  # the router stays in the residual
    moqe = [m.key for m in find_modules(shapes, "moqe")]
    assert moqe == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_proj",
                    "model.layers.0.mlp.experts.up_proj"]
    with pytest.raises(QuantbenchError, match="moqe quantizes routed experts only, and this model has none"):
        find_modules(_shapes(layers=1), "moqe")
    with pytest.raises(QuantbenchError, match="expected 'default' or 'moqe'"):
        find_modules(shapes, "experts")
    del shapes["model.layers.0.mlp.experts.2.up_proj.weight"]
    shapes["model.layers.0.mlp.experts.2.up_proj.weight"] = (40, 32)
    with pytest.raises(QuantbenchError, match="experts differ in shape"):
        find_modules(shapes)
