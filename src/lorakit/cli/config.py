"""`lorakit config import FILE`: an Axolotl or LLaMA-Factory config as a lorakit job YAML, with
the table of what mapped to what, what was ignored and why. (`lorakit train FILE` reads such a
file directly; the import is for keeping and editing the lorakit version.)"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.common import or_exit
from lorakit.train.config_import import write_import

app = typer.Typer(help="Job configs: import Axolotl / LLaMA-Factory configs.", no_args_is_help=True)
STATUS_STYLE = {"mapped": "green", "default": "cyan", "ignored": "yellow"}


@app.command(name="import")
def import_config(
    file: Path = typer.Argument(..., help="An Axolotl or LLaMA-Factory training YAML."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write (default: FILE.lorakit.yaml beside it)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file at --out (never FILE itself)."),
    as_json: bool = typer.Option(False, "--json", help="Print the mapping rows as JSON."),
) -> None:
    """Write the equivalent lorakit YAML and show, key by key, what mapped, what was ignored and why."""

    rows, written, dialect = or_exit(write_import, file, out, force)
    if as_json:
        typer.echo(json.dumps({"dialect": dialect, "written": str(written), "rows": [vars(r) for r in rows]},
                              indent=2, default=str))
        return
    table = Table(title=f"{dialect} → lorakit ({file})")
    for column in ("their key", "value", "status", "lorakit key", "note"):
        table.add_column(column, overflow="fold")
    empty = [row.key for row in rows if row.value is None and row.status == "ignored"]
    for row in rows:
        if row.key not in empty:
            style = STATUS_STYLE.get(row.status, "")
            table.add_row(row.key, _short(row.value), f"[{style}]{row.status}[/{style}]", row.target or "-", row.note)
    console = Console()
    console.print(table)
    if empty:
        console.print(f"unset in the file (nothing to map): {', '.join(empty)}")
    console.print(f"wrote {written}\ntrain it: lorakit train {written}")


@app.command()
def keys(dialect: str = typer.Argument(..., help="axolotl | llamafactory")) -> None:
    """List the keys of another tool's config that lorakit maps or knowingly ignores."""
    from lorakit.errors import ConfigError
    from lorakit.train.foreign import DIALECTS, known_keys

    def listed():
        if dialect not in DIALECTS:
            raise ConfigError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}.")
        return known_keys(dialect)

    typer.echo("\n".join(or_exit(listed)))


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
