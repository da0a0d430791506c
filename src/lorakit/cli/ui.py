"""`lorakit ui`: the dashboard on its own."""

from __future__ import annotations

from pathlib import Path

import typer

from lorakit.cli.common import or_exit


def dashboard(
    runs: Path = typer.Option(Path("runs"), help="The folder of `lorakit train` runs to show."),
    registry: str | None = typer.Option(None, envvar="LORAKIT_REGISTRY", help="A registry (folder or database URL)."),
    registry_blobs: str | None = typer.Option(None, envvar="LORAKIT_REGISTRY_BLOBS",
                                              help="The registry's blob store, with a database URL."),
    server: str | None = typer.Option(None, help="A running `lorakit serve`, e.g. http://127.0.0.1:8000."),
    server_api_key: str | None = typer.Option(None, envvar="LORAKIT_API_KEY", help="That server's inference key."),
    api_key: str | None = typer.Option(None, envvar="LORAKIT_UI_KEY",
                                       help="The dashboard's key (default: --server-api-key); pages ask for it once."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="A Host name to answer besides loopback and "
                                                                      "--host (repeatable)."),
    admin_key: str | None = typer.Option(None, envvar="LORAKIT_ADMIN_KEY",
                                         help="Turns promote / rollback on; the page must send it."),
    data: Path | None = typer.Option(None, help="The folder eval files for promotion gates are taken from."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback unless you say otherwise)."),
    port: int = typer.Option(7860),
) -> None:
    """A web dashboard: runs and their curves, registry versions with promote / rollback, the live server."""
    from lorakit.ui.app import UISettings, run

    settings = UISettings(runs=runs, registry=registry, registry_blobs=registry_blobs, server=server,
                          server_api_key=server_api_key or None, api_key=api_key or None, admin_key=admin_key or None,
                          data=data, host=host, port=port, allowed_hosts=allowed_host)
    or_exit(run, settings, lambda: typer.echo(f"lorakit ui: http://{host}:{port}/ (runs in {runs})", err=True))


def register(app: typer.Typer) -> None:
    app.command(name="ui")(dashboard)
