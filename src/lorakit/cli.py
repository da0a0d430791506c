"""The `lorakit` command (also `python -m lorakit`). Subcommands arrive with their issues:
`train`, `eval`, `inspect`, `plan`, `merge`, `serve`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import lorakit
from lorakit.errors import LorakitError
from lorakit.models import DEFAULT_MODEL

app = typer.Typer(
    name="lorakit",
    help="Parameter-efficient fine-tuning (LoRA) with PEFT-compatible adapters.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {lorakit.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """lorakit: train, combine and serve LoRA adapters."""


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="An adapter directory (adapter_config.json + adapter_model.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what an adapter holds: config, base and fingerprint, targets, ranks, size, tensor stats."""
    from lorakit.describe import describe, to_json

    info = _or_exit(describe, directory)
    if as_json:
        typer.echo(to_json(info))
        return
    console = Console()
    config = info["config"]
    summary = Table(show_header=False, title=f"adapter {info['path']}")
    for label, value in [
        ("made by", info["made_by"]), ("created", info["created"] or "-"), ("base model", info["base_model"] or "-"),
        ("base fingerprint", info["fingerprint"]), ("checksum", info["checksum"]),
        ("r / alpha", f"{config['r']} / {config['lora_alpha']}" + (" (rsLoRA)" if config["use_rslora"] else "")),
        ("ranks (modules)", ", ".join(f"r={r}: {n}" for r, n in info["ranks"].items())),
        ("target modules", f"{len(info['target_modules'])} modules ({config['target_modules']})"),
        ("modules_to_save", str(config["modules_to_save"] or "-")), ("bias", config["bias"]),
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


@app.command()
def convert(
    directory: Path = typer.Argument(..., help="An adapter directory holding adapter_model.bin."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Confirm you trust this pickle file."),
) -> None:
    """Convert a pickled adapter (adapter_model.bin) to safetensors, once, if you trust it."""
    if not allow_pickle:
        raise typer.BadParameter("pass --allow-pickle to confirm you trust this file (it is read with weights_only=True)")
    from lorakit.describe import convert_pickle

    written = _or_exit(convert_pickle, directory)
    typer.echo(f"wrote {written}")


def _or_exit(function, *args):
    """Run; an error we raise on purpose becomes a one-line message and exit code 2."""
    try:
        return function(*args)
    except (LorakitError, FileNotFoundError, FileExistsError, ValueError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
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
    from lorakit.merging import merge_to_dir

    info = _or_exit(merge_to_dir, base, adapter, out, dtype, requantize, verify_base, overwrite)
    typer.echo(f"merged {adapter} into {base}: {info['parameters']:,} parameters, {dtype}"
               + (f", requantized to {requantize}" if requantize else "") + f" -> {out}")


@app.command()
def plan(
    params: str | None = typer.Option(None, help="Parameter count, e.g. 70B or 135M (or give --model)."),
    model: str | None = typer.Option(None, help="Read sizes from a model (alias or local directory)."),
    method: str = typer.Option("lora", help="full | lora | qlora"),
    r: int = typer.Option(16, help="LoRA rank (all-linear adapters)."),
    batch: int | None = typer.Option(None), seq: int | None = typer.Option(None),
    layers: int | None = typer.Option(None), hidden: int | None = typer.Option(None),
    intermediate: int | None = typer.Option(None, help="MLP width (default 8/3 of --hidden, as in Llama)."),
    grad_ckpt: bool = typer.Option(False, "--grad-ckpt", help="Gradient checkpointing."),
    master_copy: bool = typer.Option(False, "--master-copy", help="Full fine-tune keeps an fp32 master copy."),
    dtype: str = typer.Option("bf16", help="Weight and activation dtype: bf16 | fp16 | fp32."),
    runtime_gb: float = typer.Option(0.0, help="Framework's own memory to add (e.g. ~0.22 for torch on CPU)."),
    tenants: int | None = typer.Option(None, help="Serving: number of tenants (adapters)."),
    adapter_mb: float | None = typer.Option(None, help="Serving: size of one adapter in MB."),
    base_gb: float | None = typer.Option(None, help="Serving: base checkpoint size in GB (default: its weights)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Plan memory: weights, gradients, optimizer, master copy, activations, adapters; and tenants."""
    from lorakit import plan as planner
    from lorakit.models import resolve_model_path

    def build():
        if model:
            shape = planner.Shape.from_model_dir(resolve_model_path(model))
        elif params:
            width = intermediate or (hidden and int(hidden * 8 / 3))
            shape = planner.Shape(planner.parse_count(params), layers, hidden, width)
        else:
            raise LorakitError("Give --params (e.g. 70B) or --model.")
        size = {"bf16": 2, "fp16": 2, "fp32": 4}.get(dtype)
        if size is None:
            raise LorakitError(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}.")
        result = planner.plan(shape, method, r, batch, seq, grad_ckpt, master_copy, size, runtime_gb=runtime_gb)
        if tenants:
            if adapter_mb is None:
                raise LorakitError("--tenants needs --adapter-mb.")
            base = base_gb if base_gb is not None else shape.params * size / planner.GB
            result.tenants = planner.tenants(tenants, base, adapter_mb)
        return result

    result = _or_exit(build)
    if as_json:
        typer.echo(result.to_json())
        return
    table = Table(title=f"memory plan: {method}")
    table.add_column("part")
    table.add_column("GB", justify="right")
    for part, gb in result.parts_gb.items():
        table.add_row(part, f"{gb:,.2f}")
    table.add_row("[bold]total[/bold]", f"[bold]{result.total_gb:,.2f}[/bold]")
    console = Console()
    console.print(table)
    if result.tenants:
        t = result.tenants
        console.print(f"{t['tenants']} tenants: {t['merged_gb']:,.2f} GB as merged copies vs "
                      f"{t['shared_gb']:,.2f} GB shared base + adapters ({t['saving_x']:.1f}x less)")
    for note in result.notes:
        console.print(f"note: {note}")


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    steps: int = typer.Option(30, min=1, help="Training steps."),
    lr: float = typer.Option(2e-3, help="Learning rate."),
) -> None:
    """Train a LoRA adapter on bundled made-up facts and show answers before and after."""
    from lorakit.demo import run_demo

    run_demo(model_name=model, steps=steps, lr=lr)
