"""``quantize_rows_candle``: K-quant blocks as mistral.rs 0.9.5 writes them in ISQ.

The oracle is the real ``mistralrs`` wheel: a tiny Llama checkpoint whose tensors carry the
troublesome value patterns (outliers, 1e-30 and 2e8 scales, zero rows and zero sub-blocks,
constant rows, exact rounding ties, one-signed tensors, heavy tails) is quantized by mistral.rs
with ``--isq`` for each K type, with and without a ``.cimatrix``, and every K-quant layer of
the UQFF it writes must equal our bytes. The fast tests need no mistralrs.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from quantbench.errors import ImatrixError, InputValueError, ShapeError, UnknownTypeError
from quantbench.quant import get_type
from quantbench.quant.ggml import candle_kquants
from quantbench.quant.ggml.candle_kquants import CANDLE_TYPES, quantize_rows_candle
from quantbench.quant.ggml.common import forced_sync_free
from tests.formats import make_llama_dir, mistralrs_available
from tests.quant.ggml.cases import make_cases, make_imatrix

needs_mistralrs = pytest.mark.skipif(not mistralrs_available(), reason="needs mistralrs==0.9.5 (pip install mistralrs==0.9.5)")


def _dequant(name: str, b: torch.Tensor, shape) -> torch.Tensor:
    t = get_type(name)
    return t.dequantize_blocks(b.reshape(-1, t.type_size)).reshape(shape)


# ------------------------------------------------------------------------------ fast tests


@pytest.mark.parametrize("name", CANDLE_TYPES)
def test_reconstruction_close_to_llama_cpp_quality(name):
    """candle's older searches lose little against llama.cpp's: within 10% relative error."""
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(0))
    b = quantize_rows_candle(name, x)
    t = get_type(name)
    assert b.dtype == torch.uint8 and b.shape == (32, 4 * t.type_size)
    err = ((_dequant(name, b, x.shape) - x).norm() / x.norm()).item()
    ref = ((_dequant(name, t.quantize_rows(x, None), x.shape) - x).norm() / x.norm()).item()
    assert err < 1.1 * ref, (err, ref)
    assert err < {"Q2_K": 0.32, "Q3_K": 0.17, "Q4_K": 0.085, "Q5_K": 0.042, "Q6_K": 0.021, "Q8_K": 0.008}[name]


@pytest.mark.parametrize("name", CANDLE_TYPES)
def test_zero_rows_give_zeros_and_extremes_stay_finite(name):
    for case, a in make_cases(512, rows=8).items():
        x = torch.from_numpy(a)
        y = _dequant(name, quantize_rows_candle(name, x), x.shape)
        if case != "huge":  # 1e4-scale values overflow fp16 super-scales, in mistral.rs too
            assert torch.isfinite(y).all(), case
        if case == "all_zero":
            assert (y == 0).all()
    # mixed_extremes row 7 starts with an all-zero super-block
    x = torch.from_numpy(make_cases(512, rows=8)["mixed_extremes"])
    assert (_dequant(name, quantize_rows_candle(name, x), x.shape)[7, :256] == 0).all()


def test_q6_k_zero_block_stores_negative_zero_scale():
    """candle has no all-zero shortcut: d = 1/(-128/0) = -0 (bytes 00 80), everything else 0."""
    b = quantize_rows_candle("Q6_K", torch.zeros(1, 256))
    assert b[0, 208:].tolist() == [0x00, 0x80] and not b[0, :208].any()


def test_rounding_is_half_away_from_zero():
    """Rust's f32::round, not ggml's round-half-even: -28.5 -> -29 in Q8_K (mistral.rs agrees)."""
    x = torch.zeros(1, 256)
    x[0, 0] = -127.0  # iscale = -127/max = 1
    x[0, 1] = -28.5
    x[0, 2] = 84.5
    b = quantize_rows_candle("Q8_K", x)
    qs = b[0, 4:260].view(torch.int8)
    assert qs[:3].tolist() == [-127, -29, 85]
    # llama.cpp's Q8_K rounds these ties to even
    assert get_type("Q8_K").quantize_rows(x, None)[0, 4:260].view(torch.int8)[:3].tolist() == [-127, -28, 84]


@pytest.mark.parametrize("name", CANDLE_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_deterministic_chunk_and_sync_free_invariant(name, weighted, monkeypatch):
    """Same bytes on a rerun, in small chunks, and on the graph-safe path accelerators take."""
    x = torch.from_numpy(make_cases(512, rows=8)["mixed_extremes"])
    qw = torch.from_numpy(make_imatrix(512, zero_columns=False)) if weighted else None
    a = quantize_rows_candle(name, x, qw)
    assert torch.equal(a, quantize_rows_candle(name, x, qw))
    monkeypatch.setattr(candle_kquants, "_CHUNK", 5)
    assert torch.equal(a, quantize_rows_candle(name, x, qw))
    with forced_sync_free():
        assert torch.equal(a, quantize_rows_candle(name, x, qw))


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_importance_lowers_weighted_error(name):
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(1))
    qw = torch.from_numpy(make_imatrix(512, zero_columns=False))
    plain = _dequant(name, quantize_rows_candle(name, x), x.shape)
    weighted = _dequant(name, quantize_rows_candle(name, x, qw), x.shape)
    werr = lambda y: (((y - x) ** 2) * qw).sum().item()  # noqa: E731
    assert werr(weighted) < werr(plain)


def test_q8_k_ignores_importance():
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
    assert torch.equal(quantize_rows_candle("Q8_K", x), quantize_rows_candle("Q8_K", x, torch.rand(512)))


def test_zero_importance_groups_are_refused_unless_asked():
    """All-zero importance over sub-blocks makes candle's scales NaN (mistral.rs writes NaN blocks)."""
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(3))
    qw = torch.from_numpy(make_imatrix(512))  # columns 0..39 are zero
    with pytest.raises(ImatrixError, match="NaN/inf scales"):
        quantize_rows_candle("Q3_K", x, qw)
    b = quantize_rows_candle("Q3_K", x, qw, allow_nonfinite=True)
    assert not torch.isfinite(_dequant("Q3_K", b, x.shape)[:, :256]).all()
    assert torch.isfinite(_dequant("Q3_K", b, x.shape)[:, 256:]).all()


