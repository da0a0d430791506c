"""`lorakit serve`: the OpenAI-compatible server (lorakit/http/), with the dashboard mounted at /ui on `--ui`."""

from __future__ import annotations

from pathlib import Path

import typer

from lorakit.base_models import DEFAULT_MODEL
from lorakit.cli.common import or_exit
from lorakit.errors import LorakitError


def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="Built-in alias or local transformers directory."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH: an adapter loaded at start (repeatable)."),
    adapter_dir: list[Path] = typer.Option([], "--adapter-dir", help="Serve every adapter folder inside (loaded on "
                                                                        "first use); the admin API loads only from these."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback unless you say otherwise)."),
    port: int = typer.Option(8000),
    quantize: str | None = typer.Option(None, help="Quantize the base on load: nf4 | int8."),
    dtype: str = typer.Option("auto", help="Base dtype: auto | fp32 | bf16 | fp16."),
    served_model_name: str | None = typer.Option(None, help="The base model's name in the API (default: its id)."),
    max_loras: int = typer.Option(8, help="Adapters usable in one engine step."),
    max_cpu_loras: int = typer.Option(32, help="Adapters resident at once (LRU beyond that)."),
    max_num_seqs: int = typer.Option(16, help="Requests running at once."),
    max_model_len: int = typer.Option(2048, help="Prompt + output tokens per request."),
    max_num_batched_tokens: int = typer.Option(512, help="Tokens per engine step (prefill chunk budget)."),
    kv_cache_memory_mb: int = typer.Option(1024, "--kv-cache-memory", help="KV cache budget in MiB."),
    max_queue: int = typer.Option(256, help="Requests waiting at most; more get 429 with Retry-After."),
    api_key: str | None = typer.Option(None, envvar="LORAKIT_API_KEY", help="Inference key (Bearer)."),
    admin_key: str | None = typer.Option(None, envvar="LORAKIT_ADMIN_KEY", help="Admin key: turns the admin API on."),
    shutdown_timeout: float = typer.Option(30.0, help="On SIGTERM, seconds in-flight requests get to finish."),
    max_adapter_size: int = typer.Option(1024, help="Largest adapter the admin API loads, in MiB."),
    registry: str | None = typer.Option(None, help="Serve from a registry (folder or database URL): models NAME, "
                                                   "NAME:alias, NAME@N; alias moves are followed."),
    registry_blobs: str | None = typer.Option(None, help="The registry's blob store (a folder or an fsspec URL)."),
    registry_alias: str = typer.Option("prod", help="The alias a bare NAME means."),
    registry_poll: float = typer.Option(2.0, help="Seconds between checks for promotions and rollbacks."),
    ui: bool = typer.Option(False, "--ui", help="Also serve the dashboard at /ui (this server, its registry)."),
    ui_runs: Path | None = typer.Option(None, help="With --ui: the folder of training runs the dashboard shows."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="With --ui: a Host name the dashboard answers "
                                                                      "besides loopback and --host (repeatable)."),
    max_request_mb: float = typer.Option(4.0, help="Largest request body in MiB; larger ones get 413."),
) -> None:
    """Serve the base model and many adapters over an OpenAI-compatible API, hot-swapped under load."""
    from lorakit.http.server import ServeSettings, run

    def parse_adapters() -> dict[str, Path]:
        pairs = {}
        for item in adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise LorakitError(f"--adapter {item!r}: use NAME=PATH.")
            pairs[name] = Path(path)
        return pairs

    settings = ServeSettings(
        model=model, served_model_name=served_model_name, adapters=or_exit(parse_adapters), adapter_dirs=adapter_dir,
        host=host, port=port, quantize=quantize, dtype=dtype, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
        max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory_mb=kv_cache_memory_mb, max_queue=max_queue, api_key=api_key or None,
        admin_key=admin_key or None, shutdown_timeout=shutdown_timeout, max_adapter_size_mb=max_adapter_size,
        registry=registry, registry_blobs=registry_blobs, registry_alias=registry_alias, registry_poll=registry_poll,
        ui=ui, ui_runs=ui_runs, allowed_hosts=allowed_host, max_request_mb=max_request_mb)

    def ready(state) -> None:
        adapters = len(state.engine.adapters.names())
        typer.echo(f"lorakit serve: {state.base_name} and {adapters} adapter(s) on http://{host}:{port}/v1 "
                   f"(admin API {'on' if admin_key else 'off'})" + (f", dashboard http://{host}:{port}/ui" if ui else ""),
                   err=True)

    or_exit(run, settings, ready, mount_dashboard if ui else None)



def mount_dashboard(app, settings) -> None:
    """`--ui`: the dashboard at /ui, showing this server (in-process, through its own routes and keys), its
    registry and `--ui-runs`. Composed here, above both: the server does not know the dashboard exists."""
    import httpx

    from lorakit.ui.app import UISettings, create_ui_app

    ui = UISettings(runs=settings.ui_runs, registry=settings.registry, registry_blobs=settings.registry_blobs,
                    server="http://lorakit-serve", server_api_key=settings.api_key, admin_key=settings.admin_key,
                    host=settings.host, allowed_hosts=settings.allowed_hosts)
    app.mount("/ui", create_ui_app(ui, server_transport=httpx.ASGITransport(app=app)))


def register(app: typer.Typer) -> None:
    app.command()(serve)
