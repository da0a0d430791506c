"""OpenAI's error body, {"error": {"message", "type", "param", "code"}}, as one exception every route raises
(so the `openai` client raises its typed exceptions), and the bearer-key check behind the keys."""

from __future__ import annotations

import hmac


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_key(request, expected: str | None, what: str) -> None:
    """401 unless the request's bearer token equals `expected` (constant-time)."""
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, f"Missing or wrong {what} key: send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
