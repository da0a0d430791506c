"""One request's stream of events, written by the engine's thread and read by a thread or an asyncio task.

Why not a `queue.Queue` read through `run_in_executor`: each waiting reader would hold a
thread of the event loop's small default pool (min(32, cores + 4) = 6 here) for as long as
its request runs, so a server with 32 open streams would serve six. Instead an asyncio
reader attaches its loop, and every `put` wakes it with `call_soon_threadsafe` — no thread
waits on behalf of a stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

_EMPTY = object()


class TokenStream:
    def __init__(self) -> None:
        self._items: deque = deque()
        self._ready = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def put(self, event) -> None:
        """Append one event (None ends the stream); wakes a thread or an asyncio reader."""
        with self._ready:
            self._items.append(event)
            self._ready.notify_all()
            loop, wake = self._loop, self._wake
        if loop is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the reader's loop has closed: nobody is listening any more
                pass

    def empty(self) -> bool:
        return not self._items

    def get(self):
        """The next event, waiting for it (thread readers)."""
        with self._ready:
            while not self._items:
                self._ready.wait()
            return self._items.popleft()

    def pop(self):
        """The next event, or `_EMPTY` at once."""
        with self._ready:
            return self._items.popleft() if self._items else _EMPTY

    async def aget(self):
        """The next event, awaiting it (one asyncio reader per stream)."""
        if self._wake is None:
            with self._ready:
                self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while True:
            item = self.pop()
            if item is not _EMPTY:
                return item
            await self._wake.wait()
            self._wake.clear()
