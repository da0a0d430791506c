"""`lorakit inspect`, `convert`, `merge`: adapter files."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.common import or_exit


def inspect(
    directory: Path = typer.Argument(..., help="An adapter directory (adapter_config.json + adapter_model.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what an adapter holds: config, base and fingerprint, targets, ranks, size, tensor stats."""
    from lorakit.files.inspect import config_line, describe, to_json

    info = or_exit(describe, directory)
    if as_json:
        typer.echo(to_json(info))
        return
    console = Console()
    config = info["config"]
    summary = Table(show_header=False, title=f"adapter {info['path']}")
    for label, value in [
        ("made by", info["made_by"]), ("created", info["created"] or "-"), ("base model", info["base_model"] or "-"),
        ("base fingerprint", info["fingerprint"]), ("checksum", info["checksum"]),
        ("method", config_line(config)),
        ("ranks (modules)", ", ".join(f"r={r}: {n}" for r, n in info["ranks"].items()) or "-"),
        ("target modules", f"{len(info['target_modules'])} modules ({config.get('target_modules')})"
         if info["target_modules"] else "none (virtual tokens in front of the input)"),
        ("modules_to_save", str(config.get("modules_to_save") or "-")), ("bias", config.get("bias", "none")),
        ("parameters", f"{info['parameters']:,}"), ("size on disk", f"{info['size_bytes'] / 1e6:.2f} MB"),
        ("other adapters here", ", ".join(info["other_adapters"]) or "-"),
    ]:
        summary.add_row(label, str(value))
    console.print(summary)
    tensors = Table(title="tensors")
    tensors.add_column("tensor", overflow="fold")
    for column in ("shape", "dtype", "mean |x|", "std", "max |x|"):
        tensors.add_column(column)
    for name, t in info["tensors"].items():
        tensors.add_row(name, "x".join(map(str, t["shape"])), t["dtype"], f"{t['mean_abs']:.3g}", f"{t['std']:.3g}", f"{t['max_abs']:.3g}")
    console.print(tensors)


def convert(
    directory: Path = typer.Argument(..., help="An adapter directory holding adapter_model.bin."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Confirm you trust this pickle file."),
) -> None:
    """Convert a pickled adapter (adapter_model.bin) to safetensors, once, if you trust it."""
    if not allow_pickle:
        raise typer.BadParameter("pass --allow-pickle to confirm you trust this file (it is read with weights_only=True)")
    from lorakit.files.convert import convert_pickle

    written = or_exit(convert_pickle, directory)
    typer.echo(f"wrote {written}")



def merge(
    base: str = typer.Option(..., help="The full-precision base model (alias or local directory)."),
    adapter: Path = typer.Option(..., help="The saved adapter directory."),
    out: Path = typer.Option(..., help="Where to write the merged transformers model directory."),
    dtype: str = typer.Option("fp32", help="Output dtype: fp32 | bf16 | fp16 (the merge itself runs in fp32)."),
    requantize: str | None = typer.Option(None, help="Quantize the merged model: nf4 | fp4 | int8."),
    verify_base: bool = typer.Option(True, help="Refuse an adapter trained on another base."),
    overwrite: bool = typer.Option(False, help="Replace an existing model directory at --out."),
) -> None:
    """Merge an adapter into a full-precision base and save a standard model (optionally requantized)."""
    from lorakit.merge_to_dir import merge_to_dir

    info = or_exit(merge_to_dir, base, adapter, out, dtype, requantize, verify_base, overwrite)
    typer.echo(f"merged {adapter} into {base}: {info['parameters']:,} parameters, {dtype}"
               + (f", requantized to {requantize}" if requantize else "") + f" -> {out}")



def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(convert)
    app.command()(merge)
