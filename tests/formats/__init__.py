"""Shared helpers for format/plan/job tests: tiny random Llama checkpoints in HF layout and
subprocess runs of the real ``mistralrs`` wheel (CPU) as the UQFF oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

WIKI = Path("/work/shared/data/wiki.test.raw")
PROMPT = "The history of the city"


def make_tokenizer(out: Path, vocab: int = 512) -> None:
    """A byte-level BPE ``tokenizer.json`` trained on WikiText-2 lines, plus a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    lines = WIKI.read_text().splitlines()[:3000] if WIKI.is_file() else ["the history of the city"] * 100
    tok.train_from_iterator(lines, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<|im_start|>{{m['role']}}\n{{m['content']}}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))


def llama_tensors(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=512, tied=False, seed=0,
                  std=0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    hd = hidden // heads
    sd = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    if not tied:
        sd["lm_head.weight"] = r(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        sd[p + "self_attn.q_proj.weight"] = r(heads * hd, hidden)
        sd[p + "self_attn.k_proj.weight"] = r(kv_heads * hd, hidden)
        sd[p + "self_attn.v_proj.weight"] = r(kv_heads * hd, hidden)
        sd[p + "self_attn.o_proj.weight"] = r(hidden, heads * hd)
        sd[p + "mlp.gate_proj.weight"] = r(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = r(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = r(hidden, inter)
    return sd


def llama_config(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=512, tied=False, dtype="float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied, "torch_dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 0, "hidden_act": "silu",
    }


def make_llama_dir(out: Path, *, dtype=torch.float32, max_shard_bytes: int | None = None, **shape) -> Path:
    """A random-weight Llama checkpoint in HF layout (config, tokenizer, safetensors)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in llama_tensors(**shape).items()}
    cfg_shape = {k: v for k, v in shape.items() if k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab", "tied")}
    cfg = llama_config(**cfg_shape, dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 0}))
    make_tokenizer(out, cfg["vocab_size"])
    if max_shard_bytes is None:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        from quantbench.formats.safetensors_dir import tensor_entry, write_model_dir

        write_model_dir(out, [tensor_entry(k, v) for k, v in sd.items()], max_shard_bytes=max_shard_bytes)
    return out


_RUNNER = textwrap.dedent(
    """
    import json, sys
    import mistralrs as m
    a = json.loads(sys.argv[1])
    which = m.Which.Plain(model_id=a["model"], from_uqff=a.get("from_uqff"), write_uqff=a.get("write_uqff"),
                          topology=a.get("topology"))
    r = m.Runner(which=which, in_situ_quant=a.get("isq"), max_seqs=1, token_source="none")
    if a.get("max_tokens"):
        res = r.send_completion_request(m.CompletionRequest(model="x", prompt=a["prompt"],
                                        max_tokens=a["max_tokens"], temperature=0.0))
        print("QB_TEXT=" + json.dumps(res.choices[0].text))
    """
)


def mistralrs(model: Path, *, isq: str | None = None, from_uqff: str | None = None, write_uqff: Path | None = None,
              topology: Path | None = None, max_tokens: int = 0, prompt: str = PROMPT) -> str | None:
    """Run the mistralrs wheel in a subprocess (it may panic); return the greedy completion text."""
    args = {"model": str(model), "isq": isq, "from_uqff": from_uqff, "max_tokens": max_tokens, "prompt": prompt,
            "write_uqff": str(write_uqff) if write_uqff else None, "topology": str(topology) if topology else None}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS", "2")}
    p = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(args)], capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"mistralrs failed ({p.returncode}):\n{p.stderr[-3000:]}")
    for line in p.stdout.splitlines():
        if line.startswith("QB_TEXT="):
            return json.loads(line[len("QB_TEXT="):])
    return None


def mistralrs_available() -> bool:
    try:
        import mistralrs  # noqa: F401
    except ImportError:
        return False
    return True
