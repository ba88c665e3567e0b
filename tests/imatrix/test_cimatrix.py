"""mistral.rs ``.cimatrix`` files, and lossless conversion among GGUF imatrix, legacy .dat and .cimatrix.

The mistral.rs checks run the real ``mistralrs`` 0.9.5 (CPU) on tiny random-weight HF models built
here (Llama, and Mixtral for MoE): it collects activation statistics during a prompt and saves a
``.cimatrix``; we read it and compare with a float64 reference forward pass of the same model.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantbench.errors import ImatrixError
from quantbench.imatrix.files import (
    Imatrix,
    ImatrixEntry,
    check_imatrix_for_model,
    format_for_path,
    gguf_tensor_sizes,
    read_imatrix,
    write_imatrix,
)
from tests import llama_tools
from tests.plan.make_f32_gguf import make_f32_gguf, smollm2_gguf

DATA = llama_tools.SHARED_DATA
PROMPT_CHARS = 1500


def _sample() -> Imatrix:
    rng = np.random.default_rng(1)
    entries = {
        "blk.0.attn_q.weight": ImatrixEntry((rng.random(64) * 700).astype(np.float32), np.array([300])),
        "blk.0.ffn_down.weight": ImatrixEntry((rng.random(96) * 3).astype(np.float32), np.array([300])),
        "blk.0.ffn_gate_inp.weight": ImatrixEntry((rng.random(64) * 9).astype(np.float32), np.array([300])),
        # three experts, the middle one never routed to
        "blk.0.ffn_up_exps.weight": ImatrixEntry((rng.random(3 * 64) * 5).astype(np.float32), np.array([77, 0, 223])),
        "output.weight": ImatrixEntry((rng.random(64) * 50).astype(np.float32), np.array([300])),
    }
    entries["blk.0.ffn_up_exps.weight"].sums[64:128] = 0.0
    entries["blk.0.attn_q.weight"].sums[:5] = 0.0  # zero columns
    return Imatrix(entries, ["calibration_datav3.txt"], chunk_count=3, chunk_size=100)


N_MAT = {"blk.0.ffn_up_exps.weight": 3}


def _weights(im: Imatrix) -> dict[str, np.ndarray]:
    return {n: im.quant_weights(n, N_MAT.get(n)) for n in im.entries}


@pytest.mark.parametrize("first", ["gguf", "dat", "cimatrix"])
@pytest.mark.parametrize("via", ["gguf", "dat", "cimatrix"])
def test_round_trip_keeps_quantizer_weights_bit_exact(tmp_path: Path, first: str, via: str) -> None:
    ext = {"gguf": ".gguf", "dat": ".dat", "cimatrix": ".cimatrix"}
    a = tmp_path / f"a{ext[first]}"
    write_imatrix(_sample(), a, arch="qwen3moe")
    start = read_imatrix(a)
    b = tmp_path / f"b{ext[via]}"
    write_imatrix(start, b, arch="qwen3moe")
    c = tmp_path / f"c{ext[first]}"
    write_imatrix(read_imatrix(b), c, arch="qwen3moe")
    back = read_imatrix(c)
    want, got = _weights(start), _weights(back)
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
        assert np.isfinite(got[name]).all()
    assert (got["blk.0.ffn_up_exps.weight"][64:128] == 1).all()  # unrouted expert: ones, never 0/0
    assert (got["blk.0.attn_q.weight"][:5] == 0).all()  # zero columns stay zero, never NaN


def test_gguf_and_dat_keep_their_metadata(tmp_path: Path) -> None:
    write_imatrix(_sample(), tmp_path / "a.gguf")
    g = read_imatrix(tmp_path / "a.gguf")
    assert (g.fmt, g.datasets, g.chunk_count, g.chunk_size) == ("gguf", ["calibration_datav3.txt"], 3, 100)
    write_imatrix(g, tmp_path / "a.imatrix")
    d = read_imatrix(tmp_path / "a.imatrix")
    assert (d.fmt, d.datasets, d.chunk_count) == ("dat", ["calibration_datav3.txt"], 3)
    # llama-imatrix's ncall is ceil(300/100) = 3; written rounded down to 2 so the scaling is exact
    assert int(d.entries["blk.0.attn_q.weight"].counts[0]) == 2


def test_cimatrix_layout_is_mistralrs(tmp_path: Path) -> None:
    """u64 count; per entry u64 key length, key, u64 value count, f32 values; keys are HF modules."""
    write_imatrix(_sample(), tmp_path / "a.cimatrix", arch="qwen3moe")
    data = (tmp_path / "a.cimatrix").read_bytes()
    (n,), off, keys = struct.unpack_from("<Q", data, 0), 8, {}
    for _ in range(n):
        (kl,) = struct.unpack_from("<Q", data, off)
        key = data[off + 8 : off + 8 + kl].decode()
        (nv,) = struct.unpack_from("<Q", data, off + 8 + kl)
        keys[key] = np.frombuffer(data, "<f4", nv, off + 16 + kl)
        off += 16 + kl + 4 * nv
    assert off == len(data)
    assert sorted(keys) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.experts.up_proj",
                            "model.layers.0.mlp.gate", "model.layers.0.self_attn.q_proj"]
    e = _sample().entries["blk.0.attn_q.weight"]
    assert np.array_equal(keys["model.layers.0.self_attn.q_proj"], e.sums / np.float32(300))


def test_format_from_suffix_and_override(tmp_path: Path) -> None:
    assert format_for_path("x.gguf") == "gguf"
    assert format_for_path("x.imatrix") == format_for_path("x.DAT") == "dat"
    assert format_for_path("x.cimatrix") == "cimatrix"
    assert format_for_path("x.bin", "cimatrix") == "cimatrix"
    with pytest.raises(ImatrixError, match="--format"):
        format_for_path("x.bin")
    with pytest.raises(ImatrixError, match="unknown imatrix format"):
        format_for_path("x.gguf", "npz")
    # a .cimatrix under another name is still read: by --format, or found when .dat parsing fails
    write_imatrix(_sample(), tmp_path / "odd.bin", fmt="cimatrix", arch="qwen3moe")
    assert read_imatrix(tmp_path / "odd.bin", "cimatrix").fmt == "cimatrix"
    assert read_imatrix(tmp_path / "odd.bin").fmt == "cimatrix"
    with pytest.raises(ImatrixError, match="odd.bin"):
        read_imatrix(tmp_path / "odd.bin", "gguf")


def _cimatrix_bytes(entries: list[tuple[bytes, bytes]]) -> bytes:
    out = struct.pack("<Q", len(entries))
    for key, vals in entries:
        out += struct.pack("<Q", len(key)) + key + struct.pack("<Q", len(vals) // 4) + vals
    return out


GOOD = _cimatrix_bytes([(b"model.layers.0.self_attn.q_proj", np.ones(8, "<f4").tobytes())])


@pytest.mark.parametrize(
    "payload,why",
    [
        (b"", "need at least 8"),
        (b"\x00" * 8, "entry count 0"),
        (GOOD[:-3], "do not fit"),
        (GOOD + b"\x00", "stray bytes"),
        (_cimatrix_bytes([(b"\xff\xfe", b"\x00" * 8)]), "not UTF-8"),
        (_cimatrix_bytes([(b"model.embed_tokens", b"\x00" * 8)]), "model.embed_tokens"),
        (_cimatrix_bytes([(b"lm_head", np.array([1, np.nan], "<f4").tobytes())]), "non-finite"),
        (_cimatrix_bytes([(b"lm_head", b"\x00" * 8), (b"lm_head", b"\x00" * 8)]), "twice"),
        (_cimatrix_bytes([(b"lm_head", b"\x00" * 8), (b"output", b"\x00" * 8)]), "both map"),
        (_cimatrix_bytes([(b"model.layers.0.mlp.experts.gate_proj", b"\x00" * 8),
                          (b"model.layers.0.mlp.experts.1.gate_proj", b"\x00" * 8)]), "both map"),
    ],
)
def test_broken_cimatrix_is_refused(tmp_path: Path, payload: bytes, why: str) -> None:
    p = tmp_path / "bad.cimatrix"
    p.write_bytes(payload)
    with pytest.raises(ImatrixError, match=why) as ei:
        read_imatrix(p)
    assert "bad.cimatrix" in str(ei.value)


def test_per_expert_keys_assemble_into_a_stack(tmp_path: Path) -> None:
    rows = [(f"model.layers.2.block_sparse_moe.experts.{e}.w2".encode(), np.full(4, e + 1, "<f4").tobytes())
            for e in (0, 2)]
    p = tmp_path / "experts.cimatrix"
    p.write_bytes(_cimatrix_bytes(rows))
    im = read_imatrix(p, n_mats={"blk.2.ffn_down_exps.weight": 4})
    e = im.entries["blk.2.ffn_down_exps.weight"]
    assert e.counts.tolist() == [1, 0, 1, 0]
    assert im.quant_weights("blk.2.ffn_down_exps.weight").tolist() == [1.0] * 8 + [3.0] * 4 + [1.0] * 4


def test_mistralrs_dead_expert_zeros_become_ones_given_the_expert_count(tmp_path: Path) -> None:
    """mistral.rs writes zeros for an expert that saw no token; zero weights would erase it when quantized."""
    vals = np.concatenate([np.full(4, 2.0), np.zeros(4), np.full(4, 5.0)]).astype("<f4")
    p = tmp_path / "moe.cimatrix"
    p.write_bytes(_cimatrix_bytes([(b"model.layers.0.mlp.experts.up_proj", vals.tobytes())]))
    im = read_imatrix(p)  # no attention entry to tell the hidden size: one count for the stack
    assert im.quant_weights("blk.0.ffn_up_exps.weight", n_mat=3).tolist() == [2.0] * 4 + [1.0] * 4 + [5.0] * 4
    im = read_imatrix(p, n_mats={"blk.0.ffn_up_exps.weight": 3})
    assert im.entries["blk.0.ffn_up_exps.weight"].counts.tolist() == [1, 0, 1]
    assert im.quant_weights("blk.0.ffn_up_exps.weight").tolist() == [2.0] * 4 + [1.0] * 4 + [5.0] * 4


def test_zero_columns_quantize_to_finite_values() -> None:
    from quantbench.quant.registry import dequantize, quantize

    im = _sample()
    w = torch.randn(8, 64 * 4)
    qw = torch.from_numpy(np.tile(im.quant_weights("blk.0.attn_q.weight"), 4))
    for t in ("Q4_K", "Q2_K", "IQ4_XS"):
        assert torch.isfinite(dequantize(quantize(w, t, qw))).all(), t


def test_imatrix_for_another_model_is_refused(tmp_path: Path) -> None:
    sizes = {"blk.0.attn_q.weight": (64, 1), "blk.0.ffn_up_exps.weight": (64, 3), "blk.0.ffn_down.weight": (96, 1)}
    check_imatrix_for_model(_sample(), sizes, "m.gguf")
    with pytest.raises(ImatrixError, match="blk.0.attn_q.weight has 64 values, other.gguf needs 128"):
        check_imatrix_for_model(_sample(), {**sizes, "blk.0.attn_q.weight": (128, 1)}, "other.gguf")
    with pytest.raises(ImatrixError, match="none of its 5 entries"):
        check_imatrix_for_model(_sample(), {"blk.0.attn_qkv.weight": (64, 1)}, "other.gguf")


# ------------------------------------------------------------------ against the real peer tools


@pytest.mark.oracle
def test_llama_imatrix_through_cimatrix_and_dat_quantizes_identically(tmp_path: Path) -> None:
    """llama-imatrix GGUF -> .cimatrix -> GGUF and -> .dat: llama-quantize writes the same tensors."""
    f32 = make_f32_gguf(smollm2_gguf())
    theirs = llama_tools.llama_imatrix(f32, DATA / "calibration_datav3.txt", chunks=4, ctx=256)
    sizes = gguf_tensor_sizes(f32)
    check_imatrix_for_model(read_imatrix(theirs), sizes, str(f32))
    write_imatrix(read_imatrix(theirs), tmp_path / "x.cimatrix", arch="llama")
    write_imatrix(read_imatrix(tmp_path / "x.cimatrix"), tmp_path / "back.gguf")
    write_imatrix(read_imatrix(theirs), tmp_path / "x.dat")
    ref = llama_tools.llama_quantize(f32, "Q3_K_M", imatrix=theirs)
    from quantbench.formats.gguf import read_gguf

    want = read_gguf(ref).tensors
    for via in (tmp_path / "back.gguf", tmp_path / "x.dat"):
        got = read_gguf(llama_tools.llama_quantize(f32, "Q3_K_M", imatrix=via)).tensors
        assert [t.name for t in got] == [t.name for t in want]
        for x, y in zip(want, got):
            assert np.array_equal(np.asarray(x._raw), np.asarray(y._raw)), (via.name, x.name)


def _need_mistralrs() -> None:
    try:
        import mistralrs  # noqa: F401
    except ImportError:
        pytest.fail("mistralrs missing: pip install mistralrs==0.9.5 (in the dev extra)")


def make_tiny_hf(out: Path, kind: str = "llama") -> Path:
    """A random-weight HF model dir (config.json, model.safetensors, tokenizer.json) mistral.rs loads."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(DATA / "wiki.test.raw").read_text()[:200_000]], trainer)
    tok.save(str(out / "tokenizer.json"))
    V, H, FF, L, nh, nkv, hd, E = tok.get_vocab_size(), 256, 256, 2, 4, 2, 64, 4
    g = torch.Generator().manual_seed(3)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    sd = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": torch.ones(H), "lm_head.weight": r(V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
               p + "self_attn.q_proj.weight": r(nh * hd, H), p + "self_attn.k_proj.weight": r(nkv * hd, H),
               p + "self_attn.v_proj.weight": r(nkv * hd, H), p + "self_attn.o_proj.weight": r(H, nh * hd)}
        if kind == "mixtral":
            sd[p + "block_sparse_moe.gate.weight"] = r(E, H)
            for e in range(E):
                q = p + f"block_sparse_moe.experts.{e}."
                sd |= {q + "w1.weight": r(FF, H), q + "w3.weight": r(FF, H), q + "w2.weight": r(H, FF)}
        else:
            sd |= {p + "mlp.gate_proj.weight": r(FF, H), p + "mlp.up_proj.weight": r(FF, H),
                   p + "mlp.down_proj.weight": r(H, FF)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=nh,
               num_key_value_heads=nkv, head_dim=hd, max_position_embeddings=2048, rms_norm_eps=1e-5,
               rope_theta=10000.0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, hidden_act="silu",
               torch_dtype="float32", architectures=["LlamaForCausalLM"], model_type="llama")
    if kind == "mixtral":
        cfg |= dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=E,
                    num_experts_per_tok=2, sliding_window=None)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return out


