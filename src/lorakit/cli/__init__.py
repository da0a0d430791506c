"""The `lorakit` command (also `python -m lorakit`): one module per command group, composed here."""

from __future__ import annotations

import typer

from lorakit.cli import config, files, registry, serve, train, ui
from lorakit.cli.common import main

app = typer.Typer(
    name="lorakit",
    help="Parameter-efficient fine-tuning (LoRA) with PEFT-compatible adapters.",
    no_args_is_help=True,
    add_completion=False,
)
app.callback()(main)
for group in (files, train, serve, ui):
    group.register(app)
app.add_typer(registry.app, name="registry")
app.add_typer(config.app, name="config")

__all__ = ["app"]
