"""`RequestHandle`: what `Engine.add_request` gives back — a request's token stream, sync or async, and its
result. Without a background loop, iterating drives the engine's steps itself (notebooks, tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from lorakit.serve.outputs import RequestOutput
from lorakit.serve.scheduler import Sequence

if TYPE_CHECKING:
    from lorakit.serve.engine import Engine


class RequestHandle:
    """Streams one request's tokens: `for token_id, text_delta in handle`, or `async for`; `result()` waits."""

    def __init__(self, engine: Engine, seq: Sequence):
        self.engine, self.seq = engine, seq
        self.choices: list[RequestHandle] = [self]  # a request's `n` choices, this one first (they share its prompt)

    @property
    def request_id(self) -> int:
        return self.seq.id

    def __iter__(self) -> Iterator[tuple[int, str]]:
        while True:
            if not self.engine.running_in_background:
                while self.seq.events.empty():
                    self.engine.step()
            event = self.seq.events.get()
            if event is None:
                return
            yield event

    async def __aiter__(self):
        while True:
            event = await self.seq.events.aget()
            if event is None:
                return
            yield event

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        return self.engine.output_of(self.seq)
