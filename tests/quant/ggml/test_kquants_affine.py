"""Q2_K / Q4_K / Q5_K and the affine scale searches, beyond the generic byte test.

* Whole 4096-wide rows, several seeds, and inputs that push the float edge cases (subnormal
  and 1e30-scale values, integer grids, constant and one-hot rows), with several imatrices
  (all zero, sparse, 40 orders of magnitude wide), against ``ggml_quantize_chunk``.
* ``make_qkx2_quants`` / ``make_qkx3_quants`` / ``make_qp_quants`` against the C functions
  themselves: they are ``static``, so the test compiles a shim that includes the oracle's own
  ggml-quants.c with the oracle's own compile command (from its compile_commands.json).
* Hand cases with known answers, and the float helpers (``nearest_int``, ``sqrtf``).
"""

from __future__ import annotations

import ctypes
import json
import shlex
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from quantbench.quant.ggml.common import cdiv, nearest_int, sqrtf
from quantbench.quant import dequantize, get_type, quantize
from quantbench.quant.ggml.search_affine import make_qkx2_quants, make_qkx3_quants, make_qp_quants
from tests.quant.ggml.cases import assert_same_bytes, make_imatrix

TYPES = ["Q2_K", "Q4_K", "Q5_K"]




def _edge_inputs(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (4, n)
    return {
        "subnormal": (rng.standard_normal(shape) * 1e-39).astype(np.float32),
        "deep_subnormal": (rng.standard_normal(shape) * 1e-44).astype(np.float32),
        "near_min_normal": (rng.standard_normal(shape) * 1e-37).astype(np.float32),
        "big": (rng.standard_normal(shape) * 1e18).astype(np.float32),
        "huge": (rng.standard_normal(shape) * 1e30).astype(np.float32),
        "mixed_magnitudes": (rng.standard_normal(shape) * np.exp(rng.uniform(-30, 30, shape))).astype(np.float32),
        "int_grid": rng.integers(-3, 4, shape).astype(np.float32),
        "int_grid_pos": rng.integers(0, 4, shape).astype(np.float32),
        "sparse": (rng.standard_normal(shape) * (rng.random(shape) < 0.05)).astype(np.float32),
        "one_hot": np.eye(4, n, dtype=np.float32) * 5,
        "negative_constant": np.full(shape, -2.5, np.float32),
        "positive_constant": np.full(shape, 1e-3, np.float32),
        "uniform": rng.uniform(-1, 1, shape).astype(np.float32),
        "lognormal": rng.lognormal(0, 2, shape).astype(np.float32),
        "fp16_grid": rng.standard_normal(shape).astype(np.float16).astype(np.float32),
    }


def _imatrices(seed: int, n: int) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed + 100)
    return {
        "none": None,
        "standard": make_imatrix(n, seed=seed),
        "all_zero": np.zeros(n, np.float32),
        "wide_range": np.exp(rng.uniform(-20, 20, n)).astype(np.float32),
        "sparse": ((rng.random(n) < 0.1) * rng.random(n)).astype(np.float32),
        "tiny": (rng.random(n) * 1e-30).astype(np.float32),
    }


def _check(qtype: str, x: np.ndarray, im: np.ndarray | None, oracle, what: str) -> None:
    t = get_type(qtype)
    ours = quantize(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im)).data.numpy()
    assert_same_bytes(ours, oracle.quantize(t.ggml_id, x, im), what)


