"""Every engine architecture against transformers: the HF-dir path, the KV-cache path, and the
GGUF path after conversion with llama.cpp's own ``convert_hf_to_gguf.py``.

Models are tiny and random (``arch_models``); logits must agree to < 1e-3 (float32). The
converter runs once per session for all models, in a background process that starts as soon
as the HF dirs are written, so the HF tests run while it works.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine import arch_models as am

TOL = 1e-3
CACHE_TOL = 1e-4
GGUF_CASES = [c.name for c in am.CASES if c.gguf]


@dataclass
class Built:
    case: am.ArchCase
    model: Any  # the transformers model
    dir: Path
    tokens: torch.Tensor
    reference: dict[str, torch.Tensor] = field(default_factory=dict)

    def ref(self, overrides: dict[str, Any] | None = None) -> torch.Tensor:
        key = repr(sorted((overrides or {}).items()))
        if key not in self.reference:
            self.reference[key] = am.reference_logits(self.model, self.tokens, **(overrides or {}))
        return self.reference[key]


@dataclass
class Session:
    built: dict[str, Built]
    converter: subprocess.Popen | None
    gguf_dir: Path
    converter_problem: str | None = None
    converter_log: str | None = None

    def wait_gguf(self) -> str:
        if self.converter_problem is not None:
            pytest.skip(self.converter_problem)
        if self.converter_log is None:
            out, _ = self.converter.communicate(timeout=600)
            self.converter_log = out
        return self.converter_log


def _tokens(c: am.ArchCase) -> torch.Tensor:
    return torch.randint(0, c.vocab_size, (2, c.seq_len), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    root = tmp_path_factory.mktemp("archs")
    spm = am.train_spm(root / "spm")
    gpt2 = am.export_gpt2_vocab(root / "gpt2")
    built: dict[str, Built] = {}
    jobs = []
    for c in am.CASES:
        model = am.build(c)
        d = root / c.name
        model.save_pretrained(d)
        am.install_tokenizer(c, d, spm, gpt2)
        built[c.name] = Built(c, model, d, _tokens(c))
        if c.gguf:
            jobs.append((d, root / f"{c.name}.gguf"))
    problem, proc = None, None
    try:
        converter = am.fetch_converter()
    except (OSError, subprocess.CalledProcessError) as e:
        problem = f"llama.cpp's convert_hf_to_gguf.py is not available and could not be fetched: {e}"
    else:
        proc = am.start_conversions(converter, jobs)
    s = Session(built, proc, root, problem)
    yield s
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _load(path: Path):
    from quantbench.engine import load_model

    return load_model(path, dtype="f32", device="cpu", with_tokenizer=False)


def _max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all()
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", [c.name for c in am.CASES])
def test_hf_dir_matches_transformers(session: Session, name: str) -> None:
    b = session.built[name]
    lm = _load(b.dir)
    assert lm.kind == "hf"
    with torch.no_grad():
        out = lm.model(b.tokens)
    d = _max_delta(out, b.ref())
    print(f"{name}: HF dir max|Δ logits| = {d:.3g}")
    assert d < TOL


@pytest.mark.parametrize("name", [c.name for c in am.CASES])
def test_incremental_decode_matches_full_forward(session: Session, name: str) -> None:
    """Prefill, then one token at a time through the KV cache: the same logits as one pass
    (sliding windows, longrope's long factors and local/global ropes included)."""
    b = session.built[name]
    model = _load(b.dir).model
    T, prefill = b.tokens.shape[1], 20
    with torch.no_grad():
        full = model(b.tokens)
        cache = model.make_cache(T, batch=b.tokens.shape[0])
        parts = [model(b.tokens[:, :prefill], cache=cache, start=0)]
        for pos in range(prefill, T):
            parts.append(model(b.tokens[:, pos:pos + 1], cache=cache, start=pos))
    d = _max_delta(torch.cat(parts, dim=1), full)
    assert d < CACHE_TOL, f"{name}: incremental decode differs from the full forward by {d:.3g}"


@pytest.mark.parametrize("name", GGUF_CASES)
def test_gguf_matches_transformers(session: Session, name: str) -> None:
    log = session.wait_gguf()
    b = session.built[name]
    path = session.gguf_dir / f"{name}.gguf"
    assert path.is_file(), f"llama.cpp's converter produced no {path.name}:\n{log[-4000:]}"
    lm = _load(path)
    assert lm.kind == "gguf"
    with torch.no_grad():
        out = lm.model(b.tokens)
    d = _max_delta(out, b.ref(b.case.gguf_reference_overrides))
    print(f"{name}: GGUF max|Δ logits| = {d:.3g}")
    assert d < TOL


def test_mistral_window_is_exercised(session: Session) -> None:
    """The Mistral case's window (8 of 32 positions) changes transformers' own logits — so the
    HF-dir check tests the window, and the GGUF check (window off: llama.cpp's converter drops
    it) is a different reference."""
    b = session.built["mistral"]
    assert _max_delta(b.ref(), b.ref({"sliding_window": None})) > 0.1


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_checkpoint(session: Session, name: str, tmp_path: Path) -> None:
    """transformers 5 saves experts one tensor per expert (v4 names), but its in-memory
    state_dict — and files written from it — hold fused ``experts.gate_up_proj`` [E, 2F, H] and
    ``experts.down_proj`` [E, H, F], under ``mlp.`` for Mixtral too. Both layouts load."""
    from safetensors.torch import save_file

    b = session.built[name]
    for f in b.dir.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, tmp_path / f.name)
    state = {k: v.contiguous() for k, v in b.model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        out = _load(tmp_path).model(b.tokens)
    assert _max_delta(out, b.ref()) < TOL


@pytest.mark.parametrize("name", ["llama3", "gemma2", "gemma3", "phi3_longrope", "qwen3_moe_mlp_only"])
def test_transformers4_style_config(session: Session, name: str, tmp_path: Path) -> None:
    """Hub checkpoints mostly carry v4 configs (``rope_scaling``, ``rope_local_base_freq``,
    ``sliding_window_pattern``, ``num_experts``). The rewrite is checked by transformers itself
    (it must reload to the same logits), then the engine must agree with it."""
    from transformers import AutoModelForCausalLM

    b = session.built[name]
    cfg = am.to_v4_config(json.loads((b.dir / "config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(b.dir / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _max_delta(am.reference_logits(hf, b.tokens), b.ref()) < TOL
    with torch.no_grad():
        out = _load(tmp_path).model(b.tokens)
    assert _max_delta(out, b.ref()) < TOL


@pytest.mark.parametrize("arch,layers,hidden,heads,head_dim,expected", [
    ("gemma2", 26, 2304, 8, 256, 256.0),   # Gemma 2 2B: HF query_pre_attn_scalar 256 = head_dim
    ("gemma2", 46, 4608, 32, 128, 144.0),  # Gemma 2 27B: 144 = hidden/heads
    ("gemma3", 34, 2560, 8, 256, 256.0),   # Gemma 3 4B
    ("gemma3", 62, 5376, 32, 128, 168.0),  # Gemma 3 27B
])
def test_gemma_gguf_query_scale(arch: str, layers: int, hidden: int, heads: int, head_dim: int,
                                expected: float) -> None:
    """GGUF carries no query_pre_attn_scalar; as llama.cpp, the 27B models (known by layer count)
    scale by hidden/heads and the others by head_dim — matching the real HF configs above."""
    from quantbench.engine.models import module_for_gguf
    from quantbench.engine.models.config_keys import Source

    meta = {f"{arch}.{k}": v for k, v in {
        "embedding_length": hidden, "feed_forward_length": 4 * hidden, "block_count": layers,
        "attention.head_count": heads, "attention.head_count_kv": heads // 2, "attention.key_length": head_dim,
        "attention.sliding_window": 4096}.items()}
    args = module_for_gguf(arch, "meta").from_gguf(Source(meta, "meta", prefix=f"{arch}."), 1000, set())
    assert args.query_pre_attn_scalar == expected
