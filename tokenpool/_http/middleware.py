"""ASGI middleware: request bodies read whole within a size and a deadline, requests
in flight counted, each request timed under its route's name."""

from __future__ import annotations

import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import Receive, Scope, Send

from .._settings import host_name
from .schemas import MAX_BODY, error_response

if TYPE_CHECKING:
    from .app import HttpApp


class Outer:
    """Bounds request bodies, counts requests in flight, and times each one under its
    route's name.

    A body is read whole here, before the app sees it, within ``MAX_BODY`` bytes (413
    ``TOOLARGE``, before reading past a declared length, or as soon as a chunked body
    passes it) and within ``body_timeout`` seconds of the request's start (408, so a
    body sent a byte a second is dropped). A request with both ``Content-Length`` and
    ``Transfer-Encoding`` is refused (400) and its connection closed (RFC 9112 §6.1:
    the two framings disagree, the classic request-smuggling shape).

    ``body_timeout`` None: the HTTP server bounds the body's time itself (an HTTP
    worker's protocol does, with the same 408, sparing a cancel scope a request)."""

    def __init__(self, app: Any, owner: HttpApp, body_timeout: float | None = 30.0) -> None:
        self.app = app
        self.owner = owner
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = MAX_BODY + 1
            elif name == b"transfer-encoding":
                chunked = True
        refusal = None
        if "\ufffd" in scope["path"] and not _utf8_path(scope):
            # The server decodes a path's %XX bytes with errors="replace": %ff would name
            # the user "\ufffd" (another user's data). RESP refuses bytes that are not
            # UTF-8; so does this.
            refusal = ("INVALID", "the request's path is not valid UTF-8 once %-decoded")
        elif chunked and length is not None:
            refusal = (
                "BADFRAMING",
                "a request may not have both Content-Length and Transfer-Encoding",
            )
        elif length is not None and (length > MAX_BODY or length < 0):
            refusal = ("TOOLARGE", f"a request body may have at most {MAX_BODY} bytes")
        elif chunked or length:
            body = await self._body(receive)
            if isinstance(body, tuple):
                refusal = body
            elif body is None:
                return  # the client hung up
            else:
                receive = _replay(body, receive)
        if refusal is not None:
            # the rest of the body is unread: the connection cannot be reused
            closing = {"connection": "close"}
            await error_response(*refusal, closing)(scope, receive, send)
            return

        owner = self.owner
        owner.in_flight += 1
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            owner.in_flight -= 1
            route = scope.get("route")
            name = getattr(route, "name", None) or "other"
            owner.latencies.observe("http", name, time.perf_counter() - started)

    async def _body(self, receive: Receive) -> bytes | tuple[str, str] | None:
        """The whole body; a refusal (too large, too slow); None if the client left."""
        if self.body_timeout is None:
            return await _read_body(receive)
        with anyio.move_on_after(self.body_timeout):
            return await _read_body(receive)
        return slow_body(self.body_timeout)


def _utf8_path(scope: Scope) -> bool:
    """Whether the raw path's %-decoded bytes are UTF-8 (a U+FFFD then was sent as such)."""
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes):
        return True  # (nothing to tell by: as the server decoded it)
    try:
        urllib.parse.unquote_to_bytes(raw.split(b"?", 1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _read_body(receive: Receive) -> bytes | tuple[str, str] | None:
    parts: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > MAX_BODY:
            return ("TOOLARGE", f"a request body may have at most {MAX_BODY} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def slow_body(seconds: float) -> tuple[str, str]:
    """The refusal of a body that took longer than ``seconds`` (408)."""
    return ("SLOWBODY", f"the request body took longer than {seconds:g} s")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then what the connection says."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Any:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


MAX_HEAD = 16 * 1024
"""Bytes a request head (its target and headers) may have: 431 past it."""


class BrowserGuard:
    """What any web page can make a browser send to a local port, refused (OWASP's
    CSRF and DNS-rebinding sheets):

    - a ``Host`` the server does not answer for (DNS rebinding: a page at a name that
      resolves to 127.0.0.1 reads and writes as if same-origin): 421;
    - an unsafe method (POST, PUT, PATCH, DELETE) from another site: an ``Origin``
      that is not this server's, or ``Sec-Fetch-Site: cross-site``/``same-site``: 403;
    - an unsafe method whose body is not JSON (``Content-Type: application/json``): a
      cross-site ``<form>`` or a ``text/plain`` fetch cannot send one: 415 (a body-less
      request with no type, as the seed's ``curl -X POST .../clear``, is a program's);

    and every response refuses to be framed (``X-Frame-Options``, CSP
    ``frame-ancestors``)."""

    def __init__(self, app: Any, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.allowed = allowed_hosts  # None: any Host (--http-allowed-hosts '*')

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        hosts = 0
        for name, value in scope.get("headers", ()):
            headers.setdefault(name, value)
            size += len(name) + len(value) + 4
            hosts += name == b"host"
        host = headers.get(b"host", b"").decode("latin-1")
        refusal = None
        if size > MAX_HEAD:
            # Whatever the server parsed it with (h11's bound is on an incomplete head
            # only, httptools has none): one rule for both, after the fact but before
            # any work.
            refusal = ("HEADTOOLARGE", f"a request head may have at most {MAX_HEAD} bytes")
        elif hosts > 1:
            # RFC 9112 §3.2: more than one Host is a 400; a proxy that routes on another
            # one than this check reads would make the Host check moot.
            refusal = ("BADFRAMING", "a request may have one Host header, not several")
        elif self.allowed is not None and host_name(host) not in self.allowed:
            refusal = (
                "BADHOST",
                f"this server does not answer for the host {host[:100]!r}"
                " (--http-allowed-hosts names the ones it does)",
            )
        elif scope.get("method", "GET") in UNSAFE:
            refusal = self._unsafe(headers, host)
        if refusal is not None:
            await error_response(*refusal)(scope, receive, self._framed(send))
            return
        await self.app(scope, receive, self._framed(send))

    @staticmethod
    def _unsafe(headers: dict[bytes, bytes], host: str) -> tuple[str, str] | None:
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
        origin = headers.get(b"origin", b"").decode("latin-1")
        if site in ("cross-site", "same-site"):
            return "CROSSSITE", f"a {site} request may not change anything here"
        if origin and origin != "null":
            authority = origin.split("://", 1)[-1]
            if authority.lower() != host.lower():
                return "CROSSSITE", f"a request from {origin[:100]!r} may not change anything here"
        elif origin == "null":
            return "CROSSSITE", "a request from an opaque origin may not change anything here"
        kind = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        has_body = headers.get(b"content-length", b"0").strip() not in (b"0", b"") or (
            b"transfer-encoding" in headers
        )
        if (kind or has_body) and kind != b"application/json":
            # A <form> or a text/plain fetch always sends a type (and, from a page, an
            # Origin): only a body-less request of a program (curl -X POST) goes without.
            return (
                "NOTJSON",
                "a request body must be JSON (Content-Type: application/json), not"
                f" {kind.decode('latin-1')[:60] or 'untyped'}",
            )
        return None

    @staticmethod
    def _framed(send: Send) -> Send:
        async def framed(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *SECURITY_HEADERS]}
            await send(message)

        return framed
