"""mistral.rs topology YAML: selectors, precedence and errors (the job tests compare a resolved
topology with the report the real mistral.rs wheel writes)."""

from __future__ import annotations

import pytest

from quantbench.errors import FormatError, UnknownTypeError
from quantbench.plan.topology import Topology


def _isq(topo, name, layer):
    t = topo.isq_for(name, layer)
    return t.label if t else None


def test_ranges_apply_by_end_then_declaration():
    topo = Topology.from_str("0-4:\n  isq: Q4K\n2-6:\n  isq: Q6K\n")
    assert [_isq(topo, "x.weight", i) for i in range(7)] == ["q4k", "q4k", "q6k", "q6k", "q6k", "q6k", None]
    topo = Topology.from_str("2-4:\n  isq: Q3K\n0-4:\n  isq: Q4K\n")  # same end: the later declaration wins
    assert [_isq(topo, "x.weight", i) for i in range(4)] == ["q4k"] * 4
    topo = Topology.from_str("0-4:\n  isq: Q4K\n2-4:\n  isq: Q3K\n")
    assert [_isq(topo, "x.weight", i) for i in range(4)] == ["q4k", "q4k", "q3k", "q3k"]
    topo = Topology.from_str("5:\n  isq: 8\n")
    assert _isq(topo, "x", 5) == "q8_0" and _isq(topo, "x", 4) is None


def test_regex_last_wins_and_beats_ranges():
    topo = Topology.from_str("'/ffn\\./':\n  isq: Q4K\n'/ffn\\.weight$/':\n  isq: Q6K\n0-9:\n  isq: Q8_0\n"
                             "'/attn/':\n  device: cuda[1]\n")
    assert _isq(topo, "model.layers.2.ffn.weight", 2) == "q6k"
    assert _isq(topo, "model.layers.2.ffn.bias", 2) == "q4k"
    assert _isq(topo, "model.layers.2.mlp.weight", 2) == "q8_0"
    assert _isq(topo, "model.layers.3.attn.weight", 3) == "q8_0"  # a regex without isq leaves the range's
    assert topo.match_for_name("model.layers.3.attn.weight").device == "cuda[1]"
    assert Topology.from_str("").isq_for("a", 0) is None


@pytest.mark.parametrize("yaml_text,err,match", [
    ("'/mlp\\.(down/':\n  isq: Q4K\n", FormatError, r"selector '/mlp.*down/': invalid topology regex .*missing \)"),
    ("0-4:\n  isq: Q7K\n", UnknownTypeError, r"selector '0-4': ISQ type 'Q7K' unknown"),
    ("4-2:\n  isq: Q4K\n", FormatError, r"range end must be > start, got 2 <= 4"),
    ("a-b:\n  isq: Q4K\n", FormatError, r"a selector is START-END, a layer number N, or /regex/"),
    ("0-2:\n  device: gpu0\n", FormatError, r"device 'gpu0' must match"),
    ("0-2:\n  isq: Q4K\n  dtype: f16\n", FormatError, r"unknown field\(s\) \['dtype'\]"),
    ("- 0-2\n", FormatError, r"a topology is a mapping"),
    ("0-2: [\n", FormatError, r"not valid YAML"),
])
def test_bad_topologies(yaml_text, err, match):
    with pytest.raises(err, match=match):
        Topology.from_str(yaml_text, source="topo.yml")


def test_from_path_names_the_file(tmp_path):
    p = tmp_path / "t.yml"
    p.write_text("0-2:\n  isq: nope\n")
    with pytest.raises(UnknownTypeError, match=r"t.yml: selector '0-2'"):
        Topology.from_path(p)
    with pytest.raises(FormatError, match="cannot read topology file"):
        Topology.from_path(tmp_path / "missing.yml")
