"""quantbench's per-tensor type plan must equal what llama-quantize writes, tensor for tensor.

Each oracle case plans an F32 GGUF with the real ``llama-quantize --dry-run`` (built by
tests/oracles/build_llama_cpp.sh; the same ``llama_tensor_get_type`` path as a real run), reads
every tensor's type from its log, and compares it with ``plan_tensors``; the log also gives, per
tensor, whether it converts or copies the data, and the fallback count, compared too. Files that
llama-quantize really writes are compared byte for byte in tests/jobs. Results are cached under
``~/.cache/quantbench/plan`` keyed by input file, flags and the llama-quantize binary, so reruns
only re-plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from quantbench.errors import ImatrixError, UnknownTypeError
from quantbench.plan import FTYPES, TensorSpec, get_ftype, inputs_from_gguf, n_fallback, plan_tensors
from tests.plan.make_f32_gguf import (
    CACHE_DIR,
    SyntheticModel,
    make_f32_gguf,
    make_synthetic_gguf,
    smollm2_gguf,
    write_legacy_imatrix,
)

REQUIRED_FTYPES = [
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
    "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4_MOE", "F16", "BF16", "F32",
]
# ftypes whose mixture llama-quantize refuses to build without an importance matrix
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "Q2_K_S", "IQ3_XXS", "IQ3_XS"}

# 256-aligned rows, GQA 4, untied output, 16 layers so n/8 and n/16 and use_more_bits all bite
DENSE = SyntheticModel(n_layer=16, n_embd=256, n_ff=768, n_head=8, n_head_kv=2, n_vocab=512)
TIED = SyntheticModel(n_layer=4, n_embd=512, n_ff=1536, n_head=8, n_head_kv=8, n_vocab=512, tied=True, seed=1)
MOE8 = SyntheticModel(n_layer=8, n_embd=256, n_ff=256, n_head=4, n_head_kv=4, n_vocab=256,
                      n_expert=8, n_expert_used=2, seed=2)
MOE4 = SyntheticModel(n_layer=8, n_embd=256, n_ff=256, n_head=4, n_head_kv=4, n_vocab=256,
                      n_expert=4, n_expert_used=2, seed=3)
FALCON = SyntheticModel(arch="falcon", n_layer=16, n_embd=256, n_ff=1024, n_head=8, n_head_kv=1,
                        n_vocab=256, seed=4)
# 80 layers with GQA is what llama.cpp calls a 70B llama (attn_v gets bumped to Q5_K)
L70B = SyntheticModel(n_layer=80, n_embd=256, n_ff=256, n_head=8, n_head_kv=2, n_vocab=256, seed=5)

# llama-quantize --dry-run prints one line per tensor: "... type = f32, size = 108.00 MiB -> 28.69 MiB (q8_0)"
# for a tensor it converts, "... type = f32, size = 0.002 MiB" for one it copies.
_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^(]*(\((\S+)\))?")
_NEEDS_IMATRIX = "will require an imatrix"
_FALLBACK = re.compile(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback quantization")


# --------------------------------------------------------------------------------------------
# running the oracle
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_quantize() -> Path:
    from tests.oracles import ggml_lib

    path = ggml_lib.tool("llama-quantize")
    if path is None:
        pytest.fail(
            f"llama-quantize missing from {ggml_lib.BUILD_DIR}/bin: run tests/oracles/build_llama_cpp.sh "
            "(.ci/run does)")
    return path


@lru_cache(maxsize=None)
def _inputs(src: Path, file_id: str):
    """inputs_from_gguf, once per file: GGUFReader parses SmolLM2's 49k-token vocabulary each time."""
    return inputs_from_gguf(src)


def _file_id(p: Path) -> str:
    st = p.stat()
    return f"{p.name}|{st.st_size}|{st.st_mtime_ns}"


