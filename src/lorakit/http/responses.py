"""OpenAI's response shapes: completions and chat completions, whole or as SSE chunks, with usage and
logprobs in each route's own format.

- chat: `logprobs.content` = [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}];
- completions: `logprobs` = {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}, the
  prompt's tokens first with `echo` (the first one's logprob null, as OpenAI's). As vLLM, a token's own logprob
  is always in its `top_logprobs`, beside the N most likely (so up to N + 1 entries).

A token's text is its own decoding (a token that is part of a multi-byte character shows as U+FFFD; `bytes`
has its UTF-8 bytes).
"""

from __future__ import annotations

import time
import uuid
from functools import lru_cache

from lorakit.serve.sampling import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(chat: bool, chunk: bool, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


class TokenText:
    """Token id → its text, per tokenizer, cached (logprobs name every token they list); with `as_ids`
    (vLLM's return_tokens_as_token_ids), "token_id:123", which names a token even when its text does not."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self.text = lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token: int) -> str:
        if self.as_ids or self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token])


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> dict:
    def one(token: int, logprob: float) -> dict:
        shown = text.text(token)
        return {"token": shown, "logprob": logprob, "bytes": list(shown.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(ids: list[int], entries: list[TokenLogprob | None], text: TokenText,
                        offset: int = 0) -> dict:
    """`ids` and their entries side by side (None: no logprob, the first prompt token's)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token, entry in zip(ids, entries, strict=True):
        shown = text.text(token)
        tokens.append(shown)
        offsets.append(offset)
        offset += len(shown)
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(entry.logprob)
            top.append({**{text.text(t): lp for t, lp in entry.top}, shown: entry.logprob})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def prompt_logprobs(ids: list[int], entries: list[TokenLogprob | None] | None, text: TokenText) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {"logprob", "rank",
    "decoded_token"}} for the token itself and the most likely ones (rank 1 = the most likely)."""
    shown: list[dict | None] = []
    for token, entry in zip(ids, entries or [None] * len(ids), strict=True):
        if entry is None:
            shown.append(None)
            continue
        ranked = {t: rank for rank, (t, _) in enumerate(entry.top, start=1)}
        row = {str(t): {"logprob": lp, "rank": rank, "decoded_token": text.text(t)}
               for (t, lp), rank in zip(entry.top, ranked.values(), strict=True)}
        row.setdefault(str(token), {"logprob": entry.logprob, "rank": ranked.get(token, entry.rank),
                                    "decoded_token": text.text(token)})
        shown.append(row)
    return shown
