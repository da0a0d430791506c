"""The OpenAI-compatible HTTP app over one `Engine`, put together: OpenAI's routes (openai_routes.py),
vLLM's tokenizer routes (tokenizer_routes.py) and admin routes (admin_routes.py, only with an admin
key), /health and /metrics, and the error handlers. What the routes share: state.py. Every error is OpenAI's body
`{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises its typed
exceptions (NotFoundError, AuthenticationError, RateLimitError, BadRequestError) — a malformed
JSON body included, with where it broke.

Nothing here blocks the event loop on the engine: requests go into the engine's inbox, tokens
come back through each request's stream (stream.py), prompts are rendered and tokenized in a
worker thread, and adapter loads run on the adapter cache's loader thread.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import AdapterNameError, RequestError
from lorakit.http import openai_protocol as oa
from lorakit.http.admin_routes import admin_router
from lorakit.http.body_limit import BodyLimit
from lorakit.http.errors import ApiError
from lorakit.http.openai_routes import inference_router
from lorakit.http.state import ServerState
from lorakit.http.tokenizer_routes import tokenizer_router

__all__ = ["ServerState", "create_app"]


def _validation_error(error: RequestValidationError) -> ApiError:
    first = error.errors()[0]
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        where = first.get("ctx", {}).get("error", "")
        at = location[-1] if location else "?"
        return ApiError(400, f"The request body is not valid JSON: {where} (at character {at}).",
                        code="invalid_json")
    if first.get("type") == "extra_forbidden" and param in oa.VLLM_UNSUPPORTED:
        return ApiError(400, f"{param}: vLLM's field for {oa.VLLM_UNSUPPORTED[param]}, which lorakit serve does not "
                             "implement; leave it out.", param=param, code="unsupported_parameter")
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument: {param}. Neither OpenAI nor vLLM defines it for this "
                             "route; leave it out.", param=param)
    if first.get("type") == "literal_error" and param in ("use_beam_search", "length_penalty", "priority"):
        return ApiError(400, f"{param}: {first.get('msg')} — lorakit serve has no beam search and no priority "
                             "scheduling.", param=param, code="unsupported_parameter")
    return ApiError(400, f"{param or 'body'}: {first.get('msg', '').removeprefix('Value error, ')}", param=param)


def create_app(state: ServerState, max_request_bytes: int = 4 << 20) -> FastAPI:
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    def error_response(request: Request, error: ApiError) -> JSONResponse:
        if not getattr(request.state, "counted", False):  # a generation that failed has counted itself
            label = getattr(request.state, "label", "") if error.status != 404 else ""
            state.metrics.request_done(label, error.status, error_type=error.type)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(AdapterNameError)
    async def adapter_gone(request: Request, error: AdapterNameError) -> JSONResponse:
        return error_response(request, ApiError(404, str(error), param="model", code="model_not_found"))

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, error: RequestError) -> JSONResponse:  # the engine refused its input
        return error_response(request, ApiError(400, str(error), param=error.param))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, _validation_error(error))

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
    app.include_router(tokenizer_router(state))
    if state.admin_key is not None:  # no admin key, no admin routes (404)
        app.include_router(admin_router(state))
    return app