def _imatrix_for(src: Path) -> Path:
    """A positive random imatrix entry for every tensor of 2+ dims (ne[0]*ne[2] values, as llama-quantize checks)."""
    path = src.with_name(src.name + ".imatrix.dat")
    if path.exists():
        return path
    specs, _, _ = _inputs(src, _file_id(src))
    rng = np.random.default_rng(7)
    entries = {}
    for s in specs:
        if len(s.shape) >= 2 and s.name.endswith(".weight"):
            n = s.shape[0] * (s.shape[2] if len(s.shape) > 2 else 1)
            entries[s.name] = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
    return write_legacy_imatrix(path, entries)


_CACHE_VERSION = "3-dry-run"


def run_llama_quantize(exe: Path, src: Path, ftype: str, *, pure: bool = False, imatrix: bool = False) -> dict:
    """Plan ``src`` with ``llama-quantize --dry-run``; return rc (1 where it needs an imatrix), per-tensor
    types and convert/copy flags from its log, and the fallback count. Cached on disk."""
    imat = _imatrix_for(src) if imatrix else None
    imat_id = hashlib.sha256(imat.read_bytes()).hexdigest() if imat else "-"
    key = "|".join([_CACHE_VERSION, _file_id(exe), _file_id(src), ftype, str(pure), imat_id])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cached = CACHE_DIR / "llama-quantize-results" / f"{src.stem}.{ftype}.{digest}.json"
    if cached.exists():
        return json.loads(cached.read_text())

    # --dry-run plans without quantizing (the same llama_tensor_get_type code path), so the
    # whole ftype matrix costs seconds; the bytes and the written types are checked end to end
    # against real llama-quantize output in tests/jobs.
    cmd = [str(exe), "--dry-run"]
    if pure:
        cmd.append("--pure")
    if imat is not None:
        cmd += ["--imatrix", str(imat)]
    cmd += [str(src), ftype, str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    rc = proc.returncode if _NEEDS_IMATRIX not in log else 1
    result: dict = {"rc": rc, "cmd": " ".join(cmd)}
    if rc == 0:
        types_log, converted = {}, {}
        for line in log.splitlines():
            m = _LINE.match(line)
            if m:
                converted[m.group(1)] = m.group(3) is not None
                types_log[m.group(1)] = (m.group(4) or m.group(2)).upper()
        result.update(types_log=types_log, converted=converted)
        m = _FALLBACK.search(log)
        result["n_fallback"] = int(m.group(1)) if m else 0
    else:
        result["log_tail"] = log[-2000:]
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, cached)
    return result


def check_plan(exe: Path, src: Path, ftype: str, *, pure: bool = False, imatrix: bool = False) -> None:
    """plan_tensors == llama-quantize, including refusing where llama-quantize needs an imatrix."""
    specs, arch, metadata = _inputs(src, _file_id(src))
    try:
        plans = plan_tensors(specs, arch, metadata, ftype, pure=pure, has_imatrix=imatrix)
    except ImatrixError as e:
        plans, refusal = None, str(e)
    got = run_llama_quantize(exe, src, ftype, pure=pure, imatrix=imatrix)
    if plans is None:
        assert got["rc"] != 0, f"plan_tensors refused ({refusal}) but llama-quantize ran: {got['cmd']}"
        assert _NEEDS_IMATRIX in got["log_tail"], got["log_tail"]
        return
    assert got["rc"] == 0, f"llama-quantize failed: {got['cmd']}\n{got.get('log_tail', '')}"
    types = got["types_log"]
    wrong = [
        f"{p.name}: planned {p.target_type} ({p.reason}), llama-quantize wrote {types.get(p.name)}"
        for p in plans
        if types.get(p.name) != p.target_type
    ]
    assert not wrong, f"{len(wrong)} of {len(plans)} tensors differ for {ftype}:\n" + "\n".join(wrong[:40])
    assert set(types) == {p.name for p in plans}
    flags = [p.name for p in plans if got["converted"].get(p.name) != p.quantized]
    assert not flags, f"convert/copy decision differs for {flags[:10]}"
    assert got["n_fallback"] == n_fallback(plans)


def check_refused(exe: Path, src: Path, ftype: str) -> None:
    """Guard against a vacuous pass: these ftypes must be refused by both without an imatrix."""
    specs, arch, metadata = _inputs(src, _file_id(src))
    with pytest.raises(ImatrixError):
        plan_tensors(specs, arch, metadata, ftype)
    check_plan(exe, src, ftype)


