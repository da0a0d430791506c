"""OpenAI's inference routes: /v1/chat/completions, /v1/completions, /v1/models and /v1/models/{id}.

The request's `model` picks the adapter: the base model's name → no adapter, an adapter's
name → that adapter, anything else → 404 in OpenAI's error shape (TGI silently falls back to
the base model on an unknown adapter id; we never do). A request's life after that: completions.py.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lorakit.http import openai_protocol as oa
from lorakit.http.completions import Generation
from lorakit.http.errors import ApiError, check_key
from lorakit.http.prompts import chat_prompt, completion_prompts
from lorakit.http.state import ServerState


def inference_router(state: ServerState) -> APIRouter:
    def inference_key(request: Request) -> None:
        check_key(request, state.api_key, "API")

    router = APIRouter(dependencies=[Depends(inference_key)])

    async def generate(body: oa.ChatCompletionRequest | oa.CompletionRequest, request: Request, chat: bool) -> Response:
        request.state.label = body.model
        adapter = await state.resolve_off_loop(body.model)
        tokenizer = state.tokenizer_for(adapter)
        length = state.engine.max_model_len
        prompts = [await chat_prompt(tokenizer, body, length)] if chat else \
            await completion_prompts(tokenizer, body, length)
        return await Generation(state, request, body, adapter, prompts, chat, tokenizer).reply()

    @router.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request) -> Response:
        return await generate(body, request, chat=True)

    @router.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request) -> Response:
        return await generate(body, request, chat=False)

    @router.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": state.cards()}

    @router.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model not in state.base_names and model not in state.engine.adapters:
            raise ApiError(404, f"The model `{model}` does not exist.", type="invalid_request_error", param="model",
                           code="model_not_found")
        return state.card(None if model in state.base_names else model)

    return router
