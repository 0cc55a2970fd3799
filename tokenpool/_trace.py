"""OpenTelemetry traces: a span per command (both transports), per HTTP request, per
actor batch and per store batch, each batch linked to the requests it carried.

The rules it keeps:
- Off unless configured (``configure``: ``--otlp-endpoint`` or the standard
  ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``enable``: any SDK provider, as the tests do).
  Every call site checks ``_trace.on`` (one module attribute) first; while it is
  false nothing here runs and nothing of OpenTelemetry is even imported.
- Only ``opentelemetry-api`` is used on the serving path; the SDK and the OTLP
  exporter (the ``otlp`` extra) are imported by ``configure`` alone.
- A batch does not belong to one request: an actor batch is a span of its own with a
  link to each command span it applied, and a store batch one with a link to each
  actor batch it committed (OpenTelemetry's rule for batches).
- The store batch is written in the store process, which has no exporter: it reports
  when the transaction began and committed (wall-clock nanoseconds) and how many rows
  it wrote with its acknowledgement, and the server makes the span from that when the
  acknowledgement arrives, with the bytes the server sent it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._errors import InvalidArgumentError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext, Tracer

on = False
"""Whether spans are made (read by every call site before anything else)."""
_tracer: Tracer | None = None
_provider: Any = None

NAME = "tokenpool"


def enable(provider: Any) -> None:
    """Make spans with ``provider`` (an SDK ``TracerProvider``) from now on."""
    global on, _tracer, _provider
    from . import __version__

    _provider = provider
    _tracer = provider.get_tracer(NAME, __version__)
    on = True


def disable() -> None:
    """Stop making spans (what was made is flushed by its provider)."""
    global on, _tracer, _provider
    on = False
    _tracer = None
    provider, _provider = _provider, None
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


def configure(endpoint: str, service: str = NAME) -> None:
    """Export spans by OTLP over HTTP to ``endpoint`` (a collector's base URL, such as
    ``http://127.0.0.1:4318``, or its full ``.../v1/traces``), in batches from a thread
    of the SDK's. Raises ``InvalidArgumentError`` when the ``otlp`` extra is missing."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise InvalidArgumentError(
            f"--otlp-endpoint needs the OpenTelemetry SDK and OTLP exporter ({error.name}"
            " is missing): pip install 'tokenpool[otlp]'"
        ) from None
    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    enable(provider)


def tracer() -> Tracer:
    assert _tracer is not None
    return _tracer


# -- commands ----------------------------------------------------------------------


def start_commands(pool: str, requests: Sequence[Any]) -> list[Span]:
    """A span per request of one batch (children of the current span: an HTTP request's)."""
    t = tracer()
    spans = []
    for request in requests:
        span = t.start_span(f"tokenpool.{request.name}")
        if pool:
            span.set_attribute("tokenpool.pool", pool)
        user = getattr(request, "user_id", None)
        if isinstance(user, str):
            span.set_attribute("user.id", user)
        spans.append(span)
    return spans


def end_commands(spans: list[Span], results: Sequence[object]) -> None:
    """End each command's span with its result: ``ok`` or the error's code."""
    from opentelemetry.trace import Status, StatusCode

    for span, result in zip(spans, results, strict=False):
        if isinstance(result, BaseException):
            span.set_attribute("tokenpool.result", getattr(result, "code", "ERR"))
            span.set_status(Status(StatusCode.ERROR, str(result)[:200]))
        else:
            span.set_attribute("tokenpool.result", "ok")
        span.end()


def contexts(spans: list[Span]) -> list[SpanContext]:
    return [span.get_span_context() for span in spans]


# -- batches ---------------------------------------------------------------------------


def _done_span(
    name: str,
    links: list[SpanContext],
    start_ns: int,
    attributes: dict[str, Any],
    end_ns: int | None = None,
) -> SpanContext:
    """A span of work already done (from ``start_ns``), linked to the spans it served."""
    from opentelemetry.trace import Link

    span = tracer().start_span(
        name, links=[Link(c) for c in links], start_time=start_ns, attributes=attributes
    )
    span.end(end_time=end_ns)
    return span.get_span_context()


def actor_batch(
    pool: str, links: list[SpanContext], start_ns: int, requests: int, changes: int
) -> SpanContext:
    """The span of one actor batch (already done: it began at ``start_ns``), linked to
    the command spans it applied. Its context, for the store batch to link to."""
    attributes = {
        "tokenpool.pool": pool,
        "tokenpool.requests": requests,
        "tokenpool.changes": changes,
    }
    return _done_span("tokenpool.actor_batch", links, start_ns, attributes)


def store_batch(
    pool: str,
    links: list[SpanContext],
    start_ns: int,
    end_ns: int,
    rows: int,
    sent_bytes: int,
    changes: int,
) -> None:
    """The span of one store transaction (timed by the store process), linked to the
    actor batches whose changes it committed."""
    attributes = {
        "tokenpool.pool": pool,
        "tokenpool.changes": changes,
        "tokenpool.rows": rows,
        "tokenpool.bytes": sent_bytes,
        "tokenpool.commit_seconds": (end_ns - start_ns) / 1e9,
    }
    _done_span("tokenpool.store_batch", links, start_ns, attributes, end_ns)
