"""The ``quantbench`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import sys

import click

from quantbench.errors import QuantbenchError


class _Group(click.Group):
    """Turns every ``QuantbenchError`` into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantbenchError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="quantbench")
def main() -> None:
    """Quantize LLMs, convert between formats, and measure what the result is worth."""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@main.command()
@click.option("-m", "--model", required=True, help="Input: GGUF file, HF model dir, hub id, or a packaged alias (smollm2).")
@click.option("--isq", required=True,
              help="GGUF output: a llama.cpp ftype (Q4_K_M, IQ4_XS, ...) or one GGML type. "
                   "UQFF output: mistral.rs ISQ types (Q4K, Q8_0, HQQ4, AFQ4, FP8, ...), comma-separated, or 2-8.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .gguf or .uqff path (a directory for several UQFF types).")
@click.option("--imatrix", type=click.Path(), default=None,
              help="Importance matrix (GGUF output): llama.cpp GGUF imatrix, legacy .dat, or mistral.rs .cimatrix.")
@click.option("--calibration-file", type=click.Path(), default=None,
              help="GGUF output: collect an imatrix from this text first (windows of --ctx tokens), then quantize with it.")
@click.option("--ctx", type=int, default=512, show_default=True, help="--calibration-file: window length.")
@click.option("--chunks", type=int, default=None, help="--calibration-file: use only the first N windows.")
@click.option("--pure", is_flag=True, help="GGUF: no k-quant mixture, every quantizable tensor gets the ftype's base type.")
@click.option("--topology", type=click.Path(), default=None, help="UQFF: mistral.rs topology YAML (per-layer types).")
@click.option("--isq-organization", type=click.Choice(["default", "moqe"]), default="default", show_default=True,
              help="UQFF: moqe quantizes routed experts only.")
@click.option("--shard-size", type=int, default=None, help="UQFF: bytes per .uqff shard (default 10 GiB, as mistral.rs).")
@click.option("--format", "layout", type=click.Choice(["bnb", "mlx", "fp8", "compressed-tensors", "mxfp4"]), default=None,
              help="Write a HF checkpoint directory in this native layout instead (--isq NF4, FP4_DQ, INT8, AFQ4, FP8_BLOCK, ...).")
@click.option("--skip", multiple=True, help="--format: module names/globs kept in float (repeatable).")
@click.option("--overwrite", is_flag=True, help="--format: replace an output directory that already holds weights.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def quantize(model: str, isq: str, output: str, imatrix: str | None, calibration_file: str | None, ctx: int,
             chunks: int | None, pure: bool, topology: str | None,
             isq_organization: str, shard_size: int | None, layout: str | None, skip: tuple[str, ...], overwrite: bool,
             device: str, threads: int | None, no_progress: bool) -> None:
    """Quantize a model: to GGUF with llama.cpp's rules and bytes, or to UQFF as mistral.rs does."""
    from tqdm import tqdm

    from quantbench.errors import InputValueError

    _set_threads(threads)
    bars: list[tqdm] = []

    def progress(name: str, done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, disable=no_progress, unit="tensor", desc=f"quantize {isq}", file=sys.stderr))
        bars[0].set_postfix_str(name, refresh=False)
        bars[0].update(1)

    if layout is not None:
        if imatrix or pure or topology or shard_size:
            raise InputValueError("--format writes a HF checkpoint; --imatrix/--pure/--topology/--shard-size do not apply")
        from quantbench.formats.checkpoint import write_quantized_checkpoint
        from quantbench.sources import resolve_model

        dev = "cuda" if device == "cuda" or (device == "auto" and _cuda()) else "cpu"
        files = write_quantized_checkpoint(str(resolve_model(model)), output, isq, layout=layout, skip=skip,
                                           device=dev, overwrite=overwrite)
        click.echo(f"wrote {isq} in the {layout} layout: " + ", ".join(str(f) for f in files))
        return
    uqff = output.endswith(".uqff") or "," in isq or topology is not None
    try:
        if uqff:
            if imatrix or pure:
                raise InputValueError("--imatrix and --pure apply to GGUF outputs; UQFF output takes --isq/--topology")
            from quantbench.cli.tables import print_uqff_report
            from quantbench.jobs.quantize_uqff import quantize_uqff

            kw = {"shard_size": shard_size} if shard_size else {}
            report = quantize_uqff(model, output, isq, topology=topology,
                                   organization=None if isq_organization == "default" else isq_organization,
                                   device=device, progress=progress, **kw)
        else:
            if topology or isq_organization != "default" or shard_size:
                raise InputValueError("--topology, --isq-organization and --shard-size apply to .uqff outputs")
            from quantbench.cli.tables import print_quantize_report
            from quantbench.jobs.quantize_gguf import quantize_gguf
            from quantbench.sources import resolve_model

            src = resolve_model(model)
            if calibration_file:
                if imatrix:
                    raise InputValueError("give either --imatrix or --calibration-file, not both")
                report = _quantize_with_calibration(src, output, isq, calibration_file, ctx, chunks, pure, device,
                                                    progress, no_progress)
            else:
                report = quantize_gguf(src, output, isq, imatrix=imatrix, pure=pure, device=device, progress=progress)
    finally:
        for b in bars:
            b.close()
    if uqff:
        print_uqff_report(report)
    else:
        print_quantize_report(src, report)