# --------------------------------------------------------------------------------------------
# oracle cases
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_f32() -> Path:
    return make_f32_gguf(smollm2_gguf())


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", REQUIRED_FTYPES)
def test_smollm2_matches_llama_quantize(llama_quantize, smollm2_f32, ftype):
    check_plan(llama_quantize, smollm2_f32, ftype)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_S", "Q6_K", "Q4_0", "MXFP4_MOE"])
def test_smollm2_pure_matches_llama_quantize(llama_quantize, smollm2_f32, ftype):
    check_plan(llama_quantize, smollm2_f32, ftype, pure=True)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_0", "Q4_K_M", "Q2_K"])
def test_smollm2_imatrix_matches_llama_quantize(llama_quantize, smollm2_f32, ftype):
    check_plan(llama_quantize, smollm2_f32, ftype, imatrix=True)


ALL_FTYPES = sorted(FTYPES)  # the small models take every ftype llama-quantize offers


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ALL_FTYPES)
def test_dense_gqa_matches_llama_quantize(llama_quantize, ftype):
    check_plan(llama_quantize, make_synthetic_gguf(DENSE), ftype)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ALL_FTYPES)
def test_dense_gqa_imatrix_matches_llama_quantize(llama_quantize, ftype):
    check_plan(llama_quantize, make_synthetic_gguf(DENSE), ftype, imatrix=True)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", sorted(NEEDS_IMATRIX))
def test_dense_gqa_refused_without_imatrix(llama_quantize, ftype):
    check_refused(llama_quantize, make_synthetic_gguf(DENSE), ftype)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q4_K_S", "Q2_K", "IQ4_XS", "Q4_0", "MXFP4_MOE"])
def test_dense_gqa_pure_matches_llama_quantize(llama_quantize, ftype):
    check_plan(llama_quantize, make_synthetic_gguf(DENSE), ftype, pure=True)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_NL"])
def test_tied_embeddings_match_llama_quantize(llama_quantize, ftype):
    check_plan(llama_quantize, make_synthetic_gguf(TIED), ftype)


@pytest.mark.oracle
@pytest.mark.parametrize("model", [MOE8, MOE4], ids=["8experts", "4experts"])
@pytest.mark.parametrize(
    "ftype,imatrix",
    [("MXFP4_MOE", False), ("Q4_K_M", False), ("Q3_K_M", False), ("Q2_K", False), ("IQ3_M", False),
     ("IQ4_XS", False), ("IQ3_XS", False), ("IQ3_XS", True), ("IQ2_XXS", True), ("IQ1_M", True)],
)
def test_moe_matches_llama_quantize(llama_quantize, model, ftype, imatrix):
    check_plan(llama_quantize, make_synthetic_gguf(model), ftype, imatrix=imatrix)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q3_K_L", "Q5_K_M", "Q2_K", "IQ3_M"])
def test_falcon_matches_llama_quantize(llama_quantize, ftype):
    check_plan(llama_quantize, make_synthetic_gguf(FALCON), ftype)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M"])
def test_70b_llama_matches_llama_quantize(llama_quantize, ftype):
    check_plan(llama_quantize, make_synthetic_gguf(L70B), ftype)


# --------------------------------------------------------------------------------------------
# plain unit tests (no llama.cpp)
# --------------------------------------------------------------------------------------------


def _smollm2_like(n_layer: int = 30) -> list[TensorSpec]:
    specs = [TensorSpec("token_embd.weight", (576, 49152), "F32"), TensorSpec("output_norm.weight", (576,), "F32")]
    for i in range(n_layer):
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (576,), "F32"),
            TensorSpec(b + "attn_q.weight", (576, 576), "F32"),
            TensorSpec(b + "attn_k.weight", (576, 192), "F32"),
            TensorSpec(b + "attn_v.weight", (576, 192), "F32"),
            TensorSpec(b + "attn_output.weight", (576, 576), "F32"),
            TensorSpec(b + "ffn_gate.weight", (576, 1536), "F32"),
            TensorSpec(b + "ffn_up.weight", (576, 1536), "F32"),
            TensorSpec(b + "ffn_down.weight", (1536, 576), "F32"),
        ]
    return specs


