"""One /v1/completions or /v1/chat/completions request's life: admission, then a JSON reply or an SSE stream.

A request holds one or more prompts (completions take a list) × `n` choices (or `best_of`, of which the `n`
with the highest cumulative logprob are returned); choice j of prompt i has OpenAI's index i·n + j. Each
prompt is one engine request whose choices share the prompt's KV blocks. Streams interleave the choices'
tokens as they come; a stream the server had to cut (shutdown, a failure) ends with an error event, never
with `[DONE]`; a client gone — also before the first byte — aborts every choice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from lorakit.errors import AdapterLoadError, ContextLengthError, RequestError
from lorakit.http import responses as out
from lorakit.http.errors import ApiError
from lorakit.http.openai_protocol import ChatCompletionRequest, CompletionRequest
from lorakit.http.prompts import Prompt
from lorakit.http.tool_replies import ToolStream, message_of
from lorakit.routing import BASE_ADAPTER
from lorakit.serve.engine import RequestHandle, RequestOutput
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.structured import StructuredOutput
from lorakit.tool_calls import call_grammar, template_format

CLIENT_GONE = 499  # nginx's status for "the client closed the connection": counted, never sent


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def finish_reason(output: RequestOutput) -> str:
    return "length" if output.finish_reason == "length" else "stop"


def cut_short(output: RequestOutput) -> ApiError | None:
    """The error a choice that did not finish normally ends with: a failure (500), or an abort by the server
    (503: its shutdown timeout); None for a finished choice, or one its own client aborted."""
    if output.finish_reason == "error" and output.error_kind == "adapter":  # found, but it does not load
        return ApiError(400, output.error or "the adapter could not be loaded", param="model",
                        code="adapter_load_failed")
    if output.finish_reason == "error":
        return ApiError(500, output.error or "generation failed", type="server_error")
    if output.finish_reason == "abort" and output.error:
        return ApiError(503, output.error, type="service_unavailable", code="aborted")
    return None


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


@dataclass
class Choice:
    index: int
    prompt: Prompt
    handle: RequestHandle


class Generation:
    def __init__(self, state, http: Request, body: ChatCompletionRequest | CompletionRequest, adapter: str | None,
                 prompts: list[Prompt], chat: bool, tokenizer):
        self.state, self.http, self.body, self.adapter, self.prompts, self.chat = state, http, body, adapter, prompts, chat
        self.label, self.tokenizer = body.model, tokenizer
        prefix = "chatcmpl" if chat else "cmpl"
        self.rid = f"{prefix}-{body.request_id}" if body.request_id else out.new_id(prefix)
        self.text = out.TokenText(tokenizer, as_ids=bool(body.return_tokens_as_token_ids))
        self.status = CLIENT_GONE  # what the metrics record unless the reply completes
        self.error_type: str | None = None
        self.handles: list[RequestHandle] = []
        self.choices: list[Choice] = []
        self.best_of = getattr(body, "best_of", None) or body.n
        self.echo_only = not chat and body.max_tokens == 0  # the prompt and its logprobs, nothing generated
        # a chat reply that may call tools: the call format of its template (tool_calls.py), else None
        self.tool_format = template_format(body.chat_template or getattr(tokenizer, "chat_template", None)) \
            if chat and body.tools_active() else None

    # -- admission ----------------------------------------------------------------------------------
    async def admit(self) -> None:
        engine, state = self.state.engine, self.state
        if state.draining:
            raise ApiError(503, "The server is shutting down; retry on another replica.", type="service_unavailable")
        if engine.waiting + len(self.prompts) > state.max_queue:
            raise ApiError(429, f"Too many requests waiting ({engine.waiting} >= --max-queue {state.max_queue}); "
                                "retry shortly.", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        sampling = self._sampling()
        for prompt in self.prompts:
            requested = 1 if self.echo_only else self.body.requested_max_tokens()
            max_tokens = requested or max(engine.max_model_len - len(prompt.ids), 1)
            try:
                engine.check_length(len(prompt.ids), max_tokens)
                request = (prompt.ids, self.adapter, sampling.model_copy(update={"max_tokens": max_tokens}))
                # a grammar compiles in add_request: off the event loop, so a slow schema stalls no stream
                handle = await asyncio.to_thread(engine.add_request, *request) if sampling.structured is not None \
                    else engine.add_request(*request)
            except ContextLengthError as error:
                self._abort_all()
                raise ApiError(400, str(error), param="messages" if self.chat else "prompt",
                               code="context_length_exceeded") from None
            except AdapterLoadError as error:
                self._abort_all()
                raise ApiError(400, str(error), param="model", code="adapter_load_failed") from None
            except RequestError as error:
                self._abort_all()
                raise ApiError(400, str(error), param=error.param or ("messages" if self.chat else "prompt")) from None
            self.handles.append(handle)
            state.inflight.add(handle)
            base = len(self.choices)
            self.choices += [Choice(base + j, prompt, h) for j, h in enumerate(handle.choices)]

    def _sampling(self) -> SamplingParams:
        wanted = self.body.logprobs_wanted()
        logprobs = wanted if wanted is not None or self.best_of == self.body.n else 0  # best_of ranks by logprob
        try:
            return self.body.sampling(1, self.best_of, logprobs, self._bad_words_ids(), self._structured())
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ()))
            raise ApiError(400, f"{field}: {first.get('msg')}", param=field or None) from None

    def _structured(self) -> StructuredOutput | None:
        """The grammar the reply must match: response_format / vLLM's fields, or a call of the tools that
        tool_choice "required" or a named function asks for (so the reply always parses as a call)."""
        structured = self.body.structured()
        names = self.body.tool_names() if self.chat else None
        if not names:
            return structured
        if structured is not None:
            raise ApiError(400, f"tool_choice {self.body.tool_choice!r} and {structured.param} cannot both constrain a "
                                "reply; drop one.", param="tool_choice")
        grammar = call_grammar(self.body.tool_list(), names, self.tool_format, self.body.parallel_tool_calls is not False)
        return StructuredOutput(kind="lark_raw", spec=grammar, param="tool_choice")

    def _bad_words_ids(self) -> list[list[int]]:
        """vLLM's `bad_words` as token sequences: each word as it starts a text and, after a space, mid-text."""
        if not self.body.bad_words:
            return []
        if self.tokenizer is None:
            raise ApiError(400, "bad_words needs a tokenizer; this server has none.", param="bad_words")
        sequences: list[list[int]] = []
        for word in self.body.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def _abort_all(self) -> None:
        for handle in self.handles:
            if not all(c.seq.finished for c in handle.choices):
                self.state.engine.abort(handle)

    def _close(self) -> None:
        self._abort_all()
        for handle in self.handles:
            self.state.inflight.discard(handle)
        outputs = [self.state.engine.output_of(c.handle.seq) for c in self.choices]
        self.state.metrics.request_done(self.label, self.status, outputs, self.version, self.error_type)
        self.http.state.counted = True

    @property
    def version(self) -> str:
        """The adapter version the request ran on (empty for the base model)."""
        version = self.choices[0].handle.seq.version if self.choices else BASE_ADAPTER
        return "" if version == BASE_ADAPTER else version

    async def reply(self) -> Response:
        await self.admit()
        if self.body.stream:
            try:
                await self._adapter_bound()
            except BaseException:
                self._close()
                raise
            return _RequestStream(self._stream(), on_close=self._close)
        try:
            return await self._collect()
        finally:
            self._close()

    async def _adapter_bound(self) -> None:
        """Before a stream's 200 goes out: wait until the adapter is on the model, so an adapter that fails to
        load is a 400 like any other bad request, not an error event inside a stream that began fine."""
        seqs = [h.seq for h in self.handles]
        while self.adapter is not None and any(s.version == BASE_ADAPTER and not s.finished for s in seqs):
            await asyncio.sleep(0.01)
            if await self.http.is_disconnected():
                return  # the stream ends at once, and closing it aborts the request
        failed = next((cut_short(self.state.engine.output_of(s)) for s in seqs if s.error_kind), None)
        if failed is not None:
            self.status, self.error_type = failed.status, failed.type
            raise failed

    # -- a whole reply ---------------------------------------------------------------------------------
    async def _collect(self) -> Response:
        async def drain(handle: RequestHandle):
            async for _ in handle:
                pass

        task = asyncio.ensure_future(asyncio.gather(*(drain(c.handle) for c in self.choices)))
        while not (await asyncio.wait({task}, timeout=0.25))[0]:
            if await self.http.is_disconnected():
                self._abort_all()
        await task
        outputs = [self.state.engine.output_of(c.handle.seq) for c in self.choices]
        error = next((e for e in map(cut_short, outputs) if e is not None), None)
        if error is not None:
            self.status, self.error_type = error.status, error.type
            raise error
        if any(o.finish_reason == "abort" for o in outputs):  # its client went away: nobody reads this
            return JSONResponse({}, status_code=CLIENT_GONE)
        self.status = 200
        picked = self._best(outputs)
        choices = [self._choice(i, choice, output) for i, (choice, output) in enumerate(picked)]
        body = out.envelope(self.chat, False, self.rid, self.label, choices, self._usage(outputs))
        if self.chat:  # vLLM puts a chat reply's prompt-level extras beside its choices
            body.update(self._prompt_extras(self.choices[0], outputs[0]))
        return JSONResponse(body)

    def _best(self, outputs: list[RequestOutput]) -> list[tuple[Choice, RequestOutput]]:
        """With best_of above n: per prompt, the n choices of highest cumulative logprob (OpenAI's rule)."""
        pairs = list(zip(self.choices, outputs, strict=True))
        if self.best_of == self.body.n:
            return pairs
        picked = []
        for start in range(0, len(pairs), self.best_of):
            group = pairs[start:start + self.best_of]
            picked += sorted(group, key=lambda p: -sum(e.logprob for e in p[1].logprobs))[: self.body.n]
        return picked

    def _choice(self, index: int, choice: Choice, output: RequestOutput) -> dict:
        logprobs = self._logprobs(choice, output.token_ids, output.logprobs, output.prompt_logprobs, first=True)
        extra = {"stop_reason": output.stop_reason}
        if self.body.return_token_ids:
            extra["token_ids"] = [] if self.echo_only else output.token_ids
        if self.chat:
            message, called = {"role": "assistant", "content": self.body.echoed() + output.text}, False
            if self.tool_format is not None:
                message, called = message_of(output.text, self.tool_format)
            return {"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": "tool_calls" if called else finish_reason(output), **extra}
        text = (choice.prompt.text if self.body.echo else "") + ("" if self.echo_only else output.text)
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": "length" if self.echo_only else finish_reason(output), **extra,
                **self._prompt_extras(choice, output)}

    def _prompt_extras(self, choice: Choice, output: RequestOutput) -> dict:
        """vLLM's `prompt_logprobs` (when asked for) and `prompt_token_ids` (with return_token_ids)."""
        extras = {}
        if self.body.prompt_logprobs is not None:
            extras["prompt_logprobs"] = out.prompt_logprobs(choice.prompt.ids, output.prompt_logprobs, self.text)
        if self.body.return_token_ids:
            extras["prompt_token_ids"] = choice.prompt.ids
        return extras

    def _logprobs(self, choice: Choice, ids: list[int], entries: list, prompt_entries: list | None,
                  first: bool) -> dict | None:
        """The logprobs of `ids` (some of a choice's tokens) in the route's format; `first`: this part starts the
        choice, so completions' `echo` puts the prompt's tokens in front."""
        if self.body.logprobs_wanted() is None:
            return None
        if self.chat:
            return out.chat_logprobs(entries, self.text)
        if self.echo_only:
            ids, entries = [], []
        if first and self.body.echo:
            prompt = choice.prompt.ids
            ids, entries = [*prompt, *ids], [*(prompt_entries or [None] * len(prompt))[: len(prompt)], *entries]
        return out.completion_logprobs(ids, entries, self.text)

    def _usage(self, outputs: list[RequestOutput]) -> dict:
        generated = 0 if self.echo_only else sum(len(o.token_ids) for o in outputs)
        return out.usage(sum(len(p.ids) for p in self.prompts), generated)

    # -- a stream -----------------------------------------------------------------------------------------
    async def _stream(self) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for token, delta in choice.handle:
                await queue.put((choice, token, delta))
            await queue.put((choice, None, None))

        tasks = [asyncio.ensure_future(pump(choice)) for choice in self.choices]
        counts = [0] * len(self.choices)
        held = [ToolStream(self.tool_format) if self.tool_format else None for _ in self.choices]
        opened = [False] * len(self.choices)
        try:
            pending = len(self.choices)
            while pending:
                choice, token, delta = await queue.get()
                if not opened[choice.index]:  # after the prompt is computed: an echo's logprobs exist by now
                    opened[choice.index] = True
                    opening = self._opening(choice, counts)
                    if opening is not None:
                        yield sse(opening)
                if token is None:
                    pending -= 1
                    output = self.state.engine.output_of(choice.handle.seq)
                    error = cut_short(output)
                    if error is not None:  # an error event, and no [DONE]: a cut stream must never look complete
                        self.status, self.error_type = error.status, error.type
                        yield sse(error.body())
                        return
                    if output.finish_reason == "abort":
                        return
                    reason = finish_reason(output)
                    if held[choice.index] is not None:  # what was held back: content, or the calls
                        for part in self._tool_parts(choice, held[choice.index]):
                            yield sse(self._chunk([part], counts))
                            reason = "tool_calls" if "tool_calls" in part["delta"] else reason
                    closing = {"index": choice.index, ("delta" if self.chat else "text"): {} if self.chat else "",
                               "logprobs": None, "finish_reason": reason, "stop_reason": output.stop_reason}
                    yield sse(self._chunk([closing], counts))
                    continue
                counts[choice.index] += 1
                if self.echo_only:
                    continue
                entries = choice.handle.seq.logprobs[counts[choice.index] - 1:counts[choice.index]]
                if held[choice.index] is not None:
                    delta = held[choice.index].feed(delta)
                if delta or self.body.logprobs_wanted() is not None:
                    body = {"content": delta} if self.chat else delta
                    part = {"index": choice.index, ("delta" if self.chat else "text"): body,
                            "logprobs": self._logprobs(choice, [token], entries, None, first=False),
                            "finish_reason": None}
                    if self.body.return_token_ids:
                        part["token_ids"] = [token]
                    yield sse(self._chunk([part], counts))
            self.status = 200
            if self.body.include_usage:
                yield sse(out.envelope(self.chat, True, self.rid, self.label, [], self._stream_usage(counts)))
            yield sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()

    @staticmethod
    def _tool_parts(choice: Choice, stream: ToolStream) -> list[dict]:
        """The end of a streamed choice whose text was held back: its content, then one delta per tool call."""
        content, calls = stream.finish()
        parts = [{"index": choice.index, "delta": {"content": content}, "logprobs": None, "finish_reason": None}] \
            if content else []
        return parts + [{"index": choice.index, "delta": {"tool_calls": [call.to_openai(index=k)]}, "logprobs": None,
                         "finish_reason": None} for k, call in enumerate(calls)]

    def _opening(self, choice: Choice, counts: list[int]) -> dict | None:
        """The first chunk of a choice, once its prompt is computed: the assistant's role (chat; with `echo`, the
        echoed text), or the echoed prompt and its logprobs (completions); with vLLM's prompt extras."""
        extras = self._prompt_extras(choice, self.state.engine.output_of(choice.handle.seq))
        if self.chat:
            part = {"index": choice.index, "delta": {"role": "assistant", "content": self.body.echoed()},
                    "logprobs": None, "finish_reason": None}
            return {**self._chunk([part], counts), **extras}
        if not self.body.echo and not extras:
            return None
        logprobs = None
        if self.body.echo and self.body.logprobs_wanted() is not None:
            prompt = choice.prompt.ids
            entries = (choice.handle.seq.prompt_logprobs or [None] * len(prompt))[: len(prompt)]
            logprobs = out.completion_logprobs(prompt, entries + [None] * (len(prompt) - len(entries)), self.text)
        part = {"index": choice.index, "text": choice.prompt.text if self.body.echo else "", "logprobs": logprobs,
                "finish_reason": None, **extras}
        return self._chunk([part], counts)

    def _chunk(self, choices: list[dict], counts: list[int]) -> dict:
        usage = self._stream_usage(counts) if self.body.continuous_usage else None
        return out.envelope(self.chat, True, self.rid, self.label, choices, usage)

    def _stream_usage(self, counts: list[int]) -> dict:
        return out.usage(sum(len(p.ids) for p in self.prompts), 0 if self.echo_only else sum(counts))
