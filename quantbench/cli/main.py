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


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@main.command()
@click.option("-m", "--model", required=True, help="Input GGUF file, or a packaged model alias (smollm2).")
@click.option("--isq", required=True, help="llama.cpp ftype (Q4_K_M, Q3_K_S, IQ4_XS, ...) or one GGML type (pure).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .gguf path.")
@click.option("--imatrix", type=click.Path(), default=None, help="Importance matrix: llama.cpp GGUF imatrix or legacy .dat.")
@click.option("--pure", is_flag=True, help="No k-quant mixture: every quantizable tensor gets the ftype's base type.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def quantize(model: str, isq: str, output: str, imatrix: str | None, pure: bool, device: str,
             threads: int | None, no_progress: bool) -> None:
    """Quantize a GGUF model with llama.cpp's rules and byte-exact quantizers."""
    from tqdm import tqdm

    from quantbench.cli.tables import print_quantize_report
    from quantbench.jobs.quantize_gguf import quantize_gguf
    from quantbench.sources import resolve_model

    _set_threads(threads)
    src = resolve_model(model)
    bars: list[tqdm] = []

    def progress(name: str, done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, disable=no_progress, unit="tensor", desc=f"quantize {isq}", file=sys.stderr))
        bars[0].set_postfix_str(name, refresh=False)
        bars[0].update(1)

    try:
        report = quantize_gguf(src, output, isq, imatrix=imatrix, pure=pure, device=device, progress=progress)
    finally:
        for b in bars:
            b.close()
    print_quantize_report(src, report)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--all-metadata", is_flag=True, help="Show long arrays (vocabularies, merges) in full length counts.")
def inspect(path: str, all_metadata: bool) -> None:
    """Show a GGUF file's metadata and tensors, with bits per weight."""
    from quantbench.cli.tables import print_gguf
    from quantbench.formats.gguf import read_gguf
    from quantbench.sources import resolve_model

    print_gguf(read_gguf(resolve_model(path)))


if __name__ == "__main__":
    main()