SMOL_META = {"llama.block_count": 30, "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3}


def test_ftype_table():
    assert get_ftype("q4_k_m") is FTYPES["Q4_K_M"]
    assert get_ftype("Q4_K").name == "Q4_K_M"
    assert get_ftype(15).name == "Q4_K_M"
    assert {f: (FTYPES[f].file_type, FTYPES[f].default_type) for f in ("Q4_0", "MXFP4_MOE", "IQ4_XS", "BF16")} == {
        "Q4_0": (2, "Q4_0"), "MXFP4_MOE": (38, "MXFP4"), "IQ4_XS": (30, "IQ4_XS"), "BF16": (32, "BF16")}
    for name in REQUIRED_FTYPES:
        assert name in FTYPES


def test_unknown_ftype_lists_valid_names():
    with pytest.raises(UnknownTypeError) as e:
        plan_tensors(_smollm2_like(), "llama", SMOL_META, "Q4_K_Z")
    msg = str(e.value)
    assert "\n" not in msg and "Q4_K_M" in msg and "MXFP4_MOE" in msg


def test_order_independent_of_input_order():
    specs = _smollm2_like()
    a = plan_tensors(specs, "llama", SMOL_META, "Q4_K_M")
    b = plan_tensors(list(reversed(specs)), "llama", SMOL_META, "Q4_K_M")
    assert [p.name for p in b] == [s.name for s in reversed(specs)]
    assert {p.name: p.target_type for p in a} == {p.name: p.target_type for p in b}


def test_smollm2_like_q4_k_m_reasons():
    plans = {p.name: p for p in plan_tensors(_smollm2_like(), "llama", SMOL_META, "Q4_K_M")}
    assert plans["token_embd.weight"].target_type == "Q8_0"  # tied, 576 % 256 != 0
    assert not plans["output_norm.weight"].quantized and plans["output_norm.weight"].target_type == "F32"
    assert plans["blk.0.ffn_down.weight"].target_type == "Q6_K"  # use_more_bits, rows of 1536 fit
    assert plans["blk.4.ffn_down.weight"].target_type == "Q4_K"
    assert plans["blk.0.attn_q.weight"].target_type == "Q5_0"
    assert plans["blk.0.attn_q.weight"].fallback and "576 % 256 != 0" in plans["blk.0.attn_q.weight"].reason
    assert plans["blk.0.attn_v.weight"].target_type == "Q8_0"  # Q6_K -> fallback Q8_0


def test_pure_ignores_mixture_but_keeps_fallback():
    plans = {p.name: p for p in plan_tensors(_smollm2_like(), "llama", SMOL_META, "Q4_K_M", pure=True)}
    assert plans["blk.0.ffn_down.weight"].target_type == "Q4_K"
    assert plans["token_embd.weight"].target_type == "Q5_0"
    assert plans["blk.0.attn_norm.weight"].target_type == "F32"


def test_imatrix_required():
    with pytest.raises(ImatrixError):
        plan_tensors(_smollm2_like(), "llama", SMOL_META, "IQ2_XXS")
    plans = plan_tensors(_smollm2_like(), "llama", SMOL_META, "IQ2_XXS", has_imatrix=True)
    assert {p.name: p.target_type for p in plans}["blk.29.ffn_down.weight"] == "IQ2_XXS"


def test_overrides():
    plans = {
        p.name: p
        for p in plan_tensors(
            _smollm2_like(), "llama", SMOL_META, "Q8_0", token_embedding_type="q4_k",
            tensor_type_overrides=[(r"attn_q\.weight$", "Q4_K")],
        )
    }
    assert plans["token_embd.weight"].target_type == "Q4_K"  # no fallback for the explicit type
    assert plans["blk.3.attn_q.weight"].target_type == "Q5_0"  # override, then fallback
    assert plans["blk.3.attn_k.weight"].target_type == "Q8_0"
