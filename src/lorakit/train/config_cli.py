"""`lorakit config import FILE`: an Axolotl or LLaMA-Factory config as a lorakit job YAML, with
the table of what mapped to what, what was ignored and why. (`lorakit train FILE` reads such a
file directly; the import is for keeping and editing the lorakit version.)"""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

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
    from lorakit.cli import _or_exit

    rows, written, dialect = _or_exit(write_import, file, out, force)
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
    from lorakit.cli import _or_exit
    from lorakit.errors import ConfigError
    from lorakit.train.foreign import DIALECTS, known_keys

    def listed():
        if dialect not in DIALECTS:
            raise ConfigError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}.")
        return known_keys(dialect)

    typer.echo("\n".join(_or_exit(listed)))


def write_import(file: Path, out: Path | None, force: bool = False):
    """(rows, the file written, the dialect). What is written is checked as `lorakit train` would check it
    (schema, the adapter config) first; an existing file is replaced only with `force`, the source never."""
    from lorakit.errors import ConfigError
    from lorakit.files.format import write_text_atomic
    from lorakit.train.config import JobConfig, check_config, read_yaml
    from lorakit.train.config_errors import validated
    from lorakit.train.foreign import to_lorakit

    imported = to_lorakit(read_yaml(file), file)
    if imported.dialect == "lorakit":
        raise ConfigError(f"{file} is not an Axolotl or LLaMA-Factory config (it has none of their keys, or has "
                          "lorakit's sections); `lorakit train` reads it as it is.")
    target = out or file.with_name(f"{file.stem}.lorakit.yaml")
    if target.exists() and target.resolve() == file.resolve():
        raise ConfigError(f"{target} is the file being imported; write the lorakit config elsewhere (-o).")
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it, or choose another -o.")
    check_config(validated(JobConfig, imported.config))
    header = f"# lorakit job, imported from the {imported.dialect} config {file.resolve()} (`lorakit config import`)\n"
    write_text_atomic(target, header + yaml.safe_dump(imported.config, sort_keys=False))
    return imported.rows, target, imported.dialect


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
