"""A chat reply's tool calls in OpenAI's shape, whole or streamed.

Whole: the model's text is read for calls in its template's format (tool_calls.py); a reply with calls has
`tool_calls` (id, type, function name, arguments as a JSON string), the text outside them as `content`
(null if none) and finish_reason "tool_calls".

Streamed: text is held back while it may still be the start of a call (it begins with the format's
opening, or is a prefix of it); once it cannot be, it streams as content. At the end, held text that
reads as calls goes out as OpenAI's tool-call deltas — per call one chunk with its id, name and all its
arguments — and anything else as content; so the deltas reassemble to the non-streamed reply.
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
    """One streamed choice's text, held back while it may be a tool call."""

    def __init__(self, fmt: str):
        self.fmt, self.opening = fmt, opening(fmt)
        self.held = ""
        self.streaming = False  # the text cannot be a call any more: deltas pass through

    def feed(self, delta: str) -> str:
        """What of `delta` to stream as content now."""
        if self.streaming:
            return delta
        self.held += delta
        start = self.held.lstrip()
        if start.startswith(self.opening) or self.opening.startswith(start):
            return ""
        self.streaming = True
        out, self.held = self.held, ""
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to stream, the calls) at the end of the choice."""
        if self.streaming or not self.held:
            return "", []
        content, calls = parse(self.held, self.fmt)
        return (content, calls) if calls else (self.held, [])