_MODEL_HELP_IM = "Model (GGUF file, HF dir, hub id or alias) to run the calibration text through."


def _quantize_with_calibration(src, output, isq, calibration_file, ctx, chunks, pure, device, progress, no_progress):
    """Collect an imatrix through the engine, then quantize with it — one run, as llama-imatrix + llama-quantize."""
    import tempfile
    from pathlib import Path

    from quantbench.engine import load_model
    from quantbench.imatrix.collect import collect_imatrix
    from quantbench.imatrix.files import write_imatrix
    from quantbench.jobs.quantize_gguf import quantize_gguf

    dev = "cuda" if device == "cuda" or (device == "auto" and _cuda()) else "cpu"
    lm = load_model(src, dtype="f32", device=dev)
    im = collect_imatrix(lm, calibration_file, ctx=ctx, chunks=chunks, progress=not no_progress)
    del lm
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "calibration.imatrix.gguf"
        write_imatrix(im, path, "gguf")
        return quantize_gguf(src, output, isq, imatrix=path, pure=pure, device=device, progress=progress)


@main.command()
@click.option("-m", "--model", required=True, help=_MODEL_HELP_IM)
@click.option("-f", "--calibration-file", required=True, type=click.Path(), help="Calibration text file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output: .gguf (llama.cpp), .imatrix/.dat (legacy llama.cpp) or .cimatrix (mistral.rs).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--chunks", type=int, default=None, help="Use only the first N windows.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "dat", "cimatrix"]), default=None,
              help="Output format (default: from the suffix).")
@click.option("--process-output", is_flag=True, help="Also collect statistics for the output head.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["f32", "bf16", "f16"]), default="f32", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Windows per forward pass.")
@click.option("--threads", type=int, default=None)
@click.option("--no-progress", is_flag=True)
def imatrix(model, calibration_file, output, ctx, chunks, fmt, process_output, device, dtype, batch, threads, no_progress):
    """Collect an importance matrix (sum of squared activations per input column) as llama-imatrix does."""
    from quantbench.imatrix.collect import imatrix_command

    _set_threads(threads)
    rep = imatrix_command(model, calibration_file, output, ctx=ctx, chunks=chunks, fmt=fmt,
                          process_output=process_output, device=device, dtype=dtype, batch=batch,
                          progress=not no_progress)
    click.echo(f"wrote {rep.output} ({rep.fmt}): {rep.entries} tensors, {rep.chunks} chunks x {rep.ctx} tokens, "
               f"{rep.tokens_per_second:.0f} tokens/s")


@main.command()
@click.argument("src")
@click.option("-o", "--output", required=True, type=click.Path(), help="DST: .gguf file, .uqff output, or a HF model directory.")
@click.option("--dtype", type=click.Choice(["f32", "bf16", "f16"]), default=None,
              help="Float type of a HF-dir/GGUF output (default: the source's; GGUF: llama.cpp's 'auto').")
@click.option("--isq", default=None, help="UQFF outputs: ISQ type(s), e.g. q4k or q4k,q8_0.")
@click.option("--model-dir", type=click.Path(), default=None, help="UQFF source: dir with its config.json/residual when not beside it.")
@click.option("--shard-size", type=int, default=5 * 2**30, show_default=True, help="HF-dir outputs: bytes per safetensors shard.")
def convert(src, output, dtype, isq, model_dir, shard_size):
    """Convert between HF safetensors dirs, GGUF and UQFF (GGUF written as llama.cpp's converter writes it)."""
    from quantbench.cli.tables import print_convert_report
    from quantbench.jobs.convert import convert as run_convert

    print_convert_report(run_convert(src, output, dtype, isq=isq, model_dir=model_dir, shard_size=shard_size))


