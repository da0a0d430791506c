"""The OpenAI-compatible HTTP API over one `Engine`: /v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics (admin routes: admin.py).

The request's `model` picks the adapter: the base model's name → no adapter, an adapter's
name → that adapter, anything else → 404 in OpenAI's error shape (TGI silently falls back to
the base model on an unknown adapter id; we never do). Every error is OpenAI's body
`{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises its typed
exceptions (NotFoundError, AuthenticationError, RateLimitError, BadRequestError).

Nothing here blocks the event loop on the engine: requests go into the engine's inbox, tokens
come back through each request's stream (stream.py), and adapter loads run on the adapter
cache's loader thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import (
    AdapterLoadError,
    AdapterNameError,
    ContextLengthError,
    RegistryUnavailable,
    RequestError,
)
from lorakit.serve import openai_protocol as oa
from lorakit.serve.engine import Engine, RequestHandle, RequestOutput
from lorakit.serve.metrics import ServerMetrics
from lorakit.serve.openai_protocol import ApiError, check_key

CLIENT_GONE = 499  # nginx's status for "the client closed the connection": counted, never sent


@dataclass
class ServerState:
    """What the routes share: the engine, the names that mean the base model, keys, limits."""

    engine: Engine
    base_name: str  # the served name of the base model (the first of `base_names`)
    base_names: set[str]
    base_root: str  # /v1/models' `root` for the base: its path or public id
    api_key: str | None = None
    admin_key: str | None = None
    adapter_roots: list[Path] = field(default_factory=list)
    max_queue: int = 256
    max_adapter_bytes: int = 1 << 30
    created: int = 0
    draining: bool = False
    sync: object | None = None  # a RegistrySync when the server follows a registry
    refused_local: dict[str, str] = field(default_factory=dict)  # local adapters refused at start, and why
    inflight: set[RequestHandle] = field(default_factory=set)
    metrics: ServerMetrics = field(init=False)
    _tokenizers: dict[Path, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine)

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for an unknown name."""
        if model in self.base_names:
            return None
        if model in self.engine.adapters:
            return model
        try:
            if self.sync is not None and self.sync.knows(model):
                return model
        except RegistryUnavailable as error:
            raise ApiError(503, str(error), type="service_unavailable", code="registry_unavailable",
                           headers={"Retry-After": "2"}) from None
        reason = self.refused_local.get(model) or (self.sync.refused.get(model) if self.sync else None)
        if reason is not None:
            raise ApiError(400, reason, param="model", code="adapter_refused")
        raise ApiError(404, f"The model `{model}` does not exist. Served: {self.base_name} (the base model) and the "
                            "adapters listed by GET /v1/models.", param="model", code="model_not_found")

    async def resolve_off_loop(self, model: str) -> str | None:
        """`resolve`, with a first-use registry lookup (a database query and a blob re-hash for a
        pinned NAME@N) run in a worker thread, so the event loop keeps streaming other requests."""
        if self.sync is None or model in self.base_names or model in self.engine.adapters:
            return self.resolve(model)
        return await asyncio.to_thread(self.resolve, model)

    def tokenizer_for(self, adapter: str | None):
        """The adapter's own tokenizer (chat template) if its folder has one, else the base's."""
        path = self.engine.adapters.path_of(adapter) if adapter else None
        if path is None or not any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
            return self.engine.tokenizer
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return self._tokenizers[path]


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _finish_reason(output: RequestOutput) -> str:
    return "length" if output.finish_reason == "length" else "stop"


