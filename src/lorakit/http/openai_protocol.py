"""OpenAI's request shapes for /v1/chat/completions and /v1/completions, with vLLM's extensions, honoured.

Every field OpenAI or vLLM defines for these routes is implemented (n, logprobs, echo, penalties,
logit_bias, best_of, list prompts, min_tokens, stop_token_ids, chat_template_kwargs, tools and
tool_choice, response_format and vLLM's structured outputs, …) or is a true no-op here (`user`,
`store`, `metadata`, `service_tier`: bookkeeping of OpenAI's own platform). A field neither defines is
a 400 naming it (pydantic's `extra="forbid"`), and so is a vLLM field for a feature this server does
not have (`VLLM_UNSUPPORTED`: beam search, disaggregation, …), with a message that says which — never a
reply that silently ignored it.
`ApiError` carries OpenAI's error body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorakit.http.errors import ApiError
from lorakit.serve.sampling import MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams
from lorakit.serve.structured import StructuredOutput

# vLLM's fields for features this server does not have: a 400 that says so (not "unknown field").
VLLM_UNSUPPORTED = {
    "guided_whitespace_pattern": "JSON whitespace patterns", "structural_tag": "structural tags",
    "prompt_embeds": "prompt embeddings", "watermarking": "watermarking",
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
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    # vLLM's structured outputs (its older guided_* spellings too)
    structured_outputs: dict | None = None  # {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # vLLM's choice of library; this server has one (llguidance)
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

    def structured(self) -> StructuredOutput | None:
        """The grammar the output must match, from response_format or vLLM's fields (at most one of them)."""
        found = []
        fmt = self.response_format or {"type": "text"}
        kind = fmt.get("type")
        if kind == "json_object":
            found.append(StructuredOutput(kind="json", param="response_format"))
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON Schema object.",
                               param="response_format")
            found.append(StructuredOutput(kind="json_schema", spec=json.dumps(schema), param="response_format"))
        elif kind != "text":
            raise ApiError(400, f"response_format type {kind!r}: use text, json_object or json_schema.",
                           param="response_format")
        options = dict(self.structured_outputs or {})
        for field, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, field) is not None:
                options[key] = getattr(self, field)
        closed = bool(options.pop("disable_additional_properties", False))  # vLLM: objects take no other keys
        for key, value in options.items():
            param = "structured_outputs" if self.structured_outputs and key in self.structured_outputs else f"guided_{key}"
            if value is None or value is False:
                continue
            if key == "json":
                spec = _schema(value, param)
                found.append(StructuredOutput(kind="json_schema", param=param,
                                              spec=json.dumps(_closed(spec) if closed else spec)))
            elif key == "json_object":
                found.append(StructuredOutput(kind="json", param=param))
            elif key in ("regex", "grammar"):
                found.append(StructuredOutput(kind=key, spec=str(value), param=param))
            elif key == "choice":
                found.append(StructuredOutput(kind="choice", spec=json.dumps([str(v) for v in value]), param=param))
            elif key not in ("disable_fallback", "disable_any_whitespace"):  # no fallback; JSON is compact here
                raise ApiError(400, f"structured_outputs.{key} is not implemented by lorakit serve (it takes json, "
                                    "regex, choice, grammar, json_object, disable_additional_properties).",
                               param="structured_outputs")
        if len(found) > 1:
            raise ApiError(400, f"Give one output constraint, not {len(found)} ({', '.join(f.param for f in found)}).",
                           param=found[1].param)
        return found[0] if found else None

    def sampling(self, max_tokens: int, n: int, logprobs: int | None, bad_words_ids: list[list[int]] = (),
                 structured: StructuredOutput | None = None) -> SamplingParams:
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
            bad_words_ids=[list(ids) for ids in bad_words_ids], structured=structured)

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


def _schema(value: dict | str, param: str) -> Any:
    """A JSON Schema sent as an object or as JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"{param}: the JSON Schema is not valid JSON ({error}).", param=param) from None


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that does not say (vLLM's
    disable_additional_properties), through the keywords that hold subschemas."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalItems", "contains", "not", "if", "then", "else"):
        if key in out:
            out[key] = _closed(out[key])
    for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


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
    tools: list[dict] | None = None  # [{"type": "function", "function": {"name", "description", "parameters"}}]
    tool_choice: str | dict | None = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    functions: list[dict] | None = None  # OpenAI's older spelling of tools
    function_call: str | dict | None = None  # … and of tool_choice
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

    def tool_list(self) -> list[dict]:
        """The request's tools in OpenAI's shape (the older `functions` read as tools)."""
        tools = list(self.tools or []) + [{"type": "function", "function": f} for f in self.functions or []]
        for number, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type", "function") != "function" or not isinstance(function, dict) or \
                    not isinstance(function.get("name"), str):
                raise ApiError(400, f"tools[{number}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                    "\"parameters\": {...}}}.", param="tools")
        return tools

    def tool_names(self) -> list[str] | None:
        """The functions the reply must call: all of them ("required"), one (a named choice), or None (the model
        decides, "auto"; or no tools, "none")."""
        tools = self.tool_list()
        choice = self.tool_choice if self.tool_choice is not None else self.function_call
        if isinstance(choice, dict):
            name = (choice.get("function") or choice).get("name")
            if name not in {t["function"]["name"] for t in tools}:
                raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools.", param="tool_choice")
            return [name]
        if choice not in (None, "auto", "none", "required"):
            raise ApiError(400, f"tool_choice {choice!r}: use none, auto, required or a named function.",
                           param="tool_choice")
        if choice == "required":
            if not tools:
                raise ApiError(400, "tool_choice required needs tools.", param="tool_choice")
            return [t["function"]["name"] for t in tools]
        return None

    def tools_active(self) -> bool:
        """Whether the reply may hold tool calls (read back into `tool_calls`)."""
        choice = self.tool_choice if self.tool_choice is not None else self.function_call
        return bool(self.tool_list()) and choice != "none"

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
