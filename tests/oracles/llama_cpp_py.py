"""llama.cpp's own Python binding as a token/logit oracle, without a second compile.

The pure-Python package ``llama_cpp/`` of the llama-cpp-python 0.3.36 sdist is imported straight
from the unpacked sdist (``~/.cache/quantbench/src/llama_cpp_python-0.3.36``) and pointed, through
``LLAMA_CPP_LIB_PATH``, at the ``libllama.so`` that ``tests/oracles/build_llama_cpp.sh`` compiled
from the same sdist's ``vendor/llama.cpp``; both come from one source tree, so the ctypes structs
match the library's ABI.  We drive the low-level C API ourselves rather than ``llama_cpp.Llama``
because two settings the oracle needs are not reachable through ``Llama.__init__``: the model
parameter ``use_extra_bufts=False`` (the CPU weight-repack path segfaults on quantized models on
this CPU) and ``flash_attn_type=DISABLED`` (plain f32 attention).  The KV cache is f32
(``type_k = type_v = GGML_TYPE_F32``) and every position's logits are requested (``logits_all``).

Logits and greedy continuations are cached on disk (``oracle-outputs/llama-cpp-py``), keyed by
the GGUF's content hash and every argument, because one 256-token forward pass costs seconds on
two threads and the tests ask the same question on every run.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import subprocess
import sys
import tarfile
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SDIST_VERSION = "0.3.36"
SRC_CACHE = Path.home() / ".cache" / "quantbench" / "src"
BUILD_DIR = Path(os.environ.get("QUANTBENCH_LLAMA_CPP_BUILD", Path.home() / ".cache/quantbench/llama.cpp-build"))
CACHE = Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache/quantbench")) / "oracle-outputs" / "llama-cpp-py"
BUILD_SCRIPT = Path(__file__).with_name("build_llama_cpp.sh")
N_THREADS = 2


class OracleError(RuntimeError):
    """The oracle could not be set up or llama.cpp refused an input (message says which)."""


# --------------------------------------------------------------------------------------------
# locating / loading the binding
# --------------------------------------------------------------------------------------------


def sdist_dir() -> Path:
    """The unpacked llama-cpp-python sdist, downloaded from PyPI into ``SRC_CACHE`` if absent
    (the same ``pip download`` that build_llama_cpp.sh runs on a fresh machine)."""
    d = SRC_CACHE / f"llama_cpp_python-{SDIST_VERSION}"
    if (d / "llama_cpp" / "llama_cpp.py").exists():
        return d
    SRC_CACHE.mkdir(parents=True, exist_ok=True)
    tgz = SRC_CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tgz.exists():
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={SDIST_VERSION}", "-d", str(SRC_CACHE)],
            capture_output=True, text=True,
        )
        if res.returncode != 0 or not tgz.exists():
            raise OracleError(f"could not download llama-cpp-python {SDIST_VERSION} sdist:\n{res.stderr[-2000:]}")
    with tarfile.open(tgz) as tf:
        tf.extractall(SRC_CACHE, filter="data")
    if not (d / "llama_cpp" / "llama_cpp.py").exists():
        raise OracleError(f"{tgz} did not unpack to {d}")
    return d


def lib_dir() -> Path:
    """The build's ``bin`` folder holding libllama.so; builds it (minutes) if it is missing."""
    bin_dir = BUILD_DIR / "bin"
    if not (bin_dir / "libllama.so").exists():
        res = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
        if res.returncode != 0 or not (bin_dir / "libllama.so").exists():
            raise OracleError(f"{BUILD_SCRIPT} did not produce {bin_dir / 'libllama.so'}:\n{res.stderr[-2000:]}")
    return bin_dir


_LOG: list[str] = []


@lru_cache(maxsize=1)
def binding() -> Any:
    """The ``llama_cpp.llama_cpp`` ctypes module, bound to the oracle build's libllama.so."""
    src = sdist_dir()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir())
    loaded = sys.modules.get("llama_cpp")
    if loaded is not None and Path(loaded.__file__).resolve().parent != (src / "llama_cpp").resolve():
        raise OracleError(f"another llama_cpp package is already imported ({loaded.__file__}); "
                          f"the oracle needs the one from {src} to match libllama's ABI")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    mod = importlib.import_module("llama_cpp.llama_cpp")
    if Path(mod.__file__).resolve().parent != (src / "llama_cpp").resolve():
        raise OracleError(f"imported {mod.__file__}, expected the sdist copy under {src}")

    # Keep llama.cpp's chatter off stderr, but remember it for error messages.
    @mod.llama_log_callback
    def _log(level: int, text: bytes, user_data: Any) -> None:  # noqa: ARG001
        _LOG.append(text.decode("utf-8", "replace"))
        del _LOG[:-50]

    binding._log_cb = _log  # type: ignore[attr-defined]  # the C side keeps only a raw pointer
    mod.llama_log_set(_log, ctypes.c_void_p())
    mod.llama_backend_init()
    return mod


