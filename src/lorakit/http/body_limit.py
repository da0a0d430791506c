"""A cap on request bodies, before they are read: 413 in OpenAI's error shape.

Without it a client could send a prompt of any size, and the server would buffer, parse and
tokenize all of it (a 10 MB prompt: ~15 s of CPU) before finding it longer than any context.
A declared Content-Length over the cap is refused at once; a chunked body is counted as it
arrives and refused the moment it passes the cap.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from lorakit.http.errors import ApiError


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return (f"The request body is over this server's limit of {self.max_bytes / 2**20:g} MiB "
                "(--max-request-mb); send a shorter prompt.")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps(ApiError(413, self._message(), code="request_too_large").body()).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # raised inside the route: the app's HTTPException handler answers
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)
