"""Q3_K / Q6_K / Q8_K and the symmetric scale searches, beyond the generic byte test.

* Whole 4096-wide rows, several seeds and imatrices, against ``ggml_quantize_chunk``.
* ``make_qx_quants`` (every ``rmse_type``, with and without weights, several ``nmax``) and
  ``make_q3_quants`` against the C functions themselves: they are ``static`` in ggml-quants.c, so
  the test cuts them out of the oracle's own source tree and compiles them with the oracle's flags.
* Q8_K dequantization against ``dequantize_row_q8_K`` (gguf-py has no Q8_K dequantizer).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantbench.quant.ggml.common import nearest_int
from quantbench.quant import dequantize, get_type, quantize
from quantbench.quant.ggml.search_symmetric import make_q3_quants, make_qx_quants
from tests.quant.ggml.cases import assert_same_bytes, make_cases, make_imatrix

TYPES = ["Q3_K", "Q6_K", "Q8_K"]




def _wide_inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (6, 4096)
    x = {
        "normal": rng.standard_normal(shape).astype(np.float32),
        "heavy_tailed": rng.standard_t(1.5, shape).astype(np.float32),
        "llm_like": (rng.standard_normal(shape) * 0.02 * np.exp(rng.standard_normal((1, 4096)) * 0.7)).astype(np.float32),
    }
    # per-column outliers and a few dead columns, as in real projection weights
    o = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    o[:, rng.choice(4096, 12, replace=False)] *= 60.0
    o[:, rng.choice(4096, 40, replace=False)] = 0.0
    x["outlier_columns"] = o
    return x


@pytest.mark.oracle
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qtype", TYPES)
def test_wide_rows_match_llama_cpp(qtype: str, seed: int, ggml_oracle) -> None:
    t = get_type(qtype)
    rng = np.random.default_rng(100 + seed)
    imatrices = {
        "none": None,
        "zero_cols": make_imatrix(4096, seed=seed),
        "lognormal": np.exp(rng.standard_normal(4096) * 2).astype(np.float32),
    }
    for case, x in _wide_inputs(seed).items():
        for im_name, im in imatrices.items():
            ours = quantize(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im)).data.numpy()
            ref = ggml_oracle.quantize(t.ggml_id, x, im)
            assert_same_bytes(ours, ref, f"{qtype}/{case}/imatrix={im_name}/seed={seed}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_degenerate_magnitudes_match_llama_cpp(qtype: str, ggml_oracle) -> None:
    """Subnormal, near-GROUP_MAX_EPS and mixed-magnitude groups inside one super-block."""
    t = get_type(qtype)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((13, 512)).astype(np.float32)
    x[0] *= 1e-39                                  # subnormal values everywhere
    x[1] *= 3e-16                                  # straddles GROUP_MAX_EPS
    x[2, :16] *= 1e-20                             # one negligible group in a normal block
    x[3, 256:] *= 1e-6                             # super-scale far into fp16 subnormals
    x[4, 256:] *= 1e-9                             # super-scale underflows fp16
    x[5] = np.float32(1e-38) * np.sign(x[5])       # equal magnitudes, both signs
    x[6, ::16] = 1e3                               # one spike per group
    x[7] *= 6e4                                    # near fp16 max
    x[8, :256] = np.float32(-2.0 ** -140)          # subnormal constant block (Q8_K iscale = inf)
    x[9, 3] = 1e-42
    x[9, 4:256] = 0.0
    x[10] *= 1e15                                  # x^3 overflows: inf/NaN scales inside the search
    x[11] *= 1e25
    x[12] = np.clip(x[12] * 1e38, -3e38, 3e38)
    for im in (None, make_imatrix(512, seed=3)):
        ours = quantize(torch.from_numpy(x), qtype, None if im is None else torch.from_numpy(im)).data.numpy()
        ref = ggml_oracle.quantize(t.ggml_id, x, im)
        assert_same_bytes(ours, ref, f"{qtype}/degenerate/imatrix={im is not None}")


@pytest.mark.oracle
def test_q8_k_dequantize_matches_c(ggml_oracle) -> None:
    L = ggml_oracle.lib()
    L.dequantize_row_q8_K.restype = None
    L.dequantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for case, x in make_cases(768).items():
        q = quantize(torch.from_numpy(x), "Q8_K")
        raw = np.ascontiguousarray(q.data.numpy())
        ref = np.zeros(x.size, np.float32)
        L.dequantize_row_q8_K(raw.ctypes.data, ref.ctypes.data, x.size)
        np.testing.assert_array_equal(dequantize(q).numpy().reshape(-1), ref, err_msg=case)


def test_nearest_int_matches_bit_trick() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 4194303.0, 4194304.0, 1e9, -1e9, np.inf, -np.inf, np.nan, 1e-40],
                 np.float32)
    val = (v + np.float32(12582912.0)).astype(np.float32)
    expect = (val.view(np.int32) & 0x7FFFFF) - 0x400000
    np.testing.assert_array_equal(nearest_int(torch.from_numpy(v)).numpy(), expect)


# ---- the static C search functions, compiled from the oracle's source -------------------------

_HEADER = """
#include <math.h>
#include <string.h>
#include <stdbool.h>
#include <stdint.h>
#include <assert.h>
#define GGML_RESTRICT restrict
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define GROUP_MAX_EPS 1e-15f
"""

_EXPORTS = """
float qb_make_qx_quants(int n, int nmax, const float * x, int8_t * L, int rmse_type, const float * qw) {
    return make_qx_quants(n, nmax, x, L, rmse_type, qw);
}
float qb_make_q3_quants(int n, int nmax, const float * x, int8_t * L, int do_rmse) {
    return make_q3_quants(n, nmax, x, L, do_rmse != 0);
}
"""


def _llama_cpp_source() -> Path | None:
    from tests.oracles import ggml_lib

    cands = []
    cache = ggml_lib.BUILD_DIR / "CMakeCache.txt"
    if cache.exists():
        m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache.read_text(), re.M)
        if m:
            cands.append(Path(m.group(1)))
    cands.append(Path.home() / ".cache/quantbench/src/llama_cpp_python-0.3.36/vendor/llama.cpp")
    for c in cands:
        if (c / "ggml/src/ggml-quants.c").exists():
            return c / "ggml/src/ggml-quants.c"
    return None


@pytest.fixture(scope="module")
def c_search(tmp_path_factory):
    src = _llama_cpp_source()
    cc = shutil.which("cc") or shutil.which("gcc")
    if src is None or cc is None:
        pytest.skip("llama.cpp source or a C compiler is missing")
    text = src.read_text()
    start = text.index("static inline int nearest_int(float fval)")
    end = text.index("static float make_qkx1_quants(")
    d = tmp_path_factory.mktemp("csearch")
    (d / "s.c").write_text(_HEADER + text[start:end] + _EXPORTS)
    # ggml-base's own flags: -O3, no -march, so no FMA contraction.
    subprocess.run([cc, "-O3", "-DNDEBUG", "-fPIC", "-std=gnu11", "-shared", "-o", str(d / "s.so"), str(d / "s.c"), "-lm"],
                   check=True)
    lib = ctypes.CDLL(str(d / "s.so"))
    lib.qb_make_qx_quants.restype = ctypes.c_float
    lib.qb_make_qx_quants.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_void_p]
    lib.qb_make_q3_quants.restype = ctypes.c_float
    lib.qb_make_q3_quants.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def _groups(n: int, G: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((G, n)).astype(np.float32)
    x *= np.exp(rng.uniform(-4, 4, (G, 1))).astype(np.float32)
    x[: G // 8] = rng.standard_t(1.2, (G // 8, n)).astype(np.float32)
    x[G // 8 : G // 4] = np.round(x[G // 8 : G // 4] * 2) / 2   # ties
    x[G // 4 : G // 4 + 4] = 0.0
    x[G // 4 + 4, :] = 0.25                                   # constant
    x[G // 4 + 5, :] = 1e-16                                  # below GROUP_MAX_EPS
    x[G // 4 + 6, 0] = -5.0                                   # spike in a zero group
    x[G // 4 + 6, 1:] = 0.0
    return x


def _c_qx(lib, x: np.ndarray, nmax: int, rmse_type: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    G, n = x.shape
    scales = np.zeros(G, np.float32)
    L = np.zeros((G, n), np.int8)
    for g in range(G):
        xg = np.ascontiguousarray(x[g])
        qg = None if qw is None else np.ascontiguousarray(qw[g])
        scales[g] = lib.qb_make_qx_quants(n, nmax, xg.ctypes.data, L[g].ctypes.data, rmse_type,
                                          None if qg is None else qg.ctypes.data)
    return scales, L


@pytest.mark.parametrize("n,nmax", [(16, 4), (16, 32), (32, 8), (32, 16)])
@pytest.mark.parametrize("rmse_type", [0, 1, 2, 3, 4, -1, -2, -4])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweights", "weights"])
def test_make_qx_quants_matches_c(c_search, n: int, nmax: int, rmse_type: int, weighted: bool) -> None:
    G = 600
    x = _groups(n, G, seed=nmax * 10 + abs(rmse_type))
    qw = None
    if weighted:
        rng = np.random.default_rng(5)
        qw = (rng.standard_normal((G, n)) ** 2).astype(np.float32)
        qw[::7, : n // 2] = 0.0
        qw[3::11] = 0.0
    ref_s, ref_L = _c_qx(c_search, x, nmax, rmse_type, qw)
    s, L = make_qx_quants(torch.from_numpy(x), nmax, rmse_type, None if qw is None else torch.from_numpy(qw))
    np.testing.assert_array_equal(s.numpy().view(np.int32), ref_s.view(np.int32))
    np.testing.assert_array_equal(L.numpy(), ref_L.astype(np.int32))


@pytest.mark.parametrize("do_rmse", [True, False])
@pytest.mark.parametrize("n,nmax", [(16, 4), (32, 4), (16, 16)])
def test_make_q3_quants_matches_c(c_search, n: int, nmax: int, do_rmse: bool) -> None:
    G = 800
    x = _groups(n, G, seed=n + nmax)
    ref_s = np.zeros(G, np.float32)
    ref_L = np.zeros((G, n), np.int8)
    for g in range(G):
        xg = np.ascontiguousarray(x[g])
        ref_s[g] = c_search.qb_make_q3_quants(n, nmax, xg.ctypes.data, ref_L[g].ctypes.data, int(do_rmse))
    s, L = make_q3_quants(torch.from_numpy(x), nmax, do_rmse)
    np.testing.assert_array_equal(s.numpy().view(np.int32), ref_s.view(np.int32))
    np.testing.assert_array_equal(L.numpy(), ref_L.astype(np.int32))
