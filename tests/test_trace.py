"""Traces (``_trace``) with the OpenTelemetry SDK's in-memory exporter: the servers run
in this process (HTTP and RESP on real sockets, a real SQLite store process), so their
spans land in the exporter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tokenpool
from tokenpool import _trace
from tokenpool._commands import CommandSettings
from tokenpool._http import HttpApp, HttpSettings
from tokenpool._http.serving import serve_http
from tokenpool._metrics import Latencies
from tokenpool._pauses import Pauses
from tokenpool._server import RespServer
from tokenpool._server.server import RespSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _trace.enable(provider)
    yield exporter
    _trace.disable()


@asynccontextmanager
async def _servers(tmp_path: Path) -> AsyncIterator[tuple[str, int, tokenpool.Pools]]:
    settings = {"default": tokenpool.PoolSettings(size=2, ttl=60)}
    async with tokenpool.open_pools(f"sqlite:///{tmp_path}/t.db", declared=settings) as pools:
        resp = RespServer(pools, RespSettings(port=0, commands=CommandSettings()))
        http = HttpApp(HttpSettings(port=0), Latencies(Pauses()))
        http.attach(resp.commands, resp)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_http, http, shutdown=stop))
            (resp_port, *_) = await nursery.start(resp.serve)
            yield f"http://127.0.0.1:{port}", resp_port, pools
            stop.set()
            resp.shutdown()


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _linked_to(span: ReadableSpan, target: ReadableSpan) -> bool:
    assert target.context is not None
    return any(link.context.span_id == target.context.span_id for link in span.links)


async def test_a_trace_of_one_http_activation_reaches_the_store_batch_that_committed_it(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    async with _servers(tmp_path) as (base, _port, pools), httpx.AsyncClient() as client:
        reply = await client.post(
            f"{base}/api/tokens/activate",
            json={"user_id": "alice"},
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        assert 200 == reply.status_code
        await pools.get("default").flush()
        await trio.sleep(0.05)  # the acknowledgement's span is made as it arrives
    finished = list(spans.get_finished_spans())
    (http,) = _named(finished, "POST /api/tokens/activate")
    assert http.context is not None and http.parent is not None
    assert TRACE_ID == format(http.context.trace_id, "032x")  # traceparent honoured
    assert PARENT_ID == format(http.parent.span_id, "016x")
    assert 200 == http.attributes["http.response.status_code"]
    (command,) = _named(finished, "tokenpool.activate")
    assert command.parent is not None and command.parent.span_id == http.context.span_id
    assert {"tokenpool.pool": "default", "user.id": "alice", "tokenpool.result": "ok"} == {
        k: command.attributes[k] for k in ("tokenpool.pool", "user.id", "tokenpool.result")
    }
    (actor,) = [s for s in _named(finished, "tokenpool.actor_batch") if _linked_to(s, command)]
    assert 1 <= actor.attributes["tokenpool.changes"]
    (store,) = [s for s in _named(finished, "tokenpool.store_batch") if _linked_to(s, actor)]
    assert 1 == store.attributes["tokenpool.rows"]  # a grant: its token's assignment row
    assert store.attributes["tokenpool.bytes"] > 0
    assert store.attributes["tokenpool.commit_seconds"] >= 0
    assert store.start_time is not None and store.end_time is not None
    assert actor.start_time is not None and actor.start_time <= store.start_time


async def test_a_resp_command_has_its_span_with_its_refusal_code(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    async with _servers(tmp_path) as (_base, port, _pools):

        def talk() -> None:
            with redis.Redis(port=port) as r:
                r.execute_command("TP.ACTIVATE", "default", "bob")
                with pytest.raises(redis.ResponseError, match=r"NOTHOLDER|NOTACTIVE|UNKNOWN"):
                    r.execute_command(
                        "TP.RELEASE", "default", "00000000-0000-4000-8000-000000000000"
                    )

        await trio.to_thread.run_sync(talk)
    finished = list(spans.get_finished_spans())
    (activate,) = _named(finished, "tokenpool.activate")
    assert "ok" == activate.attributes["tokenpool.result"]
    assert "bob" == activate.attributes["user.id"]
    (release,) = _named(finished, "tokenpool.release")
    assert release.attributes["tokenpool.result"] in {"NOTHOLDER", "NOTACTIVE", "UNKNOWN"}


async def test_nothing_is_traced_unless_configured(tmp_path: Path) -> None:
    assert not _trace.on
    async with _servers(tmp_path) as (base, _port, _pools), httpx.AsyncClient() as client:
        reply = await client.post(f"{base}/api/tokens/activate", json={"user_id": "carol"})
        assert 200 == reply.status_code


def test_an_endpoint_without_the_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_exporter(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry.exporter"):
            raise ImportError(name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_exporter)
    with pytest.raises(tokenpool.InvalidArgumentError, match=r"tokenpool\[otlp\]"):
        _trace.configure("http://127.0.0.1:4318")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_server_with_an_otlp_endpoint_exports_its_spans(workers: str) -> None:
    """A real server process, ``--otlp-endpoint`` at a collector of our own: an HTTP
    activation's spans arrive as OTLP/HTTP protobuf at ``/v1/traces`` by shutdown, the
    HTTP span from the worker that answered it (the default) or from the server."""
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from tests.test_http import serving

    received: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                received.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
        args = ("--dsn", "memory", "--otlp-endpoint", endpoint, "--http-workers", workers)
        with serving(*args) as server:
            reply = httpx.post(
                f"http://127.0.0.1:{server.http_port}/api/tokens/activate",
                json={"user_id": "dora"},
            )
            assert 200 == reply.status_code
        names = set()
        for body in received:
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    names |= {span.name for span in scope.spans}
        assert {"POST /api/tokens/activate", "tokenpool.activate"} <= names
    finally:
        collector.shutdown()
        collector.server_close()


async def test_a_report_has_its_span_too(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    async with _servers(tmp_path) as (base, _port, _pools), httpx.AsyncClient() as client:
        assert 200 == (await client.get(f"{base}/api/analytics/summary")).status_code
    (report,) = _named(list(spans.get_finished_spans()), "tokenpool.analytics")
    assert {"tokenpool.pool": "default", "tokenpool.result": "ok"} == dict(report.attributes or {})
