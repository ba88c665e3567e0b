"""llama.cpp's intermediate tensors for one batch, through the context's ``cb_eval`` hook.

Bit-exact emulation of ggml-cpu needs to know *which* op first produces different bits; this
module runs one ``llama_decode`` with the scheduler's eval callback set and copies every float
tensor the graph computes (``attn_norm-0``, ``Qcur-0``, ``kq_soft_max-0``, ``ffn_out-0``,
``result_output``...) out of host memory. The context is the oracle's (f32 KV cache, flash
attention off, no weight repack), so the traced numbers are the ones ``llama_logits`` returns.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from tests.oracles import llama_cpp_py

# struct ggml_tensor: enum ggml_type type (int32 at 0), ..., int64 ne[4] at 16, size_t nb[4] at 48
_NE_OFF, _NB_OFF = 16, 48
_NP_TYPE = {0: np.float32, 1: np.float16, 26: np.int32}


def _ggml_base() -> ctypes.CDLL:
    L = ctypes.CDLL(str(llama_cpp_py.lib_dir() / "libggml-base.so"))
    L.ggml_get_name.restype = ctypes.c_char_p
    L.ggml_get_name.argtypes = [ctypes.c_void_p]
    L.ggml_get_data.restype = ctypes.c_void_p
    L.ggml_get_data.argtypes = [ctypes.c_void_p]
    L.ggml_nbytes.restype = ctypes.c_size_t
    L.ggml_nbytes.argtypes = [ctypes.c_void_p]
    return L


def _read(G: ctypes.CDLL, t: int) -> tuple[str, np.ndarray] | None:
    ttype = ctypes.c_int32.from_address(t).value
    dt = _NP_TYPE.get(ttype)
    if dt is None:
        return None
    ne = list((ctypes.c_int64 * 4).from_address(t + _NE_OFF))
    nb = list((ctypes.c_size_t * 4).from_address(t + _NB_OFF))
    data = G.ggml_get_data(t)
    if not data:
        return None
    item = np.dtype(dt).itemsize
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + item
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(data)).view(dt)
    arr = np.lib.stride_tricks.as_strided(raw, shape=tuple(reversed(ne)), strides=tuple(reversed(nb)))
    return G.ggml_get_name(t).decode(), np.array(arr, copy=True)


def llama_trace(gguf_path: str | Path, tokens: list[int], n_threads: int = 1) -> dict[str, list[np.ndarray]]:
    """Every float intermediate of one batched decode of ``tokens``, by name, in the order the
    graph computed them (``Qcur-0`` is named before and after rope). Arrays have ggml's ``ne``
    reversed: a ``[ne1, ne0]`` tensor is ``arr[ne1][ne0]``."""
    m = llama_cpp_py._load(Path(gguf_path), vocab_only=False)
    L = m.L
    G = _ggml_base()
    out: dict[str, list[np.ndarray]] = {}

    @L.ggml_backend_sched_eval_callback
    def cb(t, ask, user):  # noqa: ARG001
        if ask:
            return True
        got = _read(G, t)
        if got is not None:
            out.setdefault(got[0], []).append(got[1])
        return True

    cp = L.llama_context_default_params()
    cp.n_ctx = max(len(tokens), 256)
    cp.n_batch = cp.n_ubatch = len(tokens)
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.type_k = cp.type_v = L.GGML_TYPE_F32
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.no_perf = True
    cp.cb_eval = cb
    ctx = L.llama_init_from_model(m.ptr, cp)
    if not ctx:
        raise llama_cpp_py.OracleError("llama_init_from_model failed for the trace context")
    batch = L.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise llama_cpp_py.OracleError(f"llama_decode returned {rc}")
        ptr = L.llama_get_logits(ctx)
        out["logits"] = [np.ctypeslib.as_array(ptr, shape=(len(tokens) * m.n_vocab,)).reshape(len(tokens), m.n_vocab).copy()]
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    return out
