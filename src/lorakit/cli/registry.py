"""`lorakit registry …`: push, list, show, pull, diff, promote, rollback, log, delete, gc, check, retrain.

Every verb takes `--registry` (a folder for the embedded SQLite registry, or a SQLAlchemy URL
with `--blobs`) and `--json`; without them, $LORAKIT_REGISTRY or ~/.cache/lorakit/registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lorakit.cli.common import or_exit

app = typer.Typer(name="registry", help="Versioned adapters: push, promote with eval gates, roll back.",
                  no_args_is_help=True, add_completion=False)

REGISTRY = typer.Option(None, "--registry", envvar="LORAKIT_REGISTRY",
                        help="A folder (embedded SQLite) or a database URL (postgresql://…).")
BLOBS = typer.Option(None, "--blobs", envvar="LORAKIT_REGISTRY_BLOBS",
                     help="Blob store with a database URL: a shared folder or an fsspec URL (s3://…).")
JSON = typer.Option(False, "--json", help="Print JSON.")


def open_registry(location: str | None, blobs: str | None):
    """`Registry.open` (kept here for callers of the old path)."""
    from lorakit.registry.store import Registry

    return Registry.open(location, blobs)


def _run(function, *args):

    return or_exit(function, *args)


def _print(value, as_json: bool, table: Table | None = None) -> None:
    if as_json or table is None:
        typer.echo(json.dumps(value, indent=2, default=str))
    else:
        Console().print(table)


@app.command()
def push(name: str, path: Path, alias: str | None = typer.Option(None, help="Point this alias at the new version."),
         notes: str = typer.Option("", help="Free text kept with the version."),
         registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """Store an adapter folder as the next version of NAME."""
    info = _run(lambda: open_registry(registry, blobs).push(name, path, alias=alias, notes=notes))
    if as_json:
        _print(info.to_dict(), True)
    else:
        typer.echo(f"pushed {info.ref} ({info.digest[:12]}, {info.size_bytes / 1e6:.2f} MB)"
                   + (f", {name}:{alias} -> v{info.version}" if alias else ""))


@app.command(name="list")
def list_(registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """Every adapter: versions, newest, aliases."""
    def rows():
        store = open_registry(registry, blobs)
        return [{"name": n, "versions": len(store.versions(n)), "latest": store.show(n).version,
                 "aliases": store.aliases(n)} for n in store.names()]

    data = _run(rows)
    table = Table(title="adapters")
    for column in ("name", "versions", "latest", "aliases"):
        table.add_column(column)
    for row in data:
        table.add_row(row["name"], str(row["versions"]), f"v{row['latest']}",
                      ", ".join(f"{a} -> v{v}" for a, v in sorted(row["aliases"].items())) or "-")
    _print(data, as_json, table)


@app.command()
def show(ref: str, registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """One version (NAME = newest, NAME@N, NAME:alias): lineage, metrics, digest, base."""
    info = _run(lambda: open_registry(registry, blobs).resolve(ref))
    table = Table(show_header=False, title=info.ref)
    for key, value in info.to_dict().items():
        if key != "config":
            table.add_row(key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    _print(info.to_dict(), as_json, table)


@app.command()
def pull(ref: str, dest: Path, registry: str | None = REGISTRY, blobs: str | None = BLOBS,
         as_json: bool = JSON) -> None:
    """Copy a version's files to DEST (checked against its digest first)."""
    written = _run(lambda: open_registry(registry, blobs).pull(ref, dest))
    if as_json:
        _print({"ref": ref, "path": str(written)}, True)
    else:
        typer.echo(f"pulled {ref} -> {written}")


@app.command()
def diff(ref_a: str, ref_b: str, registry: str | None = REGISTRY, blobs: str | None = BLOBS,
         as_json: bool = JSON) -> None:
    """Config changes and per-module weight-delta norms between two versions."""
    from lorakit.registry.diff import diff_versions

    result = _run(lambda: diff_versions(open_registry(registry, blobs), ref_a, ref_b))
    table = Table(title=f"{result['a']} -> {result['b']}" + (" (same content)" if result["same_content"] else ""))
    for column in ("module / key", "a", "b", "|Δb-Δa|", "relative"):
        table.add_column(column)
    for key, change in result["config"].items():
        table.add_row(f"config.{key}", str(change["a"]), str(change["b"]), "", "")
    for name, row in result["modules"].items():
        table.add_row(name, _num(row["norm_a"]), _num(row["norm_b"]), _num(row.get("diff")), _num(row.get("relative")))
    _print(result, as_json, table)


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


