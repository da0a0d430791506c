"""`lorakit ui`: the dashboard app — runs, registry adapters and the live server, server-rendered.

    lorakit ui --runs runs/ --registry ~/adapters --server http://127.0.0.1:8000 --admin-key $KEY

Pages are Jinja templates (autoescaped: a run named `<script>` is text) with their data in a JSON
script tag for the charts (Plotly, served from the `plotly` package: nothing comes from a CDN).
Every page works from three roots the user names and nothing else: the runs folder, the registry
and the server URL (plus `--data` for eval files behind promotion gates). Promote and rollback
need the admin key and call the same code as `lorakit registry promote/rollback`, gates included.

Mountable: `lorakit serve --ui` puts this app at /ui, talking to its own server in-process.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import httpx
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import LorakitError, RegistryNotFound
from lorakit.http.errors import ApiError, check_key
from lorakit.registry.gates import METRICS
from lorakit.ui.access import Access, allowed_hosts, login_page
from lorakit.ui.runs import RunIndex, RunNotFound, config_diff
from lorakit.ui.server_view import ServerView

HERE = Path(__file__).parent
MAX_COMPARED = 5


class UISettings(BaseModel):
    """Every option of `lorakit ui` (the CLI's flags are these fields)."""

    model_config = ConfigDict(extra="forbid")

    runs: Path | None = Path("runs")  # the folder of `lorakit train` output folders
    registry: str | None = None  # a folder (embedded registry) or a database URL
    registry_blobs: str | None = None
    server: str | None = None  # a `lorakit serve` URL, e.g. http://127.0.0.1:8000
    server_api_key: str | None = None
    api_key: str | None = None  # the dashboard's own key (default: server_api_key); none and no server key: open
    admin_key: str | None = None  # promote / rollback are refused without it (it also opens the dashboard)
    data: Path | None = None  # where eval files for promotion gates are taken from
    host: str = "127.0.0.1"
    port: int = 7860
    allowed_hosts: list[str] = Field(default_factory=list)  # Host names answered besides loopback and `host`


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    alias: str = "prod"
    gates: list[str] = Field(default_factory=list)
    eval: str | None = None  # a file under --data
    allow_regression: bool = False
    new_base: bool = False


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    alias: str = "prod"


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(48, ge=1, le=1024)


class Dashboard:
    """What the routes share: the run index, the registry (opened once), the server view, the keys."""

    def __init__(self, settings: UISettings, server_transport: httpx.AsyncBaseTransport | None = None):
        from lorakit.registry.store import Registry

        self.settings = settings
        self.runs = RunIndex(settings.runs)
        self.registry = Registry.open(settings.registry, settings.registry_blobs) if settings.registry else None
        self.server = ServerView(settings.server, settings.server_api_key, server_transport)
        viewer = settings.api_key or settings.server_api_key
        self.access = Access([viewer, settings.admin_key] if viewer else [],
                             allowed_hosts(settings.host, settings.allowed_hosts))

    def require_admin(self, request: Request) -> None:
        if self.settings.admin_key is None:
            raise ApiError(403, "This dashboard was started without --admin-key, so promote and rollback are off.",
                           code="admin_disabled")
        check_key(request, self.settings.admin_key, "admin")

    def require_registry(self):
        if self.registry is None:
            raise ApiError(404, "No registry: start the dashboard with --registry FOLDER_OR_URL.", code="no_registry")
        return self.registry

    def eval_file(self, relative: str | None) -> Path | None:
        """An eval file named relative to --data (nothing outside it is read)."""
        if not relative:
            return None
        if self.settings.data is None:
            raise ApiError(400, "Gated promotion needs eval files: start the dashboard with --data DIR.", param="eval")
        root = self.settings.data.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ApiError(400, f"eval: {relative!r} is not a file under --data ({root}).", param="eval")
        return path


def version_scores(metrics: dict) -> list[tuple[str, str, float]]:
    """(where it was measured, metric, value) for a registry version: its training job's own eval
    (the adapter side) and every promotion eval (`eval:FILE`)."""
    rows = []
    for source, scores in metrics.items():
        scores = (scores.get("adapter") or {}) if source == "job" else scores
        rows += [(source, key, value) for key, value in scores.items() if key in METRICS and value is not None]
    return rows


def create_ui_app(settings: UISettings, server_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    board = Dashboard(settings, server_transport)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["version_scores"] = version_scores
    app = FastAPI(title="lorakit ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return templates.TemplateResponse(request, template, {"root": root, "settings": settings, **context},
                                          status_code=status)

    @app.middleware("http")
    async def gate(request: Request, call_next) -> Response:  # Host check and key: ui/access.py
        refused = board.access.check(request)
        return refused if refused is not None else await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return login_page(request, templates, next)

    @app.post("/login")
    async def login(request: Request) -> Response:
        return await board.access.login(request, templates)

    @app.exception_handler(RunNotFound)
    async def no_run(request: Request, error: RunNotFound) -> Response:
        if request.url.path.startswith(f"{request.scope.get('root_path', '')}/api/"):
            return JSONResponse(ApiError(404, str(error), type="not_found_error").body(), status_code=404)
        return page(request, "error.html", 404, message=str(error))

    @app.exception_handler(LorakitError)
    async def refused(request: Request, error: LorakitError) -> JSONResponse:  # a gate, a bad ref, a name
        status = 404 if isinstance(error, RegistryNotFound) else 400
        return JSONResponse(ApiError(status, str(error), code=type(error).__name__).body(), status_code=status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/vendor/plotly.min.js")
    async def plotly() -> FileResponse:
        with resources.as_file(resources.files("plotly") / "package_data" / "plotly.min.js") as path:
            return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    # -- runs -------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def runs_page(request: Request) -> HTMLResponse:
        runs, problems = board.runs.all()
        return page(request, "runs.html", rows=[run.row() for run in runs], problems=problems,
                    missing=board.runs.root is not None and not board.runs.root.is_dir())

    @app.get("/runs/{run_id:path}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        run = board.runs.get(run_id)
        return page(request, "run.html", run=run, row=run.row(), config_text=yaml.safe_dump(run.config, sort_keys=False),
                    data={"id": run.id, "metrics": run.metrics(), "finished": run.finished})

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request, run: Annotated[list[str] | None, Query()] = None) -> HTMLResponse:
        run = run or []
        if not 2 <= len(run) <= MAX_COMPARED:
            return page(request, "error.html", 400, message=f"Compare takes 2 to {MAX_COMPARED} runs; got {len(run)}.")
        runs = [board.runs.get(run_id) for run_id in run]
        return page(request, "compare.html", runs=runs, rows=[r.row() for r in runs], diff=config_diff(runs),
                    data={"runs": [{"id": r.id, "metrics": r.metrics()} for r in runs]})

    @app.get("/api/runs")
    def runs_json() -> list[dict]:
        return [run.row() for run in board.runs.all()[0]]

    @app.get("/api/runs/{run_id:path}/metrics")
    def metrics_json(run_id: str, after: int = Query(0, ge=0)) -> dict:
        run = board.runs.get(run_id)
        records = run.metrics(after)
        return {"records": records, "next": after + len(records), "finished": run.finished}

    # -- registry ---------------------------------------------------------------------------------
    @app.get("/adapters", response_class=HTMLResponse)
    def adapters_page(request: Request) -> HTMLResponse:
        if board.registry is None:
            return page(request, "adapters.html", names=None)
        registry = board.registry
        names = [{"name": n, "versions": registry.versions(n), "aliases": registry.aliases(n)} for n in registry.names()]
        return page(request, "adapters.html", names=names)

    @app.get("/adapters/{name}", response_class=HTMLResponse)
    def adapter_page(request: Request, name: str) -> HTMLResponse:
        registry = board.require_registry()
        versions = registry.versions(name)
        if not versions:
            return page(request, "error.html", 404, message=f"The registry has no adapter {name!r}.")
        return page(request, "adapter.html", name=name, versions=list(reversed(versions)),
                    aliases=registry.aliases(name), log=list(reversed(registry.log(name))))

    @app.post("/api/registry/promote")
    def promote(body: PromoteRequest, request: Request) -> dict:
        board.require_admin(request)
        from lorakit.train.promote import gated_promote

        registry = board.require_registry()
        return gated_promote(registry, body.ref, body.alias, body.gates, board.eval_file(body.eval),
                             allow_regression=body.allow_regression, new_base=body.new_base)

    @app.post("/api/registry/rollback")
    def rollback(body: RollbackRequest, request: Request) -> dict:
        board.require_admin(request)
        return board.require_registry().rollback(body.name, body.alias)

    # -- server -----------------------------------------------------------------------------------
    @app.get("/server", response_class=HTMLResponse)
    def server_page(request: Request) -> HTMLResponse:
        return page(request, "server.html", configured=board.server.configured)

    def require_server() -> ServerView:
        if not board.server.configured:
            raise ApiError(404, "No server: start the dashboard with --server URL.", code="no_server")
        return board.server

    @app.get("/api/server")
    async def server_json() -> dict:
        return await require_server().snapshot()

    @app.post("/api/server/chat")
    async def chat(body: ChatRequest, request: Request) -> dict:
        # The relay sends the server's key for the caller, so the caller must know it: otherwise the
        # dashboard would be a keyless way into a server that has one.
        if request.state.ui_key is None or request.state.ui_key != settings.server_api_key:
            check_key(request, settings.server_api_key, "server API")
        view = require_server()
        base = await view.base_model()
        if base is None:
            raise ApiError(502, f"The server at {view.url} does not list its base model (is it up?).",
                           type="server_error")
        return await view.chat_side_by_side(body.adapter, base, body.prompt, body.max_tokens)

    return app


def run(settings: UISettings, ready=None) -> None:
    import uvicorn

    app = create_ui_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    if ready is not None:
        ready()
    uvicorn.Server(config).run()
