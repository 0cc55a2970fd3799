"""HTTP requests as server spans (``_trace``): the caller's W3C ``traceparent`` is
continued; nothing runs while tracing is off but one check per request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _trace

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


class TracedApp:
    """ASGI: a server span per HTTP request, continuing the caller's trace when it sends
    a W3C ``traceparent``; named ``METHOD /route/{template}`` once routed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _trace.on or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode, use_span

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        span = _trace.tracer().start_span(
            method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"][:200]},
        )

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            await send(message)

        try:
            with use_span(span, end_on_exit=False):
                await self.app(scope, receive, sending)
        finally:
            template = route_template(scope)
            if template:
                span.update_name(f"{method} {template}")
                span.set_attribute("http.route", template)
            span.end()


def route_template(scope: Scope) -> str | None:
    """The matched route's template with its mount's (``/api/pools/{pool}/tokens/activate``:
    a pool's name never makes a span name of its own). FastAPI's included routers give
    the route's template without the prefix they were mounted at."""
    template = getattr(scope.get("route"), "path_format", None)
    if not template:
        return None
    path = scope["path"]
    if path.startswith("/api/pools/") and not template.startswith("/pools"):
        return f"/api/pools/{{pool}}{template}"
    if path.startswith("/api/"):
        return f"/api{template}"
    return str(template)