class _RequestStream(StreamingResponse):
    """A streaming reply that runs `on_close` however it ends — also when the client went away before its
    first byte, when Starlette cancels it without ever starting the generator (so a generator's own
    `finally` would never run, and the request would decode to the end unread)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Completions:
    """One request's life: checks, admission, then a JSON reply or an SSE stream; metrics at the end."""

    def __init__(self, state: ServerState, http: Request, body: oa.ChatCompletionRequest | oa.CompletionRequest,
                 adapter: str | None, prompt_ids: list[int], chat: bool):
        self.state, self.http, self.body, self.adapter, self.ids, self.chat = state, http, body, adapter, prompt_ids, chat
        self.label = body.model
        self.rid = oa.new_id("chatcmpl" if chat else "cmpl")
        self.status = CLIENT_GONE  # what the metrics record unless the reply completes

    def admit(self) -> RequestHandle:
        engine, state = self.state.engine, self.state
        max_tokens = self.body.requested_max_tokens() or max(engine.max_model_len - len(self.ids), 1)
        try:
            engine.check_length(len(self.ids), max_tokens)
        except ContextLengthError as error:
            raise ApiError(400, str(error), param="messages" if self.chat else "prompt",
                           code="context_length_exceeded") from None
        if state.draining:
            raise ApiError(503, "The server is shutting down; retry on another replica.", type="service_unavailable")
        if engine.waiting >= state.max_queue:
            raise ApiError(429, f"Too many requests waiting ({engine.waiting} >= --max-queue {state.max_queue}); "
                                "retry shortly.", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        try:  # an AdapterNameError (unloaded since resolve()) is the app's 404
            handle = engine.add_request(self.ids, self.adapter, self.body.sampling(max_tokens))
        except AdapterLoadError as error:
            raise ApiError(500, str(error), type="server_error", code="adapter_load_failed") from None
        except RequestError as error:
            raise ApiError(400, str(error)) from None
        state.inflight.add(handle)
        return handle

    def _done(self, handle: RequestHandle, status: int) -> RequestOutput:
        output = self.state.engine.output_of(handle.seq)
        self.state.inflight.discard(handle)
        self.state.metrics.request_done(self.label, status, output)
        return output

    def _close(self, handle: RequestHandle) -> None:
        if not handle.seq.finished:
            self.state.engine.abort(handle)
        self._done(handle, self.status)

    async def reply(self) -> Response:
        handle = self.admit()
        if self.body.stream:
            return _RequestStream(self._stream(handle), on_close=lambda: self._close(handle))
        return await self._collect(handle)

    async def _collect(self, handle: RequestHandle) -> Response:
        async def drain():
            async for _ in handle:
                pass

        task = asyncio.ensure_future(drain())
        try:
            while not (await asyncio.wait({task}, timeout=0.25))[0]:
                if await self.http.is_disconnected():
                    self.state.engine.abort(handle)
            await task
        finally:
            if not handle.seq.finished:
                self.state.engine.abort(handle)
        output = self.state.engine.output_of(handle.seq)
        error = _cut_short(output)
        self._done(handle, error.status if error else CLIENT_GONE if output.finish_reason == "abort" else 200)
        if error is not None:
            raise error
        make = oa.chat_response if self.chat else oa.completion_response
        return JSONResponse(make(self.rid, self.label, output.text, _finish_reason(output), len(self.ids),
                                 len(output.token_ids)))

    async def _stream(self, handle: RequestHandle) -> AsyncIterator[str]:
        chunk = oa.chat_chunk if self.chat else oa.completion_chunk
        if self.chat:
            yield _sse(chunk(self.rid, self.label, {"role": "assistant", "content": ""}))
        async for _, delta in handle:
            if delta:
                yield _sse(chunk(self.rid, self.label, {"content": delta} if self.chat else delta))
        output = self.state.engine.output_of(handle.seq)
        error = _cut_short(output)
        if error is not None:  # an error event, and no [DONE]: a cut stream must never look complete
            self.status = error.status
            yield _sse(error.body())
            return
        self.status = 200
        yield _sse(chunk(self.rid, self.label, {} if self.chat else "", _finish_reason(output)))
        if self.body.include_usage:
            yield _sse(chunk(self.rid, self.label, None, usage_=oa.usage(len(self.ids), len(output.token_ids))))
        yield _sse("[DONE]")


def _cut_short(output: RequestOutput) -> ApiError | None:
    """The error a request that did not finish normally ends with: a failure (500), or an abort by the server
    (503: its shutdown timeout); None for a finished request, or one its own client aborted."""
    if output.finish_reason == "error":
        return ApiError(500, output.error or "generation failed", type="server_error")
    if output.finish_reason == "abort" and output.error:
        return ApiError(503, output.error, type="service_unavailable", code="aborted")
    return None


def inference_router(state: ServerState) -> APIRouter:
    def inference_key(request: Request) -> None:
        check_key(request, state.api_key, "API")

    router = APIRouter(dependencies=[Depends(inference_key)])

    @router.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request) -> Response:
        request.state.label = body.model
        body.refuse_unsupported()
        adapter = await state.resolve_off_loop(body.model)
        tokenizer = state.tokenizer_for(adapter)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "This model has no chat template; use /v1/completions.", param="messages")
        try:  # in a worker thread: a long prompt must not stall every other stream on the event loop
            ids = list(await asyncio.to_thread(tokenizer.apply_chat_template, body.rendered_messages(),
                                               add_generation_prompt=True, tokenize=True, return_dict=False))
        except Exception as error:  # noqa: BLE001 - a template that cannot render these messages
            raise ApiError(400, f"The chat template cannot render these messages: {error}", param="messages") from None
        return await Completions(state, request, body, adapter, ids, chat=True).reply()

    @router.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request) -> Response:
        request.state.label = body.model
        body.refuse_unsupported()
        adapter = await state.resolve_off_loop(body.model)
        prompt = body.prompt_input()
        if isinstance(prompt, str):
            tokenizer = state.tokenizer_for(adapter)
            if tokenizer is None:
                raise ApiError(400, "This server has no tokenizer: send the prompt as token ids.", param="prompt")
            prompt = (await asyncio.to_thread(tokenizer, prompt, add_special_tokens=True))["input_ids"]
        if not prompt:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        return await Completions(state, request, body, adapter, list(prompt), chat=False).reply()

    @router.get("/v1/models")
    async def models() -> dict:
        def card(name: str, root: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": state.created, "owned_by": "lorakit", "root": root,
                    "parent": parent, "max_model_len": state.engine.max_model_len, "permission": []}

        cards = [card(state.base_name, state.base_root, None)]
        for name in state.engine.adapters.names():
            followed = state.sync.card(name) if state.sync else None
            if followed is None:
                cards.append(card(name, str(state.engine.adapters.path_of(name)), state.base_name))
            else:
                cards.append({**card(name, followed.pop("root"), state.base_name), **followed})
        return {"object": "list", "data": cards}

    return router


def create_app(state: ServerState, max_request_bytes: int = 4 << 20) -> FastAPI:
    from lorakit.serve.admin import admin_router
    from lorakit.serve.body_limit import BodyLimit

    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    def error_response(request: Request, error: ApiError) -> JSONResponse:
        state.metrics.request_done(getattr(request.state, "label", "") if error.status != 404 else "", error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(AdapterNameError)
    async def adapter_gone(request: Request, error: AdapterNameError) -> JSONResponse:
        return error_response(request, ApiError(404, str(error), param="model", code="model_not_found"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument: {param}. This server does not support it; leave it out."
        else:
            message = f"{param or 'body'}: {first.get('msg')}"
        return error_response(request, ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), type=kind).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:  # never a plain-text 500
        return error_response(request, ApiError(500, f"Internal error: {type(error).__name__}. The server log has "
                                                     "the details.", type="server_error"))

    @app.get("/health")
    async def health() -> Response:
        if state.engine.dead is not None:  # the step loop died: every request would hang
            return JSONResponse({"status": "engine_dead", "error": state.engine.dead}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(inference_router(state))
    if state.admin_key is not None:  # no admin key, no admin routes (404)
        app.include_router(admin_router(state))
    return app
