"""What a request gives back: the text streamed so far, why it finished, and its timings.

`settle` turns one new token into the text to stream and, if the request is done, the finish
reason: a stop string (the text is cut before it), a stop token id, EOS, or max_tokens. Only
settled text is streamed — never a partly decoded character (U+FFFD at the end) nor the start
of a stop string that the next token may complete — so a stream's deltas add up to the final
text exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.serve.scheduler import Sequence


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "abort", "error"
    error: str | None
    queue_s: float
    ttft_s: float | None
    itl_s: list[float]
    preemptions: int = 0
    choice: int = 0  # its index among the request's `n` choices
    logprobs: list = field(default_factory=list)  # sampling.TokenLogprob per output token, when asked for
    prompt_logprobs: list | None = None  # per prompt token (the first None), when asked for
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's field)
    error_kind: str | None = None  # "adapter": its adapter could not be loaded


def output_of(seq: Sequence) -> RequestOutput:
    times = seq.token_times
    return RequestOutput(
        seq.id, seq.prompt_ids, list(seq.output_ids), seq.text, seq.finish_reason, seq.error,
        queue_s=(seq.first_scheduled - seq.arrival) if seq.first_scheduled else 0.0,
        ttft_s=(times[0] - seq.arrival) if times else None,
        itl_s=[b - a for a, b in zip(times, times[1:], strict=False)], preemptions=seq.preemptions,
        choice=seq.choice, logprobs=list(seq.logprobs), prompt_logprobs=seq.prompt_logprobs,
        stop_reason=seq.stop_reason, error_kind=seq.error_kind,
    )


def settle(seq: Sequence, token: int, tokenizer, eos_ids: set[int], complete: bool = False) -> tuple[str | None, str]:
    """(finish reason or None, text delta to stream) after `token` was appended to `seq.output_ids`; `complete`:
    its grammar is satisfied and takes nothing more (a stop, as vLLM ends a structured request)."""
    params = seq.params
    if tokenizer is not None:
        seq.text = tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens,
                                    spaces_between_special_tokens=params.spaces_between_special_tokens)
    early = len(seq.output_ids) < params.min_tokens  # nothing stops a sequence before min_tokens (vLLM)
    stop = None if early else next((s for s in params.stop if s in seq.text), None)
    if stop is not None:
        end = seq.text.index(stop) + (len(stop) if params.include_stop_str_in_output else 0)
        seq.text, seq.stop_reason = seq.text[:end], stop
    if stop is not None or (token in params.stop_token_ids and not early):
        reason = "stop"
        seq.stop_reason = stop if stop is not None else token
    elif token in eos_ids and not params.ignore_eos and not early:
        reason = "stop"
    elif complete:
        reason = "stop"
    else:
        reason = "length" if len(seq.output_ids) >= params.max_tokens else None
    settled = len(seq.text) if reason else _settled_length(seq.text, seq.params.stop)
    delta, seq.emitted = seq.text[seq.emitted:settled], max(seq.emitted, settled)
    return reason, delta


def _settled_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be streamed: no trailing U+FFFD, and no tail that starts a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end
