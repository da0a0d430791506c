"""`lorakit serve`: build the engine from settings, put the HTTP API on it, run uvicorn, drain on SIGTERM.

    lorakit serve --adapter support=adapters/support --adapter-dir adapters/ --port 8000

Offline by default: the built-in SmolLM2-135M-Instruct, nothing downloaded. Every linear layer
of the base is wrapped once at start (`PeftModel.for_serving`), so loading, replacing and
unloading adapters later is a write into the weight banks, never a change of the module tree.

SIGTERM drains: new requests get 503 (and /health 503, for a load balancer), requests in
flight finish — for at most `shutdown_timeout` seconds, then they are aborted — and the
process exits 0. A second SIGTERM or a Ctrl-C stops at once (uvicorn's own handling).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import ConfigError
from lorakit.http.local_adapters import adapter_folders, folder_problem

_log = logging.getLogger(__name__)

_DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ServeSettings(BaseModel):
    """Every option of `lorakit serve` (the CLI's flags are these fields)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m-instruct"
    served_model_name: str | None = None
    adapters: dict[str, Path] = Field(default_factory=dict)  # --adapter NAME=PATH: loaded at start
    adapter_dirs: list[Path] = Field(default_factory=list)  # every adapter folder inside: loaded on first use
    host: str = "127.0.0.1"
    port: int = 8000
    quantize: str | None = None  # nf4 | int8
    dtype: str = "auto"
    max_loras: int = Field(8, ge=1)
    max_cpu_loras: int = Field(32, ge=1)
    max_num_seqs: int = Field(16, ge=1)
    max_model_len: int = Field(2048, ge=2)
    max_num_batched_tokens: int = Field(512, ge=1)
    kv_cache_memory_mb: int = Field(1024, ge=1)
    max_queue: int = Field(256, ge=0)
    api_key: str | None = None
    admin_key: str | None = None
    shutdown_timeout: float = Field(30.0, ge=0)
    max_adapter_size_mb: int = Field(1024, ge=1)
    max_request_mb: float = Field(4.0, gt=0)  # a larger request body gets 413 before it is read
    registry: str | None = None  # follow a registry (a folder or a database URL)
    registry_blobs: str | None = None  # a folder or an fsspec URL
    registry_alias: str = "prod"  # what a bare NAME means
    registry_poll: float = Field(2.0, gt=0)  # seconds between alias checks
    ui: bool = False  # mount the dashboard at /ui
    ui_runs: Path | None = None  # the runs folder it shows
    allowed_hosts: list[str] = Field(default_factory=list)  # Host names /ui answers besides loopback and `host`


def build_state(settings: ServeSettings):
    """Load the base, wrap it for serving, start the engine and register the adapters."""
    import lorakit
    from lorakit.base_models import PUBLIC_IDS, builtin_alias, load_base, load_tokenizer
    from lorakit.http.state import ServerState
    from lorakit.serve.engine import Engine

    if settings.dtype not in _DTYPES:
        raise ConfigError(f"--dtype {settings.dtype!r}: use one of {', '.join(_DTYPES)}.")
    if settings.quantize not in (None, "nf4", "int8"):
        raise ConfigError(f"--quantize {settings.quantize!r}: use nf4 or int8.")
    base = load_base(settings.model, quantize=settings.quantize, dtype=_DTYPES[settings.dtype])
    tokenizer = load_tokenizer(settings.model)
    # r=1 only names the targets: every linear layer gets wrapped, no adapter is added.
    model = lorakit.PeftModel.for_serving(base, lorakit.LoraConfig(r=1, target_modules="all-linear"))
    engine = Engine(model, tokenizer, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                    max_num_batched_tokens=settings.max_num_batched_tokens,
                    kv_cache_memory=settings.kv_cache_memory_mb << 20, max_loras=settings.max_loras,
                    max_cpu_loras=max(settings.max_cpu_loras, len(settings.adapters)))
    alias = builtin_alias(settings.model)
    public = PUBLIC_IDS[alias] if alias else str(settings.model)
    name = settings.served_model_name or public
    max_bytes = settings.max_adapter_size_mb << 20
    refused: dict[str, str] = {}
    for directory in settings.adapter_dirs:  # the admin API's checks, at start: a bad folder is not served
        for adapter, folder in adapter_folders(directory).items():
            problem = folder_problem(folder, [directory], max_bytes, shown=f"{directory.name}/{adapter}")
            if problem is None:
                engine.adapters.register(adapter, folder)
            else:
                refused[adapter] = problem
                _log.warning("not serving %s: %s", adapter, problem)
    for adapter, folder in settings.adapters.items():  # loaded now: a bad file stops the start, with its message
        problem = folder_problem(Path(folder), None, max_bytes)
        if problem is not None:
            raise ConfigError(f"--adapter {adapter}={folder}: {problem}")
        engine.adapters.load(adapter, folder, replace=adapter in engine.adapters, pinned=True).result()
    engine.start()
    sync = None
    if settings.registry is not None:
        from lorakit.registry.store import Registry
        from lorakit.serve.registry_sync import RegistrySync

        sync = RegistrySync(Registry.open(settings.registry, settings.registry_blobs), engine, settings.registry_alias,
                            settings.registry_poll)
        sync.start()
    return ServerState(engine, name, {name, public, str(settings.model)}, public, settings.api_key,
                       settings.admin_key, list(settings.adapter_dirs), settings.max_queue, max_bytes,
                       created=int(time.time()), sync=sync, refused_local=refused)


def run(settings: ServeSettings, ready=None, mount=None) -> None:
    """Serve until SIGTERM (drain, exit 0) or Ctrl-C. `ready(state)` is called once the port is bound;
    `mount(app, settings)` adds to the app before it serves (the CLI mounts the dashboard with it)."""
    import uvicorn

    from lorakit.http.app import create_app

    state = build_state(settings)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM and not state.draining:
                state.draining = True  # routes answer 503 from now on
                threading.Thread(target=self._drain, name="lorakit-drain", daemon=True).start()
                return  # not uvicorn's: it would re-raise SIGTERM after shutdown, and exit with -15
            super().handle_exit(sig, frame)

        def _drain(self) -> None:
            deadline = time.monotonic() + settings.shutdown_timeout
            while state.inflight and time.monotonic() < deadline:
                time.sleep(0.05)
            for handle in list(state.inflight):  # past the timeout: aborted, and their replies say so
                state.engine.abort(handle, reason=f"The server shut down before this request finished (it waited "
                                                  f"--shutdown-timeout {settings.shutdown_timeout:g} s); retry it.")
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if ready is not None:
                ready(state)

    app = create_app(state, max_request_bytes=int(settings.max_request_mb * 2**20))
    if mount is not None:
        mount(app, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=max(settings.shutdown_timeout, 1.0), access_log=False)
    try:
        DrainingServer(config).run()
    finally:
        if state.sync is not None:
            state.sync.stop()
        state.engine.close()