@main.command()
@click.argument("path", type=click.Path())
@click.option("--all-metadata", is_flag=True, help="Show long arrays (vocabularies, merges) in full length counts.")
def inspect(path: str, all_metadata: bool) -> None:
    """Show what a GGUF file, a UQFF output or a HF model directory holds, with bits per weight."""
    from pathlib import Path

    from quantbench.sources import resolve_model

    # a UQFF output is named by its stem (q4k.uqff) while its shards are q4k-0.uqff, ...
    p = Path(path) if path.endswith(".uqff") else resolve_model(path)
    if p.is_dir():
        from quantbench.cli.tables import print_hf_dir
        from quantbench.formats.safetensors_dir import SafetensorsModel

        with SafetensorsModel(p) as m:
            print_hf_dir(m)
    elif p.suffix == ".uqff":
        from quantbench.cli.tables import print_uqff
        from quantbench.formats.uqff import UqffFile

        print_uqff(UqffFile(p))
    else:
        from quantbench.cli.tables import print_gguf
        from quantbench.formats.gguf import read_gguf

        print_gguf(read_gguf(p))



_MODEL_HELP = "Model: a .gguf file, a HF model directory, a hub id, or a packaged alias (smollm2)."


def _engine_options(f):
    f = click.option("--act-quant", type=click.Choice(["none", "ggml"]), default="none", show_default=True,
                     help="ggml: quantize packed layers' inputs as llama.cpp's CPU backend does (reproduces its numbers).")(f)
    f = click.option("--model-dir", type=click.Path(), default=None,
                     help="--from-uqff: dir holding its config.json/residual.safetensors when not beside it.")(f)
    f = click.option("--from-uqff", type=click.Path(), default=None,
                     help="Load weights from a UQFF file (ours or mistral.rs's); -m may then name the model dir.")(f)
    f = click.option("--threads", type=int, default=None, help="CPU threads for torch.")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(f)
    f = click.option("--dtype", type=click.Choice(["auto", "f32", "bf16", "f16"]), default="auto", show_default=True,
                     help="Compute dtype (auto: f32 on CPU, bf16 on CUDA).")(f)
    return click.option("-m", "--model", default=None, help=_MODEL_HELP)(f)


def _load(model: str | None, dtype: str, device: str, threads: int | None, from_uqff: str | None = None,
          model_dir: str | None = None, act_quant: str = "none"):
    from quantbench.engine import load_model
    from quantbench.errors import InputValueError

    _set_threads(threads)
    if from_uqff:
        from quantbench.engine.loader import resolve_device
        from quantbench.engine.uqff_source import load_uqff_model

        return load_uqff_model(from_uqff, model_dir or model, dtype=dtype, device=resolve_device(device),
                               act_quant=act_quant)
    if model is None:
        raise InputValueError("give a model with -m (or a UQFF file with --from-uqff)")
    return load_model(model, dtype=dtype, device=device, act_quant=act_quant)