def test_bad_inputs_raise_typed_errors():
    x = torch.randn(2, 256)
    with pytest.raises(UnknownTypeError, match="Q4_0"):
        quantize_rows_candle("Q4_0", x)
    with pytest.raises(ShapeError, match="multiple of 256"):
        quantize_rows_candle("Q4_K", torch.randn(2, 300))
    with pytest.raises(ShapeError):
        quantize_rows_candle("Q4_K", torch.randn(256))
    bad = x.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(InputValueError, match="NaN or inf"):
        quantize_rows_candle("Q6_K", bad)
    with pytest.raises(ImatrixError, match="128 values"):
        quantize_rows_candle("Q4_K", x, torch.ones(128))
    with pytest.raises(ImatrixError, match="NaN or inf"):
        quantize_rows_candle("Q4_K", x, torch.full((256,), float("inf")))
    assert quantize_rows_candle("q4_k", torch.zeros(0, 256)).shape == (0, 0)


# ------------------------------------------------------------------------------ mistral.rs oracle


def _edit_weights(sd: dict[str, torch.Tensor]) -> None:
    """Layer 0: the ranges of real checkpoints; layer 1: float edge cases."""
    g = torch.Generator().manual_seed(1)
    p = "model.layers.0."
    q = sd[p + "self_attn.q_proj.weight"] * 40
    q.view(-1)[torch.randint(0, q.numel(), (200,), generator=g)] *= 50  # outliers
    sd[p + "self_attn.q_proj.weight"] = q
    sd[p + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"] * 1e-3
    v = sd[p + "self_attn.v_proj.weight"].clone()
    v[3] = 0
    v[5, :128] = 0
    v[7] = 0.25
    v[9, 240:] = 0
    sd[p + "self_attn.v_proj.weight"] = v
    sd[p + "self_attn.o_proj.weight"] = torch.from_numpy(np.random.default_rng(2).standard_t(2.0, (256, 256)).astype(np.float32)) * 0.02
    sd[p + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_proj.weight"].abs() + 0.01
    sd[p + "mlp.up_proj.weight"] = -sd[p + "mlp.up_proj.weight"].abs()
    dn = sd[p + "mlp.down_proj.weight"]
    dn[0] *= 1000
    dn[1] *= 1e-5
    p = "model.layers.1."
    sd[p + "self_attn.q_proj.weight"] = torch.round(sd[p + "self_attn.q_proj.weight"] * 40) / 8  # exact ties
    sd[p + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"] * 2e8  # fp16 super-scale overflow
    v = sd[p + "self_attn.v_proj.weight"] * 1e-30  # x*x underflows
    v[0] = 0
    v[1, ::16] = 1e-3
    sd[p + "self_attn.v_proj.weight"] = v
    o = torch.zeros(256, 256)
    o[:, ::37] = torch.randn(o[:, ::37].shape, generator=g)  # at most one nonzero per sub-block
    o[::5] = 0.3
    o[1::7] = -2.0
    o[2::11, :128] = torch.arange(128).float() * 0.01
    sd[p + "self_attn.o_proj.weight"] = o
    gt = sd[p + "mlp.gate_proj.weight"].clone()
    gt.view(-1, 16)[::3] = 0
    gt.view(-1, 32)[1::7] = 0.5
    sd[p + "mlp.gate_proj.weight"] = gt
    sd[p + "mlp.up_proj.weight"] = torch.randint(-8, 8, (512, 256), generator=g).float()
    dn = sd[p + "mlp.down_proj.weight"]
    dn[::3] *= 1e6
    dn[1::3] *= torch.logspace(-6, 6, 512)
    dn[5, 100] = 3e4


def _importance(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-module importance spanning five decades, with scattered zero columns; layer 1 also
    has all-zero groups (columns 0..39, and 256..511 where there are 512), which give NaN scales."""
    rng = np.random.default_rng(7)
    out = {}
    for k, v in sorted(sd.items()):
        if v.dim() == 2:
            n = v.shape[1]
            w = (rng.gamma(0.7, 1.0, n) * 10 ** rng.uniform(-3, 2)).astype(np.float32)
            w[rng.random(n) < 0.05] = 0
            if k.startswith("model.layers.1."):
                w[:40] = 0
                w[256:512] = 0
            out[k.removesuffix(".weight")] = w
    return out


def _write_cimatrix(path, imx: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(imx)))
        for key, vals in imx.items():
            raw = key.encode()
            f.write(struct.pack("<Q", len(raw)) + raw + struct.pack("<Q", vals.size) + vals.astype("<f4").tobytes())


_RUNNER = """
import json, sys
import mistralrs as m
a = json.loads(sys.argv[1])
which = m.Which.Plain(model_id=a["model"], write_uqff=a["out"], imatrix=a["imatrix"])
m.Runner(which=which, in_situ_quant=a["isq"], max_seqs=1, token_source="none")
"""


def _mistralrs_uqff(model, isq: str, out, imatrix) -> None:
    import json
    import os
    import subprocess
    import sys

    args = {"model": str(model), "out": str(out), "isq": isq, "imatrix": str(imatrix) if imatrix else None}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAYON_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(args)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, f"mistralrs failed ({p.returncode}):\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    d = make_llama_dir(tmp_path_factory.mktemp("candle") / "llama", hidden=256, inter=512, layers=2)
    sd = load_file(str(d / "model.safetensors"))
    _edit_weights(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    imx = _importance(sd)
    _write_cimatrix(d.parent / "imx.cimatrix", imx)
    return d, sd, imx


@needs_mistralrs
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("isq", ["q2k", "q3k", "q4k", "q5k", "q6k", "q8k"])
def test_bytes_equal_mistralrs_isq(edge_model, tmp_path, isq, weighted):
    from quantbench.formats.uqff import UqffFile

    model, sd, imx = edge_model
    out = tmp_path / f"{isq}.uqff"
    _mistralrs_uqff(model, isq, out, model.parent / "imx.cimatrix" if weighted else None)
    u = UqffFile(next(tmp_path.glob("*.uqff")))
    seen = set()
    for key in u.layers:
        q, _ = u.read_layer(key)
        if q.qtype not in CANDLE_TYPES:
            continue  # Q8_0 promotions: legacy types, covered elsewhere
        qw = torch.from_numpy(imx[key]) if weighted else None
        ours = quantize_rows_candle(q.qtype, sd[key + ".weight"], qw, allow_nonfinite=True)
        ref = q.tensors["data"]
        if not torch.equal(ours, ref):
            bad = (ours != ref).any(1).nonzero().flatten()
            col = int((ours[bad[0]] != ref[bad[0]]).nonzero()[0])
            pytest.fail(f"{isq} {key} {q.qtype}: {len(bad)} of {ref.shape[0]} rows differ; row {int(bad[0])} byte {col}")
        seen.add(q.qtype)
    want = {"q2k": "Q2_K", "q3k": "Q3_K", "q4k": "Q4_K", "q5k": "Q5_K", "q6k": "Q6_K", "q8k": "Q8_K"}[isq]
    assert want in seen, f"mistral.rs stored no {want} layer: {sorted(seen)}"
