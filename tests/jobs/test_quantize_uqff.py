"""``quantize_uqff`` against the real mistral.rs 0.9.5 wheel on CPU: what it loads, what it
generates, what it plans; broken inputs; and memory that does not grow with the model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from quantbench.errors import FormatError, InputValueError, QuantbenchError, UnknownTypeError
from quantbench.formats.uqff import REPORT_NAME, UqffFile
from quantbench.jobs.quantize_uqff import quantize_uqff
from tests.formats import make_llama_dir, mistralrs, mistralrs_available

needs_mistralrs = pytest.mark.skipif(not mistralrs_available(), reason="needs mistralrs==0.9.5 (pip install mistralrs==0.9.5)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


def _tokens(model_dir, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def _layers(report_path) -> dict[str, tuple[str, str]]:
    out = json.loads(report_path.read_text())["outputs"][0]
    return {L["module"]: (L["resolved_target"], L["stored"]) for L in out["layer_details"]}


@needs_mistralrs
@pytest.mark.parametrize("isq", ["q8_0", "q4_0", "q6k", "q4k"])
def test_uqff_loads_in_mistralrs_and_generates_like_its_isq(tiny, tmp_path, isq):
    """Same plan, stored types and bytes as mistral.rs's own UQFF (Q8_0/Q4_0 from llama.cpp's
    reference quantizer, Q4K/Q6K from candle's K-quant search, as mistral.rs), loadable by
    mistral.rs, which then greedy-generates the same 32 tokens as from its own ISQ."""
    out = tmp_path / f"{isq}.uqff"
    rep = quantize_uqff(tiny, out, isq)
    mine = tmp_path / "mistral"
    want = mistralrs(tiny, isq=isq, write_uqff=mine / f"{isq}.uqff", max_tokens=32)
    assert _layers(tmp_path / REPORT_NAME) == _layers(mine / REPORT_NAME)  # same plan, same stored types
    assert rep.outputs[0].actual_counts == json.loads((mine / REPORT_NAME).read_text())["outputs"][0]["actual_counts"]
    got = mistralrs(tmp_path, from_uqff=f"{isq}-0.uqff", max_tokens=32)
    assert len(_tokens(tiny, got)) >= 16
    assert got == want
    with UqffFile(out) as ours, UqffFile(mine / f"{isq}.uqff") as theirs:
        assert {k: (L.label, L.shape) for k, L in ours.layers.items()} == {k: (L.label, L.shape) for k, L in theirs.layers.items()}
        stored = {L.label for L in ours.layers.values()}
        assert isq in stored
        for key in ours.layers:
            a, _ = ours.read_layer(key)
            b, _ = theirs.read_layer(key)
            assert torch.equal(a.data, b.data), key
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        [f"{isq}-0.uqff", "residual.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", REPORT_NAME])


@needs_mistralrs
def test_odd_shapes_fall_back_like_mistralrs(tmp_path):
    """Rows of 288/304: Q4K -> Q4_1 (K blocks need 256), promoted Q6K -> Q5_1, down_proj (304 is not
    a multiple of 32) -> F32; AFQ4 (group 64) -> unquantized everywhere. Every stored block is a
    legacy type here, so the text must match mistral.rs exactly."""
    model = make_llama_dir(tmp_path / "odd", hidden=288, inter=304)
    for isq in ("q4k", "afq4"):
        out = tmp_path / isq
        quantize_uqff(model, out / f"{isq}.uqff", isq)
        ref = tmp_path / f"ref-{isq}"
        want = mistralrs(model, isq=isq, write_uqff=ref / f"{isq}.uqff", max_tokens=24)
        assert _layers(out / REPORT_NAME) == _layers(ref / REPORT_NAME), isq
        ours = json.loads((out / REPORT_NAME).read_text())["outputs"][0]
        theirs = json.loads((ref / REPORT_NAME).read_text())["outputs"][0]
        assert ours["fallback_count"] == theirs["fallback_count"] > 0
        assert mistralrs(out, from_uqff=f"{isq}-0.uqff", max_tokens=24) == want


@needs_mistralrs
def test_topology_resolves_like_mistralrs(tiny, tmp_path):
    topo = tmp_path / "topo.yml"
    topo.write_text("0-2:\n  isq: Q8_0\n'/mlp\\.down/':\n  isq: Q4_0\n'/layers\\.1\\.mlp\\.down/':\n  isq: Q5_0\n"
                    "'/embed_tokens/':\n  isq: Q4_1\n1:\n  isq: 8\n")
    out = tmp_path / "ours"
    quantize_uqff(tiny, out / "q4k.uqff", "4", topology=topo)
    ref = tmp_path / "ref"
    want = mistralrs(tiny, isq="4", topology=topo, write_uqff=ref / "q4k.uqff", max_tokens=24)
    layers = _layers(out / REPORT_NAME)
    assert layers == _layers(ref / REPORT_NAME)
    assert layers["model.layers.1.mlp.down_proj"] == ("q5_0", "q5_0") and layers["lm_head"] == ("q6k", "q6k")
    got = mistralrs(out, from_uqff="q4k-0.uqff", max_tokens=24)
    assert got == want


@needs_mistralrs
def test_several_types_sharded_tied_bf16_sharded_source(tmp_path):
    """bf16 weights in a sharded HF checkpoint with tied embeddings; two outputs, each split in
    shards; mistral.rs finds them through uqff_report.json and by shard name."""
    src = make_llama_dir(tmp_path / "src", dtype=torch.bfloat16, tied=True, max_shard_bytes=200_000)
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    rep = quantize_uqff(src, out, ["q8_0", "q4_0"], shard_size=150_000)
    assert [o.quant for o in rep.outputs] == ["q8_0", "q4_0"]
    for o in rep.outputs:
        assert len(o.shards) > 1 and all((out / s).is_file() for s in o.shards)
        assert "lm_head" not in [L.module for L in o.layers]
    with UqffFile(out / "q8_0.uqff") as u:
        assert len(u.shards) == len(rep.outputs[0].shards)
    report = json.loads((out / REPORT_NAME).read_text())
    assert [o["quant"] for o in report["outputs"]] == ["q8_0", "q4_0"]
    for isq, name in (("q8_0", "q8_0"), ("q4_0", "q4_0-0.uqff")):
        assert mistralrs(out, from_uqff=name, max_tokens=24) == mistralrs(src, isq=isq, max_tokens=24), isq


def _assert_nothing_written(out_dir):
    assert not out_dir.exists() or sorted(p.name for p in out_dir.iterdir()) == []


def test_bad_inputs_leave_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    bad_regex = tmp_path / "bad.yml"
    bad_regex.write_text("'/mlp\\.(down/':\n  isq: Q4K\n")
    with pytest.raises(FormatError, match=r"bad.yml: selector .*invalid topology regex"):
        quantize_uqff(tiny, out / "q4k.uqff", "q4k", topology=bad_regex)
    bad_type = tmp_path / "type.yml"
    bad_type.write_text("0-2:\n  isq: Q7K\n")
    with pytest.raises(UnknownTypeError, match=r"type.yml: selector '0-2': ISQ type 'Q7K' unknown"):
        quantize_uqff(tiny, out / "q4k.uqff", "q4k", topology=bad_type)
    with pytest.raises(UnknownTypeError, match="ISQ type 'q9' unknown"):
        quantize_uqff(tiny, out / "q4k.uqff", "q9")
    with pytest.raises(QuantbenchError, match="must end in .uqff"):
        quantize_uqff(tiny, out / "q4k.bin", "q4k")
    with pytest.raises(QuantbenchError, match="requested twice"):
        quantize_uqff(tiny, out, "q4k,4")
    _assert_nothing_written(out)


def test_bad_weights_and_broken_sources_leave_nothing(tiny, tmp_path):
    from safetensors import safe_open

    sd = {k: safe_open(str(tiny / "model.safetensors"), "pt").get_tensor(k) for k in
          safe_open(str(tiny / "model.safetensors"), "pt").keys()}
    nan = tmp_path / "nan"
    nan.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (nan / f).write_bytes((tiny / f).read_bytes())
    bad = dict(sd)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].clone()
    bad["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(bad, str(nan / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(InputValueError, match="model.layers.1.mlp.up_proj.weight rows"):
        quantize_uqff(nan, out / "q8_0.uqff", "q8_0")
    _assert_nothing_written(out)

    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "config.json").write_bytes((tiny / "config.json").read_bytes())
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:10]}, str(dup / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[9:]}, str(dup / "model-00002-of-00002.safetensors"))
    with pytest.raises(FormatError, match=rf"'{names[9]}' appears in two shards"):
        quantize_uqff(dup, out / "q8_0.uqff", "q8_0")
    _assert_nothing_written(out)

    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_bytes((tiny / "config.json").read_bytes())
    data = (tiny / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        quantize_uqff(trunc, out / "q8_0.uqff", "q8_0")
    _assert_nothing_written(out)


# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss across
# fork/vfork + exec, so a child of a big pytest process would report the parent's peak.
_MEASURE = textwrap.dedent(
    """
    import sys, json
    import torch
    from quantbench.jobs.quantize_uqff import quantize_uqff
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    torch.set_num_threads(1)
    base = hwm()
    quantize_uqff(sys.argv[1], sys.argv[2], "q4_0")
    print(json.dumps({"base_kb": base, "peak_kb": hwm()}))
    """
)


def _random_model(path, layers, hidden=768, inter=2048, vocab=4096):
    """A bf16 Llama checkpoint written tensor by tensor (never whole in memory)."""
    from quantbench.formats.safetensors_dir import Entry, write_model_dir
    from tests.formats import llama_config

    path.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 4, hidden),
                   p + "self_attn.v_proj.weight": (hidden // 4, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    entries = [Entry(n, "BF16", s, (lambda s=s: [(torch.randn(s) * 0.02).bfloat16()])) for n, s in shapes.items()]
    write_model_dir(path, entries, max_shard_bytes=64 << 20)
    cfg = llama_config(hidden=hidden, inter=inter, layers=layers, heads=12, kv_heads=3, vocab=vocab, dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(cfg))
    return sum(torch.Size(s).numel() for s in shapes.values()) * 2


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """Scaled-down version of benchmarks/uqff_memory.py: 2 vs 8 layers (+~90 MB of bf16 weights);
    peak RSS of the quantizing process may grow by little more than noise."""
    peaks = {}
    sizes = {}
    for layers in (2, 8):
        src = tmp_path / f"m{layers}"
        sizes[layers] = _random_model(src, layers)
        # A fixed mmap threshold: glibc's dynamic one otherwise moves the peak by +-20 MB run to run
        # (measured); with it, the 2- and 8-layer peaks agree to < 1 MB.
        env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536",
               "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])}
        p = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / f"o{layers}" / "q4_0.uqff")],
                           capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        r = json.loads(p.stdout.strip().splitlines()[-1])
        peaks[layers] = r["peak_kb"] * 1024
    grew = peaks[8] - peaks[2]
    added = sizes[8] - sizes[2]
    assert added > 60e6
    assert peaks[2] > 100e6  # a real measurement (python + torch alone are more than this)
    assert grew < 0.25 * added, f"peaks {peaks}: peak RSS grew by {grew / 1e6:.0f} MB for {added / 1e6:.0f} MB more weights"


@pytest.fixture(scope="module")
def ranged(tiny, tmp_path_factory):
    """The tiny model with some tensors scaled past 1 and lone outliers of either sign, so that
    per-tensor FP8 scales are not all clamped (amax < 1 gives mistral.rs's maximum, 416) and
    group minima/maxima differ in magnitude (where MLX's AFQ and mistral.rs's part ways)."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("ranged") / "llama"
    shutil.copytree(tiny, out)
    (st,) = out.glob("*.safetensors")
    sd = load_file(st)
    sd["lm_head.weight"] = sd["lm_head.weight"] * 10
    w = sd["model.layers.0.mlp.down_proj.weight"] * 7
    w[3, 5] = -9.3
    sd["model.layers.0.mlp.down_proj.weight"] = w
    w = sd["model.layers.1.self_attn.q_proj.weight"] * 3
    w[0, 0], w[1, 1] = 5.1, -6.0
    sd["model.layers.1.self_attn.q_proj.weight"] = w
    save_file(sd, st, metadata={"format": "pt"})
    return out


@needs_mistralrs
@pytest.mark.parametrize("isq", ["fp8", "f8q8", "afq4", "afq3", "mxfp4", "hqq4", "hqq8"])
def test_data_free_uqff_matches_mistralrs_isq(ranged, tmp_path, isq):
    """UQFF from quantbench's data-free quantizers, run by mistral.rs: the same 32 greedy tokens
    as mistral.rs's own ISQ of the same type. FP8, F8Q8, AFQ and MXFP4 layers are also
    byte-identical to the UQFF mistral.rs writes (its rules: FP8 scale 416/amax in bf16, F8Q8
    scales x416, plain min/max AFQ; see quant/fp8.py, f8q8.py, afq.py). HQQ's proximal solver
    runs in float and ends within 0.1% of mistral.rs's (tests/quant/test_hqq.py), so only the
    text is compared there."""
    out = tmp_path / "ours"
    quantize_uqff(ranged, out / f"{isq}.uqff", isq)
    ref = tmp_path / "ref"
    want = mistralrs(ranged, isq=isq, write_uqff=ref / f"{isq}.uqff", max_tokens=32)
    got = mistralrs(out, from_uqff=f"{isq}-0.uqff", max_tokens=32)
    assert len(_tokens(ranged, want)) >= 16
    assert got == want
    if isq.startswith("hqq"):
        return
    with UqffFile(out / f"{isq}.uqff") as ours, UqffFile(ref / f"{isq}.uqff") as theirs:
        assert ours.layers.keys() == theirs.layers.keys()
        for key in ours.layers:
            a, _ = ours.read_layer(key)
            b, _ = theirs.read_layer(key)
            assert a.tensors.keys() == b.tensors.keys(), key
            for part in a.tensors:
                x, y = a.tensors[part], b.tensors[part]
                assert x.dtype == y.dtype and x.shape == y.shape, f"{key}.{part}"
                assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"{key}.{part}"