@main.command(name="eval")
@_engine_options
@click.option("--text", "text_file", required=True, type=click.Path(), help="Text file to score (e.g. wiki.test.raw).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length (llama-perplexity -c).")
@click.option("--chunks", type=int, default=None, help="Score only the first N windows.")
@click.option("--save-logits", type=click.Path(dir_okay=False), default=None, help="Write base log-probs for later KLD.")
@click.option("--kl-base", type=click.Path(dir_okay=False), default=None, help="Compare with base log-probs (KLD, same top token).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the numbers as JSON.")
@click.option("--embeddings", is_flag=True, help="Sentence-embedding encoder (BERT family): cosine vs fp32 per scheme.")
@click.option("--isq", default=None, help="--embeddings: schemes to compare, comma-separated (default: every one).")
@click.option("--sentences", "n_sentences", type=int, default=2000, show_default=True, help="--embeddings: sentences of --text.")
@click.option("--no-progress", is_flag=True)
def eval_cmd(model, dtype, device, threads, from_uqff, model_dir, act_quant, text_file, ctx, chunks, save_logits, kl_base, json_out, embeddings, isq,
             n_sentences, no_progress):
    """Perplexity as llama-perplexity computes it; KL divergence against saved base logits.

    With --embeddings: mean/min cosine similarity of quantized sentence embeddings vs fp32."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from quantbench.cli.tables import print_eval
    from quantbench.engine.perplexity import evaluate
    from quantbench.errors import InputValueError
    from quantbench.formats.atomic import atomic_output

    p = Path(text_file)
    if not p.is_file():
        raise InputValueError(f"{text_file}: no such text file")
    if embeddings:
        from quantbench.engine.embeddings import default_schemes, embedding_quality, format_table
        from quantbench.engine.sentences import wikitext_sentences
        from quantbench.sources import resolve_model

        _set_threads(threads)
        dev = "cuda" if device == "cuda" or (device == "auto" and _cuda()) else "cpu"
        sents = wikitext_sentences(p, n_sentences)
        schemes = [s.strip() for s in isq.split(",")] if isq else default_schemes()
        if model is None:
            raise InputValueError("--embeddings needs -m MODEL_DIR")
        rows = embedding_quality(resolve_model(model), schemes, sents, device=dev)
        click.echo(format_table(rows))
        if json_out:
            with atomic_output(Path(json_out)) as tmp:
                tmp.write_text(json.dumps({"rows": [r.to_json() for r in rows]}, indent=2))
        return
    elif isq:
        raise InputValueError("--isq applies to --embeddings; to evaluate a quantized LM, quantize it first and pass -m")
    text = p.read_text(encoding="utf-8", errors="replace")
    lm = _load(model, dtype, device, threads, from_uqff, model_dir, act_quant)
    bar: list[tqdm] = []

    def progress(done: int, total: int, tps: float) -> None:
        if not bar:
            bar.append(tqdm(total=total, unit="chunk", desc="eval", disable=no_progress, file=sys.stderr))
        bar[0].update(1)
        bar[0].set_postfix_str(f"{tps:.0f} tok/s")

    res = evaluate(lm, text, ctx=ctx, chunks=chunks, save_logits=save_logits, kl_base=kl_base, progress=progress)
    if bar:
        bar[0].close()
    print_eval(res, f"{model} on {p.name}")
    if json_out:
        with atomic_output(Path(json_out)) as tmp:
            tmp.write_text(json.dumps(res.as_dict(), indent=2))


@main.command()
@_engine_options
@click.option("-p", "--prompt", default=None, help="Prompt (chat template applied when the model has one).")
@click.option("-i", "--interactive", is_flag=True, help="Chat in the terminal.")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--ctx", type=int, default=None, help="Context length (default: the model's).")
def run(model, dtype, device, threads, from_uqff, model_dir, act_quant, prompt, interactive, max_tokens, temperature, top_p, top_k, seed, raw, ctx):
    """Generate text from a prompt, or chat with -i; stops on EOS."""
    from quantbench.engine.generate import generate
    from quantbench.engine.sampling import Sampler
    from quantbench.errors import InputValueError

    if prompt is None and not interactive:
        raise InputValueError("give a prompt with -p, or -i for an interactive chat")
    sampler = Sampler(temperature, top_k, top_p, seed)
    lm = _load(model, dtype, device, threads, from_uqff, model_dir, act_quant)
    tok = lm.tokenizer
    stop = set(tok.eos_ids)
    messages: list[dict] = []

    def turn(user: str) -> str:
        if raw or not tok.chat_template:
            ids = tok.encode(user, add_special=True)
        else:
            messages.append({"role": "user", "content": user})
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special=False)
        printed = [""]
        out_ids: list[int] = []

        def on_token(t: int) -> None:
            if t in stop:
                return
            out_ids.append(t)
            text = tok.decode(out_ids)
            click.echo(text[len(printed[0]):], nl=False)
            printed[0] = text

        gen = generate(lm, ids, max_tokens, sampler, stop, ctx, on_token)
        click.echo()
        tps = len(gen.tokens) / gen.decode_s if gen.decode_s > 0 else float("nan")
        click.echo(f"[{gen.prompt_len} prompt tokens, {len(gen.tokens)} generated, "
                   f"prefill {gen.prompt_len / gen.prefill_s:.1f} tok/s, decode {tps:.1f} tok/s]", err=True)
        reply = printed[0]
        if messages:
            messages.append({"role": "assistant", "content": reply})
        return reply

    if prompt is not None:
        turn(prompt)
    if interactive:
        while True:
            try:
                user = click.prompt(">", prompt_suffix=" ")
            except (EOFError, click.Abort):
                click.echo()
                break
            if user.strip() in ("/exit", "/quit"):
                break
            turn(user)


@main.command(name="bench")
@_engine_options
@click.option("--prompt-len", type=int, default=512, show_default=True)
@click.option("--gen-len", type=int, default=128, show_default=True)
@click.option("--iterations", type=int, default=3, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def bench_cmd(model, dtype, device, threads, from_uqff, model_dir, act_quant, prompt_len, gen_len, iterations, warmup, json_out):
    """Prefill (TTFT) and decode (TPOT) throughput, mean ± std over iterations."""
    import json
    from pathlib import Path

    from quantbench.cli.tables import print_bench
    from quantbench.engine.bench import bench

    lm = _load(model, dtype, device, threads, from_uqff, model_dir, act_quant)
    res = bench(lm, prompt_len, gen_len, iterations, warmup)
    print_bench(res, f"{model} ({lm.model.dtype}, {lm.model.model.norm.weight.device})")
    if json_out:
        from quantbench.formats.atomic import atomic_output

        with atomic_output(Path(json_out)) as tmp:
            tmp.write_text(json.dumps(res.as_dict(), indent=2))


if __name__ == "__main__":
    main()
