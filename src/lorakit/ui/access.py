"""Who may see the dashboard: a key (or a session cookie made from it) and a Host header we answer to.

The dashboard shows runs, the registry's audit log, server roots and a relay into the server,
so it is behind the same key as what it shows: `lorakit serve --ui` behind the server's API key,
`lorakit ui` behind `--api-key` (else its `--server-api-key`); the admin key opens it too. A
browser cannot send a bearer header when it follows a link, so /login trades the key for a
session cookie — HttpOnly, SameSite=Strict, its value an HMAC of the key (no server-side
sessions to keep; a new key ends every session). API calls may send the key as a bearer token
instead. With no key configured the dashboard is open, as the server it shows is.

DNS rebinding: a page on an attacker's domain that re-resolves to 127.0.0.1 can make the
victim's browser talk to a loopback service with the attacker's Host header. Every request's
Host must therefore name this machine (localhost, 127.0.0.1, ::1), the bound address, or a
name given with `--allowed-host`; binding a wildcard address (0.0.0.0, ::) without names
allows any host, as the dashboard is then reachable directly anyway.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs, quote

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from lorakit.http.errors import ApiError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
WILDCARDS = {"0.0.0.0", "::", ""}
PUBLIC_PATHS = ("/login", "/logout", "/health", "/static/", "/vendor/")
COOKIE = "lorakit_ui_"


def allowed_hosts(bind: str, extra: list[str]) -> set[str] | None:
    """The Host names the dashboard answers to (None: any)."""
    if bind in WILDCARDS and not extra:
        return None
    return LOOPBACK_NAMES | ({bind} if bind not in WILDCARDS else set()) | {h.lower() for h in extra}


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Access:
    def __init__(self, keys: list[str], hosts: set[str] | None):
        self.keys = [k for k in keys if k]
        self.hosts = hosts

    @staticmethod
    def token(key: str) -> str:
        return hmac.new(key.encode(), b"lorakit-ui-session-v1", hashlib.sha256).hexdigest()

    def cookie_name(self, key: str) -> str:
        return COOKIE + self.token(key)[:8]  # per key: two dashboards on one host (ports share cookies) coexist

    def proven_key(self, request: Request) -> str | None:
        """The configured key this request proves it holds (bearer token or session cookie), or None."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        for key in self.keys:
            if given and hmac.compare_digest(given.encode(), key.encode()):
                return key
            cookie = request.cookies.get(self.cookie_name(key), "")
            if cookie and hmac.compare_digest(cookie.encode(), self.token(key).encode()):
                return key
        return None

    def check(self, request: Request) -> Response | None:
        """None if the request may go on; else the refusal (400 for a foreign Host, a redirect to the login
        page for a page, 401 for an API call)."""
        if self.hosts is not None and host_name(request.headers.get("host", "")) not in self.hosts:
            return JSONResponse(ApiError(400, "Invalid Host header: this dashboard answers only to its own address "
                                              "(start it with --allowed-host NAME to add one).").body(), status_code=400)
        request.state.ui_key = self.proven_key(request)
        root = request.scope.get("root_path", "").rstrip("/")
        path = request.url.path.removeprefix(root) or "/"
        if not self.keys or request.state.ui_key is not None or path.startswith(PUBLIC_PATHS) or path == "/login":
            return None
        if path.startswith("/api/"):
            return JSONResponse(ApiError(401, "This dashboard needs its key: send it as 'Authorization: Bearer <key>' "
                                              "or sign in at /login.", code="invalid_api_key").body(), status_code=401)
        return RedirectResponse(f"{root}/login?next={quote(path)}", status_code=303)

    async def login(self, request: Request, templates) -> Response:
        """POST /login: the key from the form, in exchange for a session cookie (a wrong key: the form again)."""
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("key") or [""])[0]
        root = request.scope.get("root_path", "").rstrip("/")
        target = (form.get("next") or ["/"])[0]
        if not target.startswith("/") or target.startswith("//"):  # only a path of this dashboard
            target = "/"
        key = next((k for k in self.keys if hmac.compare_digest(given.encode(), k.encode())), None)
        if key is None:
            return login_page(request, templates, target, "Wrong key.", 401)
        reply = RedirectResponse(f"{root}{target}", status_code=303)
        reply.set_cookie(self.cookie_name(key), self.token(key), httponly=True, samesite="strict", path=root or "/",
                         secure=request.url.scheme == "https")
        return reply


def login_page(request: Request, templates, target: str = "/", error: str | None = None,
               status: int = 200) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return templates.TemplateResponse(request, "login.html", {"root": root, "next": target, "error": error},
                                      status_code=status)
