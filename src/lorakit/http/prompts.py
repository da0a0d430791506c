"""A request's prompts as token ids: chat messages rendered with the adapter's chat template, completions'
strings tokenized (or token ids taken as sent), vLLM's `truncate_prompt_tokens` applied — in a worker
thread, so a long prompt never stalls the other streams on the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from lorakit.http.errors import ApiError
from lorakit.http.openai_protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from lorakit.tool_calls import chat_text


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` puts back (the prompt as sent, or its decoding when sent as token ids or truncated)


def render_chat(tokenizer, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, add_special_tokens: bool = False, chat_template: str | None = None,
                chat_template_kwargs: dict[str, Any] | None = None, documents: list | None = None,
                tools: list[dict] | None = None) -> list[int]:
    """Messages → token ids through the chat template (transformers renders it in a sandboxed Jinja
    environment, so a request's own `chat_template` cannot reach the server). Tools and past tool calls go
    in as the template expects them, or as a Hermes system message for a template that renders none
    (tool_calls.py)."""
    options = {"continue_final_message": continue_final_message,
               "add_generation_prompt": add_generation_prompt and not continue_final_message}
    if documents is not None:
        options["documents"] = documents
    options |= chat_template_kwargs or {}  # vLLM's order: the request's template kwargs win
    text = chat_text(tokenizer, [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages], tools,
                     chat_template, **options)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


async def chat_prompt(tokenizer, body: ChatCompletionRequest, max_model_len: int) -> Prompt:
    if tokenizer is None or not (getattr(tokenizer, "chat_template", None) or body.chat_template):
        raise ApiError(400, "This model has no chat template; use /v1/completions (or send chat_template).",
                       param="messages")

    def render() -> list[int]:
        return render_chat(tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt,
                           continue_final_message=body.continue_final_message,
                           add_special_tokens=body.add_special_tokens, chat_template=body.chat_template,
                           chat_template_kwargs=body.chat_template_kwargs, documents=body.documents,
                           tools=body.tool_list() or None)

    try:
        ids = await asyncio.to_thread(render)
    except ApiError:
        raise
    except Exception as error:  # noqa: BLE001 - a template that cannot render these messages
        raise ApiError(400, f"The chat template cannot render these messages: {error}", param="messages") from None
    return Prompt(body.truncated(ids, max_model_len), "")


async def completion_prompts(tokenizer, body: CompletionRequest, max_model_len: int) -> list[Prompt]:
    """One Prompt per prompt of the request (a string, token ids, or a list of either)."""
    prompts = []
    for number, prompt in enumerate(body.prompts()):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ApiError(400, "This server has no tokenizer: send the prompt as token ids.", param="prompt")
            ids = list((await asyncio.to_thread(tokenizer, prompt, add_special_tokens=body.add_special_tokens))
                       ["input_ids"])
        else:
            ids, prompt = list(prompt), None
        kept = body.truncated(ids, max_model_len)
        if prompt is None or len(kept) < len(ids):  # the text `echo` returns is what the model saw
            prompt = tokenizer.decode(kept) if tokenizer is not None and body.echo else ""
        if not kept:
            raise ApiError(400, f"Prompt {number} is empty.", param="prompt")
        prompts.append(Prompt(kept, prompt))
    return prompts
