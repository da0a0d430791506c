"""The `lorakit` command (also `python -m lorakit`). Subcommands arrive with their issues:
`train`, `eval`, `inspect`, `plan`, `merge`, `serve`."""

from __future__ import annotations

import typer

import lorakit
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
def demo(
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    steps: int = typer.Option(30, min=1, help="Training steps."),
    lr: float = typer.Option(2e-3, help="Learning rate."),
) -> None:
    """Train a LoRA adapter on bundled made-up facts and show answers before and after."""
    from lorakit.demo import run_demo

    run_demo(model_name=model, steps=steps, lr=lr)