def _recent_log() -> str:
    return "".join(_LOG[-15:])


class _Model:
    """A loaded llama_model (+ its vocab) that is freed when garbage collected."""

    def __init__(self, path: Path, vocab_only: bool):
        L = binding()
        self.L = L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.vocab_only = vocab_only
        mp.use_extra_bufts = False  # no CPU repack: it segfaults on quantized weights on this CPU
        _LOG.clear()
        self.ptr = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.ptr:
            raise OracleError(f"llama.cpp could not load {path}:\n{_recent_log()}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        # finalize (not __del__) so the free also runs, in order, at interpreter exit
        weakref.finalize(self, L.llama_model_free, self.ptr)


@lru_cache(maxsize=8)
def _model(path: str, mtime_ns: int, vocab_only: bool) -> _Model:  # noqa: ARG001 (mtime: cache key)
    return _Model(Path(path), vocab_only)


def _load(path: Path, vocab_only: bool) -> _Model:
    path = Path(path).resolve()
    return _model(str(path), path.stat().st_mtime_ns, vocab_only)


# --------------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------------


def llama_tokenize(gguf_path: str | os.PathLike[str], text: str, *, add_bos: bool = True,
                   special: bool = True) -> list[int]:
    """llama.cpp's token ids for ``text``.

    ``add_bos`` is llama_tokenize's ``add_special`` (BOS/EOS are added only where the vocabulary
    says so, e.g. ``tokenizer.ggml.add_bos_token``); ``special`` is ``parse_special`` (control
    tokens written in the text become their ids).  Only the vocabulary is loaded.
    """
    m = _load(Path(gguf_path), vocab_only=True)
    L = m.L
    data = text.encode("utf-8")
    cap = len(data) + 16
    while True:
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(m.vocab, data, len(data), buf, cap, add_bos, special)
        if n >= 0:
            return list(buf[:n])
        if -n <= cap:
            raise OracleError(f"llama_tokenize failed on {gguf_path}:\n{_recent_log()}")
        cap = -n


def llama_detokenize(gguf_path: str | os.PathLike[str], tokens: list[int], *, special: bool = False) -> str:
    """llama.cpp's text for ``tokens`` (``unparse_special=special``, no space cleanup)."""
    m = _load(Path(gguf_path), vocab_only=True)
    L = m.L
    arr = (L.llama_token * max(len(tokens), 1))(*tokens)
    cap = 64 + 32 * len(tokens)
    while True:
        buf = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(m.vocab, arr, len(tokens), buf, cap, False, special)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", "replace")
        cap = -n


def llama_eog_ids(gguf_path: str | os.PathLike[str]) -> list[int]:
    """Every token id llama.cpp treats as end-of-generation for this vocabulary."""
    m = _load(Path(gguf_path), vocab_only=True)
    return [i for i in range(m.n_vocab) if m.L.llama_vocab_is_eog(m.vocab, i)]


# --------------------------------------------------------------------------------------------
# logits and greedy decoding
# --------------------------------------------------------------------------------------------

_SHA: dict[tuple[str, int, int], str] = {}


def _file_sha(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def _cache_path(kind: str, gguf_path: Path, *args: object) -> Path:
    h = hashlib.sha256(_file_sha(gguf_path).encode())
    h.update(repr((SDIST_VERSION, N_THREADS) + args).encode())
    return CACHE / f"{Path(gguf_path).stem}-{kind}-{h.hexdigest()[:20]}.npy"


class _Context:
    """A llama_context with f32 KV cache, plain attention and room for ``n_batch`` tokens."""

    def __init__(self, m: _Model, n_ctx: int, n_batch: int):
        L = m.L
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = N_THREADS
        cp.n_threads_batch = N_THREADS
        cp.type_k = L.GGML_TYPE_F32
        cp.type_v = L.GGML_TYPE_F32
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.embeddings = False
        cp.no_perf = True
        self.L, self.m = L, m
        _LOG.clear()
        self.ptr = L.llama_init_from_model(m.ptr, cp)
        if not self.ptr:
            raise OracleError(f"llama_init_from_model failed (n_ctx={n_ctx}):\n{_recent_log()}")
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch
        weakref.finalize(self, _free_context, L, self.ptr, self.batch, m)

    def decode(self, tokens: list[int], start_pos: int, all_logits: bool) -> np.ndarray:
        """Run ``tokens`` at positions ``start_pos...``; logits [T or 1, V] float32."""
        L, b = self.L, self.batch
        T = len(tokens)
        if T > self.n_batch:
            raise OracleError(f"{T} tokens exceed n_batch={self.n_batch}")
        b.n_tokens = T
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == T - 1
        _LOG.clear()
        rc = L.llama_decode(self.ptr, b)
        if rc != 0:
            raise OracleError(f"llama_decode returned {rc}:\n{_recent_log()}")
        n_out = T if all_logits else 1
        ptr = L.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_out * self.m.n_vocab,)).reshape(n_out, self.m.n_vocab).copy()



