"""vLLM's tokenizer routes: /tokenize, /detokenize, /tokenizer_info, and /version.

Evaluation tools need them: lm-eval's `local-completions` looks for /tokenizer_info and /tokenize and, when
they answer, counts context lengths with the server's own tokenizer (its remote backend) instead of
downloading one from a hub. `model` is optional (the base model); an adapter whose folder has its own
tokenizer tokenizes with it. Shapes and defaults are vLLM's (`add_special_tokens` true for a prompt,
false for messages, whose template has the special tokens already). Behind the inference key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from lorakit.http.errors import ApiError, check_key
from lorakit.http.openai_protocol import ChatMessage
from lorakit.http.prompts import render_chat

INFO_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "padding_side",
             "truncation_side", "add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def tokenizer_router(state) -> APIRouter:
    def inference_key(request: Request) -> None:
        check_key(request, state.api_key, "API")

    router = APIRouter(dependencies=[Depends(inference_key)])

    async def tokenizer_of(model: str | None):
        adapter = await state.resolve_off_loop(model) if model else None
        tokenizer = state.tokenizer_for(adapter)
        if tokenizer is None:
            raise ApiError(400, "This server has no tokenizer.", param="model")
        return tokenizer

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "Give either prompt or messages.", param="prompt")
        tokenizer = await tokenizer_of(body.model)

        def run() -> list[int]:
            if body.prompt is not None:
                special = True if body.add_special_tokens is None else body.add_special_tokens
                return tokenizer(body.prompt, add_special_tokens=special)["input_ids"]
            return render_chat(tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt,
                               continue_final_message=body.continue_final_message,
                               add_special_tokens=bool(body.add_special_tokens), chat_template=body.chat_template,
                               chat_template_kwargs=body.chat_template_kwargs, tools=body.tools)

        tokens = list(await asyncio.to_thread(run))
        strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": state.engine.max_model_len, "tokens": tokens,
                "token_strs": strs}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        tokenizer = await tokenizer_of(body.model)
        state.engine.check_tokens(body.tokens)  # RequestError: a 400 (api.py)
        return {"prompt": tokenizer.decode(body.tokens)}

    @router.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict:
        tokenizer = await tokenizer_of(model)
        info = {key: getattr(tokenizer, key, None) for key in INFO_KEYS}
        return {"tokenizer_class": type(tokenizer).__name__, "chat_template": getattr(tokenizer, "chat_template", None),
                "vocab_size": len(tokenizer), **{k: v for k, v in info.items() if v is not None}}

    @router.get("/version")
    async def version() -> dict:
        from lorakit.version import __version__

        return {"version": __version__}

    return router
