"""Tiny random-weight models of every engine architecture, built with transformers, for reference logits.

Each :class:`ArchCase` names a transformers config (float32, small dims, GQA) and the vocabulary
its GGUF conversion needs: llama.cpp's converter insists on real tokenizer files — a SentencePiece
``tokenizer.model`` (trained here on WikiText with the ``sentencepiece`` package) for the archs
whose converter reads one, or SmolLM2's GPT-2-style BPE vocabulary (exported from its GGUF) whose
pre-tokenizer hash the converter knows. Weights are re-drawn with a spread large enough that
soft-caps, sliding windows and routing all change the logits (transformers' 0.02-std init leaves
a near-constant model that would hide such bugs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

SPM_VOCAB = 320
GPT2_VOCAB = 49152  # SmolLM2's vocabulary
LLAMA_CPP_VERSION = "0.3.36"
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class ArchCase:
    """One architecture variant: how to build it and what to expect of its GGUF conversion."""

    name: str
    build: Callable[[int], Any]  # vocab size -> transformers model (random weights, eval, float32)
    vocab: str = "spm"  # "spm" | "gpt2"
    gguf: bool = True  # converted and checked through the GGUF path
    # transformers config overrides for the GGUF reference, where the GGUF format cannot carry
    # a setting the HF config has (the converter drops it, as llama.cpp does)
    gguf_reference_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 32

    @property
    def vocab_size(self) -> int:
        return SPM_VOCAB if self.vocab == "spm" else GPT2_VOCAB


def _common(vocab: int, **kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common(vocab, num_hidden_layers=3)))


def _llama3(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    # original_max_position_embeddings is small so wavelengths fall in all three llama3 bands
    # (kept, smoothed, divided by factor) at head_dim 16
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(**_common(vocab, rope_parameters=rope, tie_word_embeddings=True,
                                                  bos_token_id=1, eos_token_id=2)))


def _mistral(vocab: int, **over: Any):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common(vocab, sliding_window=8, head_dim=16, **over)))


def _qwen2(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common(vocab, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                                  tie_word_embeddings=True)))


def _qwen3(vocab: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 32 != hidden/heads: q/k/v widths differ from the hidden size
    return Qwen3ForCausalLM(Qwen3Config(**_common(vocab, head_dim=32)))


def _gemma2(vocab: int, **over: Any):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
              attn_logit_softcapping=3.0, final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh",
              tie_word_embeddings=True)
    kw.update(over)
    return Gemma2ForCausalLM(Gemma2Config(**_common(vocab, **kw)))


def _gemma3(vocab: int, **over: Any):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # six layers: llama.cpp's GGUF fixes Gemma 3's pattern at five sliding layers then one global.
    # The sliding layers' rope base is not Gemma's usual 10000, so a reader that ignores
    # rope.freq_base_swa shows up.
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}
    kw = dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
              rope_parameters=rope, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
              final_logit_softcapping=5.0)
    kw.update(over)
    return Gemma3ForCausalLM(Gemma3TextConfig(**_common(vocab, **kw)))


def _phi3(vocab: int):
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_common(vocab, original_max_position_embeddings=256)))


def _phi3_longrope(vocab: int):
    from transformers import Phi3Config, Phi3ForCausalLM

    half = 8  # head_dim 16
    g = torch.Generator().manual_seed(7)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": (1.0 + torch.rand(half, generator=g)).tolist(),
            "long_factor": (1.0 + 8 * torch.rand(half, generator=g)).tolist(),
            "original_max_position_embeddings": 16}
    # sequences of 32 > 16 positions: the long factors and the attention factor both apply
    return Phi3ForCausalLM(Phi3Config(**_common(vocab, rope_parameters=rope, max_position_embeddings=128,
                                                original_max_position_embeddings=16)))


def _mixtral(vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_common(vocab, num_local_experts=4, num_experts_per_tok=2)))


def _qwen3_moe(vocab: int, **over: Any):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw = dict(num_hidden_layers=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    kw.update(over)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**_common(vocab, **kw)))


CASES: list[ArchCase] = [
    ArchCase("llama", _llama),
    ArchCase("llama3", _llama3),
    # llama.cpp's converter writes no sliding window for Mistral (GGUF arch "llama"): the GGUF is a
    # full-attention model, so its reference is transformers with the window off
    ArchCase("mistral", _mistral, gguf_reference_overrides={"sliding_window": None}),
    ArchCase("qwen2", _qwen2),
    ArchCase("qwen3", _qwen3),
    ArchCase("gemma2", _gemma2),
    # query_pre_attn_scalar != head_dim: GGUF has no key for it (llama.cpp derives the scale), HF only
    ArchCase("gemma2_qscale", lambda v: _gemma2(v, query_pre_attn_scalar=40), gguf=False),
    ArchCase("gemma3", _gemma3),
    # explicit layer_types instead of the 6-periodic pattern: HF only (GGUF fixes the period)
    ArchCase("gemma3_layer_types", lambda v: _gemma3(v, num_hidden_layers=3, final_logit_softcapping=None,
                                                     layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention"]), gguf=False),
    ArchCase("phi3", _phi3),
    ArchCase("phi3_longrope", _phi3_longrope),
    ArchCase("mixtral", _mixtral),
    # llama.cpp's Qwen-MoE converter reads only a GPT-2-style BPE vocabulary (no SentencePiece path)
    ArchCase("qwen3_moe", _qwen3_moe, vocab="gpt2"),
    # dense layers among routed ones (llama.cpp's converter refuses dense MLPs in a qwen3moe model,
    # and its runtime always renormalizes the top-k weights): HF only
    ArchCase("qwen3_moe_mlp_only", lambda v: _qwen3_moe(v, num_hidden_layers=3, mlp_only_layers=[1]), gguf=False),
    ArchCase("qwen3_moe_sparse_step", lambda v: _qwen3_moe(v, num_hidden_layers=4, decoder_sparse_step=2,
                                                           norm_topk_prob=False), gguf=False),
]


def case(name: str) -> ArchCase:
    return next(c for c in CASES if c.name == name)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Spread every weight out: matrices N(0, 1/sqrt(fan_in)), norms and biases visibly non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                centre = 0.0 if "gemma" in type(model).__name__.lower() else 1.0  # Gemma norms scale by 1 + w
                if "bias" in name:
                    centre = 0.0
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))


def build(c: ArchCase, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = c.build(c.vocab_size)
    randomize(model, seed)
    return model.float().eval()


def reference_logits(model: Any, tokens: torch.Tensor, **overrides: Any) -> torch.Tensor:
    """transformers' logits for ``tokens`` (eager attention), optionally with config fields changed."""
    saved = {k: getattr(model.config, k) for k in overrides}
    try:
        for k, v in overrides.items():
            setattr(model.config, k, v)
        with torch.no_grad():
            return model(tokens, use_cache=False).logits.float()
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)