def _free_context(L: Any, ctx: Any, batch: Any, model: _Model) -> None:  # noqa: ARG001
    """Free a context's batch and the context; holding ``model`` keeps it alive until then."""
    L.llama_batch_free(batch)
    L.llama_free(ctx)


def _check_tokens(m: _Model, tokens: list[int], what: str) -> list[int]:
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise OracleError(f"{what}: empty token list")
    bad = [t for t in tokens if not 0 <= t < m.n_vocab]
    if bad:
        raise OracleError(f"{what}: token ids {bad[:5]} outside the vocabulary of {m.n_vocab}")
    return tokens


def llama_logits(gguf_path: str | os.PathLike[str], tokens: list[int], *, n_ctx: int | None = None,
                 use_cache: bool = True) -> np.ndarray:
    """llama.cpp's logits for every position of ``tokens`` in one batch: float32 [T, V]."""
    path = Path(gguf_path)
    tokens = list(map(int, tokens))
    n_ctx = n_ctx or max(len(tokens), 256)
    cached = _cache_path("logits", path, tuple(tokens), n_ctx)
    if use_cache and cached.exists():
        return np.load(cached)
    m = _load(path, vocab_only=False)
    tokens = _check_tokens(m, tokens, "llama_logits")
    if len(tokens) > n_ctx:
        raise OracleError(f"llama_logits: {len(tokens)} tokens exceed n_ctx={n_ctx}")
    ctx = _Context(m, n_ctx, len(tokens))
    out = ctx.decode(tokens, 0, all_logits=True)
    del ctx
    _save(cached, out)
    return out


def llama_greedy(gguf_path: str | os.PathLike[str], prompt_tokens: list[int], n: int, *,
                 n_ctx: int | None = None, stop_on_eog: bool = False, use_cache: bool = True) -> list[int]:
    """The ``n`` tokens llama.cpp picks by argmax after ``prompt_tokens`` (prompt excluded).

    With ``stop_on_eog`` generation ends after the first end-of-generation token (it is
    included), as ``llama-cli`` would stop.
    """
    path = Path(gguf_path)
    prompt = list(map(int, prompt_tokens))
    n_ctx = n_ctx or max(len(prompt) + n, 256)
    cached = _cache_path("greedy", path, tuple(prompt), n, n_ctx, stop_on_eog)
    if use_cache and cached.exists():
        return np.load(cached).tolist()
    m = _load(path, vocab_only=False)
    prompt = _check_tokens(m, prompt, "llama_greedy")
    if len(prompt) + n > n_ctx:
        raise OracleError(f"llama_greedy: {len(prompt)} + {n} tokens exceed n_ctx={n_ctx}")
    ctx = _Context(m, n_ctx, len(prompt))
    logits = ctx.decode(prompt, 0, all_logits=False)
    out: list[int] = []
    pos = len(prompt)
    while len(out) < n:
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
        if stop_on_eog and m.L.llama_vocab_is_eog(m.vocab, tok):
            break
        if len(out) == n:
            break
        logits = ctx.decode([tok], pos, all_logits=False)
        pos += 1
    del ctx
    _save(cached, np.asarray(out, dtype=np.int64))
    return out


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
