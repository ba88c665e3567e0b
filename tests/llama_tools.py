"""Run llama.cpp's own tools (from the oracle build) with cached outputs, keyed by their inputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.oracles.ggml_lib import tool

CACHE = Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache/quantbench")) / "oracle-outputs"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        else:
            h.update(str(p).encode())
    return h.hexdigest()[:16]


def need(name: str) -> Path:
    p = tool(name)
    if p is None:
        pytest.fail(f"{name} missing: run tests/oracles/build_llama_cpp.sh (.ci/run does)")
    return p


def run(args: list[str | Path], timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def llama_quantize(src: Path, ftype: str, *, imatrix: Path | None = None, pure: bool = False) -> Path:
    out = CACHE / f"{src.stem}-{ftype}-{'pure-' if pure else ''}{_key(src, ftype, imatrix or '', pure)}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.stem}.partial-{os.getpid()}.gguf")  # per process: xdist workers may race
        args: list[str | Path] = [need("llama-quantize")]
        if pure:
            args.append("--pure")
        if imatrix is not None:
            args += ["--imatrix", imatrix]
        run(args + ["--allow-requantize", src, tmp, ftype, "2"])
        os.replace(tmp, out)
    return out


def llama_imatrix(model: Path, text: Path, *, chunks: int, ctx: int, fmt: str = "gguf") -> Path:
    out = CACHE / f"{model.stem}-imatrix-{chunks}x{ctx}-{_key(model, text, chunks, ctx, fmt)}.{'gguf' if fmt == 'gguf' else 'dat'}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
        run([need("llama-imatrix"), "-m", model, "-f", text, "-o", tmp, "--output-format", fmt,
             "--chunks", chunks, "-c", ctx, "-t", "2", "--no-ppl", "-nr"])
        os.replace(tmp, out)
    return out


def llama_perplexity(model: Path, text: Path, *, chunks: int, ctx: int, f32_kv: bool = False) -> float:
    """Final PPL of llama-perplexity; ``f32_kv`` keeps its KV cache in f32 (default f16), as the engine does."""
    kv = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"] if f32_kv else []
    res = run([need("llama-perplexity"), "-m", model, "-f", text, "--chunks", chunks, "-c", ctx, "-t", "2", "-nr", *kv])
    for line in (res.stdout + res.stderr).splitlines():
        if "Final estimate: PPL" in line:
            return float(line.split("PPL =")[1].split()[0])
    raise AssertionError("llama-perplexity printed no final estimate:\n" + res.stderr[-2000:])