# --- transformers 4 style configs ------------------------------------------------------------


def to_v4_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same model described the transformers 4 way — as most hub checkpoints still are:
    ``rope_theta`` + ``rope_scaling``, Gemma 3's ``rope_local_base_freq`` and
    ``sliding_window_pattern`` instead of ``layer_types``, Qwen3-MoE's ``num_experts``."""
    out = dict(cfg)
    rp = out.pop("rope_parameters", None) or {}
    if "full_attention" in rp:
        out["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
        rp = rp["full_attention"]
    rp = dict(rp)
    out["rope_theta"] = rp.pop("rope_theta", 10000.0)
    rp.pop("partial_rotary_factor", None)
    kind = rp.pop("rope_type", "default")
    # Phi-3's hub configs say "type" (transformers 5 reads that for Phi-3 but not for Gemma 3),
    # Llama 3.x and Gemma 3 ones say "rope_type"
    key = "type" if out.get("model_type") == "phi3" else "rope_type"
    out["rope_scaling"] = None if kind == "default" else {key: kind, **rp}
    if out.get("model_type") == "gemma3_text":
        types = out.pop("layer_types")
        out["sliding_window_pattern"] = types.index("full_attention") + 1
        assert types == ["full_attention" if (i + 1) % out["sliding_window_pattern"] == 0 else "sliding_attention"
                         for i in range(len(types))]
        out.pop("_sliding_window_pattern", None)
    if out.get("model_type") == "gemma2":
        out.pop("layer_types")
    if out.get("model_type") == "qwen3_moe":
        out["num_experts"] = out.pop("num_local_experts")
    return out


# --- tokenizer files the converter accepts -------------------------------------------------


def train_spm(out_dir: Path) -> Path:
    """A SentencePiece BPE model of ``SPM_VOCAB`` pieces trained on WikiText-2 text."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = (DATA / "wiki.test.raw").read_text(encoding="utf-8")[:200_000]
    sentences = [s.strip() for s in text.splitlines() if s.strip()]
    prefix = out_dir / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=SPM_VOCAB, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, seed_sentencepiece_size=50_000, input_sentence_size=0)
    return prefix.with_suffix(".model")


def export_gpt2_vocab(out_dir: Path) -> Path:
    """SmolLM2's BPE tokenizer as HF ``tokenizer.json`` + ``tokenizer_config.json``."""
    from quantbench.engine.tokenizer import Tokenizer
    from quantbench.sources import resolve_model

    Tokenizer.from_gguf(resolve_model("smollm2")).to_hf_files(out_dir)
    return out_dir


def install_tokenizer(c: ArchCase, model_dir: Path, spm_model: Path, gpt2_dir: Path) -> None:
    if c.vocab == "spm":
        shutil.copy(spm_model, model_dir / "tokenizer.model")
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(gpt2_dir / f, model_dir / f)


# --- llama.cpp's converter -----------------------------------------------------------------


def find_converter() -> Path | None:
    """``convert_hf_to_gguf.py`` of the llama.cpp version vendored in llama-cpp-python (the oracle)."""
    roots = [Path.home() / ".cache" / "quantbench" / "src", Path("/tmp/llsrc")]
    env = os.environ.get("QUANTBENCH_LLAMA_CPP_SRC")
    if env:
        roots.insert(0, Path(env))
    for r in roots:
        for cand in (r / "convert_hf_to_gguf.py",
                     r / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"):
            if cand.is_file():
                return cand
    return None


def fetch_converter() -> Path:
    """Unpack the llama-cpp-python sdist into the quantbench source cache (as build_llama_cpp.sh does)."""
    found = find_converter()
    if found is not None:
        return found
    cache = Path.home() / ".cache" / "quantbench" / "src"
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(cache)], check=True,
                       capture_output=True)
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(cache)], check=True)
    found = find_converter()
    if found is None:
        raise FileNotFoundError(f"convert_hf_to_gguf.py not found after unpacking {sdist}")
    return found


# One interpreter converts every model: the converter's own work takes well under a second per tiny
# model, its imports (torch, transformers) several seconds — paid once instead of once per model.
_DRIVER = """
import json, os, runpy, sys, traceback
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))  # as running the script directly would (its `conversion` package)
failed = 0
for model_dir, out in jobs:
    sys.argv = [script, model_dir, "--outtype", "f32", "--outfile", out]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            failed += 1
            print(f"CONVERT FAILED {model_dir}: exit {e.code}", flush=True)
    except Exception:
        failed += 1
        print(f"CONVERT FAILED {model_dir}:", traceback.format_exc(), flush=True)
sys.exit(1 if failed else 0)
"""


def start_conversions(converter: Path, jobs: list[tuple[Path, Path]]) -> subprocess.Popen:
    """Start llama.cpp's HF → GGUF (f32) conversion of every ``(model_dir, out_file)`` job in one
    background process; the caller waits on it (and may do other work meanwhile)."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own vendored gguf-py
    payload = json.dumps([[str(d), str(o)] for d, o in jobs])
    return subprocess.Popen([sys.executable, "-c", _DRIVER, str(converter), payload], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
