"""What every `lorakit` command shares: errors we raise on purpose become one line and exit code 2,
defaults come from the schema, `--version` and `--verbose`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from lorakit.errors import LorakitError, TrainingInterrupted
from lorakit.version import __version__


def or_exit(function, *args):
    """Run; an error we raise on purpose becomes a one-line message and exit code 2."""
    try:
        return function(*args)
    except TrainingInterrupted:
        raise  # the caller knows the command to print
    except (LorakitError, FileNotFoundError, FileExistsError, ValueError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def default_of(section, key: str):
    """A config key's default, from the schema (the CLI restates none by hand)."""
    return section.model_fields[key].get_default(call_default_factory=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every third-party log line and progress bar."),
) -> None:
    """lorakit: train, combine and serve LoRA adapters."""
    from lorakit.quiet import quiet_third_party

    quiet_third_party(verbose)
