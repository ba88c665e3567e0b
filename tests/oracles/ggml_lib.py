"""ctypes access to llama.cpp's own quantizers: the byte-exact oracle for every GGML type.

The library is ``libggml-base.so`` from llama.cpp as vendored in llama-cpp-python 0.3.36. It is
looked up in the installed ``llama_cpp`` package first, then in the cmake build that
``tests/oracles/build_llama_cpp.sh`` makes from the same sdist (``$QUANTBENCH_LLAMA_CPP_BUILD``,
default ``~/.cache/quantbench/llama.cpp-build``).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

BUILD_DIR = Path(os.environ.get("QUANTBENCH_LLAMA_CPP_BUILD", Path.home() / ".cache/quantbench/llama.cpp-build"))


def _candidates() -> list[Path]:
    out = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec and spec.origin:
            out.append(Path(spec.origin).parent / "lib" / "libggml-base.so")
    except Exception:
        pass
    out.append(BUILD_DIR / "bin" / "libggml-base.so")
    return out


def tool(name: str) -> Path | None:
    """Path of a llama.cpp tool (llama-quantize, llama-perplexity...) from the oracle build."""
    p = BUILD_DIR / "bin" / name
    return p if p.exists() else None


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL | None:
    for p in _candidates():
        if p.exists():
            L = ctypes.CDLL(str(p))
            L.ggml_quantize_chunk.restype = ctypes.c_size_t
            L.ggml_quantize_chunk.argtypes = [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_int64, ctypes.c_void_p,
            ]
            L.ggml_row_size.restype = ctypes.c_size_t
            L.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
            for fn in ("quantize_row_q8_1_ref", "quantize_row_q8_K_ref"):
                getattr(L, fn).restype = None
                getattr(L, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            return L
    return None


_ROW_REF = {9: "quantize_row_q8_1_ref", 15: "quantize_row_q8_K_ref"}


def quantize(ggml_id: int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for ``x`` ([rows, n_per_row] float32) as uint8 [rows, row_bytes]."""
    L = lib()
    assert L is not None, "llama.cpp oracle library not found; run tests/oracles/build_llama_cpp.sh"
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    row_size = L.ggml_row_size(ggml_id, n)
    out = np.zeros((rows, row_size), dtype=np.uint8)
    if ggml_id in _ROW_REF:
        getattr(L, _ROW_REF[ggml_id])(x.ctypes.data, out.ctypes.data, rows * n)
        return out
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
    L.ggml_quantize_chunk(ggml_id, x.ctypes.data, out.ctypes.data, 0, rows, n, None if qw is None else qw.ctypes.data)
    return out
