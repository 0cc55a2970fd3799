"""ASGI middleware: request bodies bounded before they are read, requests in flight
counted, each request timed under its route's name."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from .schemas import MAX_BODY, error_response

if TYPE_CHECKING:
    from .app import HttpApp


class Outer:
    """Bounds request bodies (413 before reading past ``MAX_BODY``), counts requests in
    flight, and times each one under its route's name."""

    def __init__(self, app: Any, owner: HttpApp) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = MAX_BODY + 1
                if length > MAX_BODY or length < 0:
                    await error_response(
                        "TOOLARGE", f"a request body may have at most {MAX_BODY} bytes"
                    )(scope, receive, send)
                    return
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:  # chunked, no length: stop reading, as if it hung up
                    return {"type": "http.disconnect"}
            return message

        owner = self.owner
        owner.in_flight += 1
        started = time.perf_counter()
        try:
            await self.app(scope, bounded, send)
        finally:
            owner.in_flight -= 1
            route = scope.get("route")
            name = getattr(route, "name", None) or "other"
            owner.latencies.observe("http", name, time.perf_counter() - started)
