"""OpenAI's request shapes for /v1/chat/completions and /v1/completions, with vLLM's extensions, honoured.

Every field OpenAI or vLLM defines for these routes is implemented (n, logprobs, echo, penalties,
logit_bias, best_of, list prompts, min_tokens, stop_token_ids, chat_template_kwargs, …) or is a true
no-op here (`user`, `store`, `metadata`, `service_tier`: bookkeeping of OpenAI's own platform;
`tools: []`, `tool_choice: "none"`, `response_format: {"type": "text"}`: asking for nothing). A field
neither defines is a 400 naming it (pydantic's `extra="forbid"`), and so is a value we cannot honour
(a tool call, a JSON schema: until structured output lands) or a vLLM field for a feature this server
does not have (`VLLM_UNSUPPORTED`: beam search, disaggregation, …), with a message that says which —
never a reply that silently ignored it.
`ApiError` carries OpenAI's error body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorakit.http.errors import ApiError
from lorakit.serve.sampling import MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams

# vLLM's fields for features this server does not have: a 400 that says so (not "unknown field").
VLLM_UNSUPPORTED = {
    "structured_outputs": "structured output", "guided_json": "structured output", "guided_regex": "structured output",
    "guided_choice": "structured output", "guided_grammar": "structured output",
    "guided_decoding_backend": "structured output", "guided_whitespace_pattern": "structured output",
    "structural_tag": "structured output", "prompt_embeds": "prompt embeddings", "watermarking": "watermarking",
    "logprob_token_ids": "logprobs of chosen token ids", "logits_processors": "custom logits processors",
    "kv_transfer_params": "disaggregated prefill", "ec_transfer_params": "disaggregated encoders",
    "vllm_xargs": "vLLM extension arguments", "repetition_detection": "repetition detection",
    "thinking_token_budget": "reasoning budgets", "reasoning_effort": "reasoning models",
    "include_reasoning": "reasoning models", "mm_processor_kwargs": "multimodal inputs",
    "media_io_kwargs": "multimodal inputs", "stream_interval": "batched stream chunks",
    "return_token_offsets": "the render endpoints", "return_mm_kwargs": "the render endpoints",
    "routed_experts_prompt_start": "mixture-of-experts routing data",
}


# The checks across fields below raise ApiError itself: pydantic lets an exception that is not a ValueError
# through unchanged, so the 400 names the field (a ValueError there would name only "body").


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 1.0, OpenAI's default
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # a torch.long, as vLLM
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # OpenAI's end-user id: for its abuse monitoring; nothing to do here
    store: bool | None = None  # OpenAI stores completions on its platform; a self-hosted server keeps nothing
    metadata: dict[str, str] | None = None  # tags for stored completions (see store)
    service_tier: str | None = None  # OpenAI's capacity tiers; this server has one
    parallel_tool_calls: bool | None = None  # meaningful with tools only
    # vLLM's sampling extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    bad_words: list[str] = Field(default_factory=list)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep this many prompt tokens (-1: what fits)
    truncation_side: Literal["left", "right"] | None = None  # left (default): keep the last ones
    return_tokens_as_token_ids: bool | None = None  # logprobs name tokens "token_id:123"
    return_token_ids: bool | None = None  # choices carry their token ids, the reply the prompt's
    request_id: str | None = Field(None, min_length=1, max_length=256)  # the reply's id: "cmpl-<request_id>"
    use_beam_search: Literal[False] = False  # beam search is not implemented: only the value that asks for none
    length_penalty: Literal[1.0] = 1.0  # a beam-search setting: only its neutral value
    priority: Literal[0] = 0  # vLLM refuses other values too unless it schedules by priority; this server does not
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)  # salts a prefix cache; there is none here
    session_id: str | None = None  # a routing hint for related requests; one engine here

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids (as strings); got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {token}: a bias is between -100 and 100, got {bias}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM: usage on every chunk, when usage is included at all."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def sampling(self, max_tokens: int, n: int, logprobs: int | None, bad_words_ids: list[list[int]] = ()) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, n=n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0, top_k=self.top_k or 0, min_p=self.min_p or 0.0, seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, min_tokens=self.min_tokens, stop=stop,
            stop_token_ids=self.stop_token_ids or [], include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs_wanted(), allowed_token_ids=self.allowed_token_ids,
            bad_words_ids=[list(ids) for ids in bad_words_ids])

    def truncated(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt after vLLM's `truncate_prompt_tokens` (the last N tokens, or the first N with
        truncation_side "right"; -1: as many as the model's context holds)."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return ids
        keep = max_model_len if keep == -1 else keep
        return ids[:keep] if self.truncation_side == "right" else ids[max(len(ids) - keep, 0):]

    def prompt_logprobs_wanted(self) -> int | None:
        return self.prompt_logprobs


def refuse_tool_use(body: BaseModel) -> None:
    """Tools and structured output are not implemented yet: the values that ask for nothing pass (they are
    what many clients send by default), anything else is a 400 naming the field."""
    asks = {"tools": bool(getattr(body, "tools", None)), "functions": bool(getattr(body, "functions", None)),
            "tool_choice": getattr(body, "tool_choice", None) not in (None, "none"),
            "function_call": getattr(body, "function_call", None) not in (None, "none"),
            "response_format": (getattr(body, "response_format", None) or {"type": "text"}).get("type") != "text"}
    field = next((name for name, asked in asks.items() if asked), None)
    if field is not None:
        raise ApiError(400, f"{field}: tool calls and structured output are not supported by this server yet; leave "
                            f"{field} out (or send the value that asks for nothing).", param=field,
                       code="unsupported_parameter")


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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None
    # vLLM's chat extensions
    echo: bool = False  # the reply starts with the last message's content when it is the assistant's
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None  # a Jinja template for this request (rendered sandboxed, as transformers does)
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None  # passed to the template (RAG templates read them)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ApiError(400, "continue_final_message needs the last message to be the assistant's.",
                           param="continue_final_message")
        if self.max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1.", param="max_tokens")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def echoed(self) -> str:
        """What vLLM's chat `echo` puts in front of the reply: the last message's text when it is the assistant's."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo: the prompt alone
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None
    add_special_tokens: bool = True

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def ids(item: Any) -> bool:
            return isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

        if isinstance(value, str) or ids(value) or (isinstance(value, list) and value and (
                all(isinstance(v, str) for v in value) or all(ids(v) for v in value))):
            return value
        raise ValueError("a prompt is a string, a list of token ids, or a non-empty list of either (not both)")

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ApiError(400, f"best_of ({self.best_of}) must be at least n ({self.n}).", param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ApiError(400, "best_of above n cannot be streamed: the best choices are known only at the end.",
                           param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens 0 returns nothing unless echo is true.", param="max_tokens")
        if self.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) needs a model trained for it; this server's are not.",
                           param="suffix")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One or more prompts: a string, a token-id list, or a list of either (choices indexed as OpenAI's)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> int | None:
        if self.echo and self.logprobs is not None:  # echo with logprobs: the prompt tokens' too, as OpenAI
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs
