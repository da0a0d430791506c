"""A chat reply's tool calls in OpenAI's shape, whole or streamed.

Whole: the model's text is read for calls in its template's format (tool_calls.py); a reply with calls has
`tool_calls` (id, type, function name, arguments as a JSON string), the text outside them as `content`
(null if none) and finish_reason "tool_calls".

Streamed: content streams up to where a call may begin (the format's opening, or the start of it at the
end of the text so far); from an opening on, the text is held to the end (a Llama 3 call is a bare JSON
object, so there only a reply that starts like one is held). At the end, held text that reads as calls
goes out as OpenAI's tool-call deltas — per call one chunk with its id, name and all its arguments — and
anything else as content; so the deltas reassemble to the non-streamed reply.
"""

from __future__ import annotations

from lorakit.tool_calls import ToolCall, opening, parse


def message_of(text: str, fmt: str) -> tuple[dict, bool]:
    """(the assistant message, whether it calls tools) of a finished reply."""
    content, calls = parse(text, fmt)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content or None,
            "tool_calls": [call.to_openai() for call in calls]}, True


class ToolStream:
    """One streamed choice's text, held back from where a tool call may begin."""

    def __init__(self, fmt: str):
        self.fmt, self.opening = fmt, opening(fmt)
        self.held = ""
        self.calling = False  # an opening was seen: everything from it on is held to the end
        self.streaming = False  # (llama3: a call is the whole reply) the text cannot be a call any more

    def feed(self, delta: str) -> str:
        """What of `delta` to stream as content now."""
        if self.streaming:
            return delta
        self.held += delta
        if self.calling:
            return ""
        if self.fmt == "llama3":  # a bare JSON call: only at the very start
            start = self.held.lstrip()
            if start.startswith(self.opening) or self.opening.startswith(start):
                return ""
            self.streaming = True
            out, self.held = self.held, ""
            return out
        at = self.held.find(self.opening)
        self.calling = at >= 0
        cut = at if self.calling else self._partial_opening()
        cut = len(self.held[:cut].rstrip())  # whitespace before a call is not content (as parse() strips it)
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def _partial_opening(self) -> int:
        """Where a suffix of the held text that could still grow into the opening starts (else its end)."""
        for k in range(min(len(self.opening) - 1, len(self.held)), 0, -1):
            if self.held.endswith(self.opening[:k]):
                return len(self.held) - k
        return len(self.held)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to stream, the calls) at the end of the choice."""
        if self.streaming or not self.held:
            return "", []
        content, calls = parse(self.held, self.fmt)
        return (content, calls) if calls else (self.held, [])
