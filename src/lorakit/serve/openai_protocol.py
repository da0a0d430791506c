"""OpenAI's request and response shapes for /v1/chat/completions and /v1/completions.

Requests are pydantic models that forbid unknown fields, and OpenAI fields we do not
implement are declared only to refuse a non-default value: a client that asks for `n=2`,
`logprobs` or `tools` gets a 400 naming the field, never a reply that silently ignored it
(vLLM logs "fields were present in the request but ignored" and answers anyway).
`ApiError` carries OpenAI's error body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorakit.serve.sampling import SEED_MAX, SEED_MIN, SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_key(request, expected: str | None, what: str) -> None:
    """401 unless the request's bearer token equals `expected` (constant-time)."""
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, f"Missing or wrong {what} key: send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# Fields OpenAI defines that we refuse unless left at their default (name → default).
_UNSUPPORTED = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "logprobs": None,
                "top_logprobs": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
                "response_format": None, "best_of": None, "echo": False, "suffix": None, "parallel_tool_calls": None}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # vLLM's extension; 0: off
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # a torch.long, as vLLM
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: recorded nowhere, harmless to accept
    # declared to be refused when set (see _UNSUPPORTED)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first OpenAI field set to something we do not implement."""
        for name, default in _UNSUPPORTED.items():
            value = getattr(self, name, default)
            if value != default and value not in (None, False):
                raise ApiError(400, f"{name}={value!r} is not supported by this server; leave it out"
                                    + (" (send n separate requests)." if name == "n" else "."), param=name,
                               code="unsupported_parameter")

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, stop=stop, stop_token_ids=self.stop_token_ids or [],
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id…: passed to the chat template as they are
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"Message content of type {part.get('type')!r} is not supported; only text parts.",
                               param="messages")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def rendered_messages(self) -> list[dict]:
        return [{**m.model_dump(exclude_none=True), "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompt_input(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "Only one prompt per request is supported; send one request per prompt.",
                               param="prompt")
            prompt = prompt[0]
        return prompt

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# -- responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, delta: dict | None, finish: str | None = None, usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_response(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None = None,
                     usage_: dict | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