_MISTRALRS_RUN = r"""
import sys
from mistralrs import Architecture, CompletionRequest, ModelDType, Runner, Which
model, arch, prompt_file, out, imatrix = sys.argv[1:6]
which = Which.Plain(model_id=model, arch=getattr(Architecture, arch), dtype=ModelDType.F32,
                    imatrix=imatrix or None)
r = Runner(which=which, in_situ_quant="Q8_0" if not imatrix else "Q4K", no_paged_attn=True, prefix_cache_n=0)
if out:
    r.begin_calibration()
    r.send_completion_request(CompletionRequest(prompt=open(prompt_file).read(), model="default", max_tokens=1,
                                                temperature=0.0))
    r.apply_calibration(save_cimatrix=out)
print("done")
"""


def _mistralrs(tmp: Path, model: Path, arch: str, out: Path | None = None, imatrix: Path | None = None) -> str:
    prompt = tmp / "prompt.txt"
    prompt.write_text((DATA / "calibration_datav3.txt").read_text()[:PROMPT_CHARS])
    env = {"MISTRALRS_CPU_KV_F32": "1", "OMP_NUM_THREADS": "2", "RAYON_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", _MISTRALRS_RUN, str(model), arch, str(prompt), str(out or ""),
                          str(imatrix or "")], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr[-3000:]
    return res.stdout + res.stderr  # mistral.rs logs to stdout


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """HF (rotate-half) rotary embedding on ``[heads, T, d]``."""
    T, d = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def reference_stats(model: Path, tokens: list[int], q8: bool = True) -> dict[str, np.ndarray]:
    """mean(x²) per input column of every linear (HF names; experts stacked [E, in]) in float64.

    With ``q8`` weights go through Q8_0 first, as mistral.rs's ISQ did to every matrix (router
    excepted) while it collected; only the last token reaches lm_head on a prefill. An expert that
    no token chose has zeros; ``<moe>.experts.counts`` holds how many tokens chose each expert.
    """
    from safetensors.torch import load_file

    from quantbench.quant.registry import dequantize, quantize

    cfg = json.loads((model / "config.json").read_text())
    sd = {k: (dequantize(quantize(v, "Q8_0")).double() if q8 and v.dim() == 2 and not k.endswith("gate.weight")
              else v.double())
          for k, v in load_file(str(model / "model.safetensors")).items()}
    nh, nkv, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    T, stats = len(tokens), {}

    def rec(name: str, x: torch.Tensor) -> None:
        stats[name] = (x**2).mean(0).numpy()

    h = sd["model.embed_tokens.weight"][torch.tensor(tokens)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "input_layernorm.weight"], eps)
        for n in "qkv":
            rec(p + f"self_attn.{n}_proj", x)
        q = _rope((x @ sd[p + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1), cfg["rope_theta"])
        k = _rope((x @ sd[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1), cfg["rope_theta"])
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        a = (torch.softmax(q @ k.transpose(1, 2) / hd**0.5 + mask, -1) @ v).transpose(0, 1).reshape(T, nh * hd)
        rec(p + "self_attn.o_proj", a)
        h = h + a @ sd[p + "self_attn.o_proj.weight"].T
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
        if cfg["model_type"] != "mixtral":
            rec(p + "mlp.gate_proj", x)
            rec(p + "mlp.up_proj", x)
            y = F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
            rec(p + "mlp.down_proj", y)
            h = h + y @ sd[p + "mlp.down_proj.weight"].T
            continue
        moe = p + "block_sparse_moe."
        rec(moe + "gate", x)
        top_w, top_i = torch.softmax(x @ sd[moe + "gate.weight"].T, -1).topk(cfg["num_experts_per_tok"], -1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        n_exp = sd[moe + "gate.weight"].shape[0]
        acc = {n: np.zeros((n_exp, d)) for n, d in (("gate_proj", x.shape[1]), ("up_proj", x.shape[1]),
                                                    ("down_proj", sd[moe + "experts.0.w2.weight"].shape[1]))}
        out = torch.zeros_like(h)
        for e in range(n_exp):
            tok, slot = torch.where(top_i == e)
            if len(tok):
                xe = x[tok]
                y = F.silu(xe @ sd[moe + f"experts.{e}.w1.weight"].T) * (xe @ sd[moe + f"experts.{e}.w3.weight"].T)
                acc["gate_proj"][e] = acc["up_proj"][e] = (xe**2).mean(0).numpy()
                acc["down_proj"][e] = (y**2).mean(0).numpy()
                out.index_add_(0, tok, (y @ sd[moe + f"experts.{e}.w2.weight"].T) * top_w[tok, slot, None])
        for n, v_ in acc.items():
            stats[moe + "experts." + n] = v_.reshape(-1)
        stats[moe + "experts.counts"] = torch.bincount(top_i.flatten(), minlength=n_exp).numpy()
        h = h + out
    stats["lm_head"] = (_rms(h, sd["model.norm.weight"], eps)[-1:] ** 2).mean(0).numpy()
    return stats


def _prompt_tokens(model: Path) -> list[int]:
    from tokenizers import Tokenizer

    text = (DATA / "calibration_datav3.txt").read_text()[:PROMPT_CHARS]
    return Tokenizer.from_file(str(model / "tokenizer.json")).encode(text).ids


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.oracle
def test_cimatrix_written_by_mistralrs_reads_correctly(tmp_path: Path) -> None:
    _need_mistralrs()
    model = make_tiny_hf(tmp_path / "llama")
    cim = tmp_path / "mistralrs.cimatrix"
    _mistralrs(tmp_path, model, "Llama", out=cim)
    im = read_imatrix(cim)
    ref = reference_stats(model, _prompt_tokens(model))
    assert im.fmt == "cimatrix"
    assert sorted(im.entries) == sorted(
        ["output.weight"] + [f"blk.{i}.{t}.weight" for i in range(2)
                             for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")])
    from quantbench.imatrix.names import gguf_to_hf

    for name in im.entries:
        got, want = im.quant_weights(name), ref[gguf_to_hf(name)]
        # layer 0's q/k/v input is the (Q8_0) embedding after RMSNorm: no activation rounding yet.
        # Deeper inputs differ by ggml's Q8_0 rounding of activations inside mistral.rs's matmuls.
        tol = 1e-4 if name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight") else 5e-3
        tol = 5e-2 if name == "output.weight" else tol  # a single row (the last token)
        assert _rel(got, want) < tol, (name, _rel(got, want))


@pytest.mark.oracle
def test_mixtral_cimatrix_from_mistralrs_has_expert_major_stacks(tmp_path: Path) -> None:
    _need_mistralrs()
    model = make_tiny_hf(tmp_path / "mixtral", "mixtral")
    cim = tmp_path / "mixtral.cimatrix"
    _mistralrs(tmp_path, model, "Mixtral", out=cim)
    im = read_imatrix(cim)
    ref = reference_stats(model, _prompt_tokens(model))
    down = im.entries["blk.0.ffn_down_exps.weight"]
    assert len(down.counts) == 4  # expert count told from the layer's hidden size
    assert _rel(im.quant_weights("blk.0.ffn_gate_inp.weight"), ref["model.layers.0.block_sparse_moe.gate"]) < 5e-3
    want = ref["model.layers.0.block_sparse_moe.experts.down_proj"].reshape(4, -1)
    got = im.quant_weights("blk.0.ffn_down_exps.weight").reshape(4, -1)
    for e in range(4):
        # a few near-tie routings flip under mistral.rs's Q8_0 rounding, hence the loose tolerance;
        # each row is still far closer to its own expert's statistics than to any other expert's
        errs = [_rel(got[e], want[j]) for j in range(4)]
        assert errs[e] < 0.06 and errs[e] == min(errs), (e, errs)


@pytest.mark.oracle
def test_mistralrs_loads_our_cimatrix(tmp_path: Path) -> None:
    """Its own .cimatrix taken through our GGUF and back is consumed by mistral.rs for the same layers."""
    import re

    _need_mistralrs()
    model = make_tiny_hf(tmp_path / "llama")
    theirs = tmp_path / "theirs.cimatrix"
    _mistralrs(tmp_path, model, "Llama", out=theirs)
    write_imatrix(read_imatrix(theirs), tmp_path / "mid.gguf")
    write_imatrix(read_imatrix(tmp_path / "mid.gguf"), tmp_path / "ours.cimatrix")

    def coverage(cim: Path) -> list[str]:
        log = _mistralrs(tmp_path, model, "Llama", imatrix=cim)
        assert "Loading collected imatrix file" in log
        return re.findall(r"(\d+ of \d+ layers have no imatrix data|Quantizing \d+ layers to \w+ with imatrix)", log)

    want = coverage(theirs)
    assert any("with imatrix" in line for line in want)
    assert coverage(tmp_path / "ours.cimatrix") == want