@app.command()
def promote(ref: str, to: str = typer.Option(..., "--to", help="The alias to point at REF, e.g. prod."),
            gate: list[str] = typer.Option([], "--gate", help="e.g. 'exact_match>=0.9' (repeatable)."),
            eval_data: Path | None = typer.Option(None, "--eval", help="Held-out data the gates are measured on."),
            model: str | None = typer.Option(None, help="Base model for the eval (default: the adapter's recorded base)."),
            allow_regression: bool = typer.Option(False, help="Promote even if it scores below the alias's version."),
            new_base: bool = typer.Option(False, help="REF was trained on another base than the alias's version, on "
                                                      "purpose (the servers are moving to that base)."),
            max_examples: int | None = typer.Option(None, help="Eval examples (default: the job's eval.max_examples)."),
            registry: str | None = REGISTRY, blobs: str | None = BLOBS,
            as_json: bool = JSON) -> None:
    """Point an alias at REF — after its gates pass and it scores no worse than what the alias holds."""
    from lorakit.train.promote import gated_promote

    def run():
        return gated_promote(open_registry(registry, blobs), ref, to, gate, eval_data, model, max_examples,
                             allow_regression, new_base)

    result = _run(run)
    if as_json:
        _print(result, True)
    elif not result["changed"]:
        typer.echo(f"{ref.split('@')[0].split(':')[0]}:{to} is v{result['version']} already; nothing changed")
    else:
        previous = f" (was v{result['previous']})" if result["previous"] else ""
        typer.echo(f"{ref.split('@')[0].split(':')[0]}:{to} -> v{result['version']}{previous}")
        for side, scores in result["scores"].items():
            typer.echo(f"  {side}: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.items() if isinstance(v, float)))


@app.command()
def rollback(name: str, alias: str = typer.Option("prod", help="The alias to move back."),
             registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """Point ALIAS back at the version it held before."""
    result = _run(lambda: open_registry(registry, blobs).rollback(name, alias))
    if as_json:
        _print(result, True)
    else:
        typer.echo(f"{name}:{alias} -> v{result['to']} (was v{result['from']})")


@app.command()
def log(name: str | None = typer.Argument(None), registry: str | None = REGISTRY, blobs: str | None = BLOBS,
        as_json: bool = JSON) -> None:
    """The audit log: every push, promote, rollback, delete (of NAME, or all)."""
    rows = _run(lambda: open_registry(registry, blobs).log(name))
    table = Table(title="audit log")
    for column in ("at", "actor", "action", "adapter", "version", "alias", "previous"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) if row[c] is not None else "-" for c in
                        ("at", "actor", "action", "adapter", "version", "alias", "previous")))
    _print(rows, as_json, table)


@app.command()
def delete(ref: str, registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """Remove a version (refused while an alias points to it)."""
    _run(lambda: open_registry(registry, blobs).delete(ref))
    if as_json:
        _print({"deleted": ref}, True)
    else:
        typer.echo(f"deleted {ref} (its files go at the next `lorakit registry gc`)")


@app.command()
def gc(grace: float = typer.Option(3600.0, help="Seconds: unfinished pushes younger than this are left alone."),
       registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """Delete stored files no version refers to (never those of a push in flight)."""
    result = _run(lambda: open_registry(registry, blobs).gc(grace))
    if as_json:
        _print(result, True)
    else:
        typer.echo(f"removed {len(result['removed_blobs'])} blob(s), {result['removed_incoming']} unfinished push(es)")


@app.command()
def check(base: str = typer.Option(..., "--base", help="A base model (alias or local directory)."),
          registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """Which registered versions were trained on BASE (by fingerprint): what a base update leaves behind."""
    def run():
        from lorakit.base_models import load_base
        from lorakit.files.fingerprint import base_fingerprint

        return open_registry(registry, blobs).check(base_fingerprint(load_base(base)))

    rows = _run(run)
    table = Table(title=f"adapters vs {base}")
    for column in ("version", "trained on", "matches", "why"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["ref"], str(row["base_model"]), {True: "yes", False: "NO", None: "?"}[row["match"]],
                      row["reason"])
    _print(rows, as_json, table)


@app.command()
def retrain(name: str, base: str = typer.Option(..., "--base", help="The new base model."),
            output_dir: Path | None = typer.Option(None, help="Where the run goes (default runs/<name>-retrain)."),
            alias: str | None = typer.Option(None, help="Point this alias at the new version."),
            overwrite: bool = typer.Option(False, help="Replace an existing --output-dir (never a registered run)."),
            registry: str | None = REGISTRY, blobs: str | None = BLOBS, as_json: bool = JSON) -> None:
    """Re-run the recorded training config of NAME (or NAME@N, NAME:alias) on another base; push the result."""
    import contextlib
    import sys

    from lorakit.train.promote import retrain as run_retrain

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # stdout: the JSON alone
        info = _run(lambda: run_retrain(open_registry(registry, blobs), name, base, output_dir, alias, overwrite))
    if as_json:
        _print(info.to_dict(), True)
    else:
        typer.echo(f"retrained {name} on {base}: {info.ref} (parent {info.parent})")