@pytest.mark.oracle
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qtype", TYPES)
def test_wide_rows_match_llama_cpp(qtype: str, seed: int, ggml_oracle) -> None:
    rng = np.random.default_rng(seed)
    x = {
        "normal": rng.standard_normal((6, 4096)).astype(np.float32),
        "heavy_tailed": (rng.standard_t(3.0, (6, 4096)) * 0.02).astype(np.float32),
    }
    for name, xs in x.items():
        for im_name in ("none", "standard", "wide_range"):
            im = _imatrices(seed, 4096)[im_name]
            _check(qtype, xs, im, ggml_oracle, f"{qtype}/{name}/{im_name}/seed{seed}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_edge_inputs_match_llama_cpp(qtype: str, ggml_oracle) -> None:
    n = 512
    for name, x in _edge_inputs(3, n).items():
        for im_name, im in _imatrices(3, n).items():
            _check(qtype, x, im, ggml_oracle, f"{qtype}/{name}/{im_name}")


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_wide_rows_matches_gguf_py(qtype: str) -> None:
    import gguf
    from gguf import quants as gq

    t = get_type(qtype)
    x = np.random.default_rng(4).standard_normal((4, 4096)).astype(np.float32)
    q = quantize(torch.from_numpy(x), qtype, torch.from_numpy(make_imatrix(4096)))
    ref = gq.dequantize(q.data.numpy(), gguf.GGMLQuantizationType(t.ggml_id))
    np.testing.assert_array_equal(dequantize(q).numpy(), ref.reshape(x.shape).astype(np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_bytes_equal_cpu_bytes(qtype: str) -> None:
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((8, 4096)).astype(np.float32))
    for im in (None, torch.from_numpy(make_imatrix(4096))):
        cpu = quantize(x, qtype, im).data
        gpu = quantize(x.cuda(), qtype, None if im is None else im.cuda()).data.cpu()
        assert torch.equal(cpu, gpu), qtype


# ---- the search functions against the C ones -------------------------------------------------

_SHIM = r"""
#include "ggml-quants.c"
float qb_qkx2(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
              float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[256];
    return make_qkx2_quants(n, nmax, x, w, L, the_min, Laux, rmin, rdelta, nstep, use_mad != 0);
}
float qb_qkx3(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
              float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[256];
    return make_qkx3_quants(n, nmax, x, w, L, the_min, Laux, rmin, rdelta, nstep, use_mad != 0);
}
float qb_qp(int n, int nmax, const float *x, uint8_t *L, const float *w) {
    return make_qp_quants(n, nmax, x, L, w);
}
"""


@pytest.fixture(scope="module")
def c_search(tmp_path_factory):
    """The C searches, compiled from the oracle's source with the oracle's flags."""
    from tests.oracles import ggml_lib

    ccj = ggml_lib.BUILD_DIR / "compile_commands.json"
    if not ccj.exists() or shutil.which("cc") is None:
        pytest.skip("oracle build tree or C compiler missing")
    entry = next(e for e in json.loads(ccj.read_text()) if e["file"].endswith("ggml/src/ggml-quants.c"))
    args = shlex.split(entry["command"])
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-o", "-c"):
            skip = True
            continue
        keep.append(a)
    d = tmp_path_factory.mktemp("shim")
    src = d / "shim.c"
    src.write_text(_SHIM)
    so = d / "libqbshim.so"
    libdir = str(ggml_lib.BUILD_DIR / "bin")
    cmd = keep + ["-shared", str(src), "-o", str(so), f"-L{libdir}", "-lggml-base", f"-Wl,-rpath,{libdir}"]
    subprocess.run(cmd, check=True, cwd=entry["directory"], capture_output=True)
    lib = ctypes.CDLL(str(so))
    vp, f32, i32 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    for name in ("qb_qkx2", "qb_qkx3"):
        fn = getattr(lib, name)
        fn.restype = f32
        fn.argtypes = [i32, i32, vp, vp, vp, vp, f32, f32, i32, i32]
    lib.qb_qp.restype = f32
    lib.qb_qp.argtypes = [i32, i32, vp, vp, vp]
    return lib


def _c_qkx(lib, which: str, x, w, nmax, rmin, rdelta, nstep, use_mad):
    G, n = x.shape
    scale = np.zeros(G, np.float32)
    the_min = np.zeros(G, np.float32)
    L = np.zeros((G, n), np.uint8)
    fn = getattr(lib, f"qb_qkx{which}")
    for g in range(G):
        xg = np.ascontiguousarray(x[g])
        wg = None if w is None else np.ascontiguousarray(w[g])
        m = np.zeros(1, np.float32)
        lg = np.zeros(n, np.uint8)
        scale[g] = fn(n, nmax, xg.ctypes.data, None if wg is None else wg.ctypes.data, lg.ctypes.data,
                      m.ctypes.data, rmin, rdelta, nstep, int(use_mad))
        the_min[g] = m[0]
        L[g] = lg
    return scale, the_min, L


def _c_qp(lib, x, w, nmax):
    G, n = x.shape
    scale = np.zeros(G, np.float32)
    L = np.zeros((G, n), np.uint8)
    for g in range(G):
        xg = np.ascontiguousarray(x[g])
        wg = np.ascontiguousarray(w[g])
        lg = np.zeros(n, np.uint8)
        scale[g] = lib.qb_qp(n, nmax, xg.ctypes.data, lg.ctypes.data, wg.ctypes.data)
        L[g] = lg
    return scale, L


def _search_inputs(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    G = 400
    return {
        "normal": rng.standard_normal((G, n)),
        "positive": np.abs(rng.standard_normal((G, n))),
        "int": rng.integers(-2, 3, (G, n)),
        "subnormal": rng.standard_normal((G, n)) * 1e-40,
        "big": rng.standard_normal((G, n)) * 1e19,
        "mixed": rng.standard_normal((G, n)) * np.exp(rng.uniform(-40, 40, (G, n))),
    }


_QKX_ARGS = [
    (16, 3, -0.5, 0.1, 15, True),     # Q2_K ref
    (16, 3, -0.9, 0.05, 36, False),   # Q2_K impl
    (32, 15, -1.0, 0.1, 20, False),   # Q4_K ref
    (32, 31, -0.5, 0.1, 15, False),   # Q5_K ref
    (32, 15, -0.9, 0.05, 36, False),  # Q4_K impl, Q4_1 imatrix
    (32, 31, -0.9, 0.05, 36, False),  # Q5_K impl, Q5_1 imatrix
    (32, 15, -0.9, 0.05, 0, False),   # no candidate steps
]


@pytest.mark.parametrize("args", _QKX_ARGS, ids=lambda a: "n{}_nmax{}_step{}_{}".format(a[0], a[1], a[4], "mad" if a[5] else "mse"))
def test_qkx_searches_match_c(args, c_search) -> None:
    n, nmax, rmin, rdelta, nstep, use_mad = args
    rng = np.random.default_rng(12)
    for name, x in _search_inputs(n).items():
        x = x.astype(np.float32)
        weights = {
            "abs": np.abs(x),
            "random": rng.random(x.shape).astype(np.float32),
            "zero": np.zeros_like(x),
            "negative": -rng.random(x.shape).astype(np.float32),
        }
        for wname, w in weights.items():
            for which, fn in (("2", make_qkx2_quants), ("3", make_qkx3_quants)):
                c = _c_qkx(c_search, which, x, w, nmax, rmin, rdelta, nstep, use_mad)
                t = fn(torch.from_numpy(x), torch.from_numpy(w), nmax, rmin, rdelta, nstep, use_mad)
                for k, label in enumerate(("scale", "min", "L")):
                    np.testing.assert_array_equal(t[k].numpy().astype(c[k].dtype), c[k],
                                                  err_msg=f"qkx{which} {name}/{wname} {label}")
        # make_qkx3_quants with no weights uses x*x
        c = _c_qkx(c_search, "3", x, None, nmax, rmin, rdelta, nstep, use_mad)
        t = make_qkx3_quants(torch.from_numpy(x), None, nmax, rmin, rdelta, nstep, use_mad)
        for k in range(3):
            np.testing.assert_array_equal(t[k].numpy().astype(c[k].dtype), c[k], err_msg=f"qkx3 {name}/null")


@pytest.mark.parametrize("n,nmax", [(8, 63), (16, 15)])
def test_qp_search_matches_c(n: int, nmax: int, c_search) -> None:
    rng = np.random.default_rng(13)
    for name, x in _search_inputs(n).items():
        x = x.astype(np.float32)
        for wname, w in {"random": rng.random(x.shape), "zero": np.zeros(x.shape), "abs": np.abs(x)}.items():
            w = w.astype(np.float32)
            cs, cl = _c_qp(c_search, x, w, nmax)
            ts, tl = make_qp_quants(torch.from_numpy(x), torch.from_numpy(w), nmax)
            np.testing.assert_array_equal(ts.numpy(), cs, err_msg=f"qp {name}/{wname} scale")
            np.testing.assert_array_equal(tl.numpy().astype(np.uint8), cl, err_msg=f"qp {name}/{wname} L")


# ---- hand cases --------------------------------------------------------------------------------

def test_qkx_exact_affine_grid_is_recovered() -> None:
    levels = torch.arange(16, dtype=torch.float32)
    x = (0.5 * levels - 1.0).reshape(1, 16)
    for fn in (make_qkx2_quants, make_qkx3_quants):
        scale, the_min, L = fn(x, torch.ones_like(x), 15, -0.9, 0.05, 36, False)
        assert scale.item() == 0.5 and the_min.item() == 1.0
        assert torch.equal(L[0], levels.to(torch.int32))


def test_qkx_degenerate_groups() -> None:
    # max == min (all equal, not above zero): scale 0, levels 0, the_min = -min.
    x = torch.tensor([[-3.0] * 16, [0.0] * 16])
    scale, the_min, L = make_qkx2_quants(x, torch.ones_like(x), 3, -0.5, 0.1, 15, True)
    assert scale.tolist() == [0.0, 0.0]
    assert the_min.tolist() == [3.0, 0.0]
    assert int(L.abs().sum()) == 0
    # a positive constant is not degenerate: min is clamped to 0, so every level is nmax.
    x = torch.full((1, 16), 2.0)
    scale, the_min, L = make_qkx2_quants(x, torch.ones_like(x), 3, -0.5, 0.1, 15, True)
    assert the_min.item() == 0.0 and torch.all(L == 3) and abs(scale.item() * 3 - 2.0) < 1e-6


def test_qp_hand_cases() -> None:
    x = torch.stack([torch.zeros(16), 0.25 * torch.arange(16, dtype=torch.float32)])
    scale, L = make_qp_quants(x, torch.ones_like(x), 15)
    assert scale.tolist() == [0.0, 0.25]
    assert L[0].abs().sum() == 0 and torch.equal(L[1], torch.arange(16, dtype=torch.int32))


def _c_nearest_int(v: float) -> int:
    f = np.float32(np.float32(v) + np.float32(12582912.0))
    i = struct.unpack("<i", struct.pack("<f", f))[0]
    return (i & 0x007FFFFF) - 0x00400000


def test_nearest_int_matches_the_magic_number_trick() -> None:
    vals = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49999, 4194303.0, -4194303.0, 4194304.5, 5e6, -7e6,
            1e10, -1e30, 3e38, float("inf"), float("-inf")]
    got = nearest_int(torch.tensor(vals, dtype=torch.float32)).tolist()
    assert got == [_c_nearest_int(v) for v in vals]


def test_sqrtf_is_correctly_rounded() -> None:
    rng = np.random.default_rng(14)
    s = np.concatenate([
        rng.random(200_000) * 10, np.abs(rng.standard_normal(50_000)) * 1e-40,
        np.abs(rng.standard_normal(50_000)) * 1e30, [0.0, -0.0, np.inf, 1e-45, 3.4028235e38, 2.0, 4.0],
    ]).astype(np.float32)
    got = sqrtf(torch.from_numpy(s)).numpy()
    np.testing.assert_array_equal(got.view(np.int32), np.sqrt(s).view(np.int32))


def test_cdiv_is_ieee_division() -> None:
    rng = np.random.default_rng(15)
    a = rng.standard_normal(100_000).astype(np.float32)
    b = rng.standard_normal(100_000).astype(np.float32)
    np.testing.assert_array_equal(cdiv(torch.from_numpy(a), torch.from_numpy(b)).numpy(), a / b)
    np.testing.assert_array_equal(cdiv(63.0, torch.from_numpy(b)).numpy(), np.float32(63.0) / b)
    np.testing.assert_array_equal(cdiv(torch.from_numpy(a), 63.0).numpy(), a / np.float32(63.0))
