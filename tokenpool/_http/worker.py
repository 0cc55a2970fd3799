"""An HTTP worker process: the HTTP app on uvicorn (httptools, uvloop), reaching the
pools through its server's private socket (``RemoteBackend``).

Started by the server's supervisor (``supervisor.py``) as ``python -m
tokenpool._http.worker``, with the listening HTTP socket inherited and one JSON line
of settings on standard input. It lives inside its parent's lifecycle:

- it ignores SIGINT, SIGTERM and SIGHUP (the group's signals are the parent's to act on);
- when its standard input ends (the parent closes it to stop the worker, or the
  parent died and the kernel closed it) it stops: event streams end, no new
  connection is accepted, requests in flight get ``graceful`` seconds;
- every second it reports its figures to the server, whose ``/metrics`` (served by
  every worker) shows them summed, counted once under the HTTP transport.

Bounds (uvicorn's, and two of ours): ``limit_concurrency`` connections and requests
(503 past it), idle keep-alive connections closed after ``keep_alive`` seconds, a
request head of at most 16 KiB that must arrive within ``keep_alive`` seconds (431
or the connection closed; httptools has neither bound), the app's own body bounds
(64 KiB, ``--idle-timeout``), HTTP/1.1 only (uvicorn speaks no HTTP/2).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import anyio
import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .. import _trace
from .._metrics import Latencies
from .._settings import WORKER_USER
from .app import HttpApp, HttpSettings
from .middleware import MAX_HEAD, SECURITY_HEADERS, slow_body
from .remote import RemoteBackend, open_remote_backend

LINK_CONNECTIONS = 8  # to the server: requests share the busiest; waits take their own
REPORT_EVERY = 1.0


class _Coalesced:
    """A transport whose writes within one turn of the loop go out as one: uvicorn writes
    a response's head and its body separately, two system calls where one will do
    (measured: the first write alone was a third of a worker's time)."""

    __slots__ = ("_loop", "_parts", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def _flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head: at most ``MAX_HEAD``
    bytes (431), arriving within the keep-alive timeout (else the connection closes:
    a head sent a byte at a time must not hold a connection for good)."""

    _head = 0
    _in_head = True
    _head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._too_slow)
        self._unset_keepalive_if_required()  # as uvicorn's: a request is coming
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._refuse_framing(str(error))
            return
        except httptools.HttpParserUpgrade:
            pass  # answered in HTTP/1.1: no h2c (uvicorn would only log it for h2c)
        if self._in_head:
            self._head += len(data)
            if self._head > MAX_HEAD and not self.transport.is_closing():
                self._refuse()

    send_timeout = 30.0
    """Seconds a reader may leave its responses unread (the transport's buffer over its
    high-water mark) before the connection is cut: --idle-timeout, as nginx's
    send_timeout. Without it, a stream whose reader stopped kept its connection, its
    slot and its fd until shutdown."""
    _stall_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.send_timeout, self._stalled)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().resume_writing()

    def _stalled(self) -> None:
        self._stall_timer = None
        if not self.transport.is_closing():
            self.transport.abort()  # connection_lost wakes whatever waits to write

    def timeout_keep_alive_handler(self) -> None:
        # A response its reader never read stays in the buffer, and close() waits to
        # flush it, for ever: such a connection is cut instead.
        if not self.transport.is_closing() and self.transport.get_write_buffer_size():
            self.transport.abort()
            return
        super().timeout_keep_alive_handler()

    body_timeout = 30.0
    """Seconds a request's body may take once the app starts on it (--idle-timeout): 408
    and the connection closed past it, as the app's ``Outer`` answers in-process (here
    one timer on the connection instead of a cancel scope around every request). Only
    the request being answered has one: a pipelined request waits, unread, for the one
    before it, and gets its timer when its turn comes."""
    _body_timer: asyncio.TimerHandle | None = None

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not isinstance(cycle.transport, _Coalesced):
            cycle.transport = _Coalesced(cycle.transport, self.loop)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if cycle.more_body:  # its body is not all here yet
            self._stop_body_timer()
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_too_slow, cycle)
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        # The request being answered's body is all here (a pipelined request's message
        # completes only after that one's did: its timer is stopped already).
        self._stop_body_timer()
        super().on_message_complete()

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self, cycle: Any) -> None:
        self._body_timer = None
        if cycle.more_body and not cycle.response_started:
            self._answer(b"408 Request Timeout", *slow_body(self.body_timeout))

    def on_response_complete(self) -> None:
        self._stop_body_timer()  # answered (413 before reading its body, say)
        self._in_head = True
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._stall_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._stall_timer = self._body_timer = None
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self) -> None:
        message = f"a request head may have at most {MAX_HEAD} bytes"
        self._answer(b"431 Request Header Fields Too Large", "HEADTOOLARGE", message)

    def _refuse_framing(self, why: str) -> None:
        """A request httptools cannot read (its text says why): 400, and the connection
        closed, as the app's BADFRAMING (RFC 9112 §6.1: both framings, a smuggling shape)."""
        if "Content-Length" in why and "Transfer-Encoding" in why:
            message = "a request may not have both Content-Length and Transfer-Encoding"
            self._answer(b"400 Bad Request", "BADFRAMING", message)
        else:
            self._answer(b"400 Bad Request", "BADREQUEST", f"a malformed request: {why[:100]}")

    def _answer(self, status: bytes, code: str, message: str) -> None:
        if self.transport.is_closing():
            return
        error = {"error": {"code": code, "message": message}}  # as the app's (compact)
        body = json.dumps(error, ensure_ascii=False, separators=(",", ":")).encode()
        framing = b"".join(b"%b: %b\r\n" % header for header in SECURITY_HEADERS)
        self.transport.write(
            b"HTTP/1.1 %b\r\ncontent-type: application/json\r\n%b"
            b"content-length: %d\r\nconnection: close\r\n\r\n%b"
            % (status, framing, len(body), body)
        )
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn, without its signal handlers (this process ignores the group's signals),
    telling its parent on standard output once it accepts connections."""

    def capture_signals(self) -> Any:
        return contextlib.nullcontext()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        with contextlib.suppress(OSError):  # the parent stops reading once told
            os.write(1, b"ready\n")


def _figures(app: HttpApp) -> dict[str, Any]:
    return {
        "requests": app.requests,
        "errors": app.errors,
        "in_flight": app.in_flight,
        "streams": app.streams,
        "latencies": app.latencies.series("http"),
    }


async def _report(backend: RemoteBackend, app: HttpApp, worker: str) -> None:
    while True:
        await anyio.sleep(REPORT_EVERY)
        try:
            await backend.report(worker, _figures(app))
        except Exception:  # the server is starting or stopping: the next report says it
            continue


async def _serve(config: dict[str, Any], sock: socket.socket) -> None:
    s = config["settings"]
    settings = HttpSettings(
        host=s["host"],
        port=s["port"],
        max_streams=s["max_streams"],
        keep_alive=s["keep_alive"],
        graceful=s["graceful"],
        certfile=s["certfile"],
        keyfile=s["keyfile"],
        allowed_hosts=None if s["allowed_hosts"] is None else frozenset(s["allowed_hosts"]),
        idle_timeout=s["idle_timeout"],
    )
    BoundedHttpTools.send_timeout = settings.idle_timeout
    BoundedHttpTools.body_timeout = settings.idle_timeout
    app = HttpApp(settings, Latencies())
    app.outer.body_timeout = None  # BoundedHttpTools bounds it
    # The app, its routes and the modules live as long as the process: out of the
    # collector's way, full collections stay short (as the server does after recovery).
    gc.freeze()
    uv = uvicorn.Config(
        app.asgi,
        http=BoundedHttpTools,
        ws="none",  # no WebSocket upgrades: the API has none
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # nothing trusts X-Forwarded-For: budgets are per TCP peer
        date_header=True,
        timeout_keep_alive=max(1, round(settings.keep_alive)),
        timeout_graceful_shutdown=max(1, round(settings.graceful)),
        limit_concurrency=config["limit_concurrency"],
        backlog=1024,
        ssl_certfile=settings.certfile,
        ssl_keyfile=settings.keyfile,
    )
    server = _Server(uv)
    url = f"unix://{WORKER_USER}:{config['secret']}@{config['link']}"
    async with open_remote_backend(
        url,
        config["default_pool"],
        auth_delay=config["auth_delay"],
        max_connections=LINK_CONNECTIONS,
    ) as backend:
        app.attach_backend(backend)
        backend.worker = config["worker"]
        backend.figures = lambda: _figures(app)
        loop = asyncio.get_running_loop()

        def parent_said() -> None:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:  # the parent closed our stdin (stop), or died
                loop.remove_reader(0)
                app.close()
                server.should_exit = True

        loop.add_reader(0, parent_said)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_report, backend, app, config["worker"])
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()


NICENESS = 5
"""How much lower a worker's CPU priority is than its server's (``nice``): when HTTP
load and the pools want the same cores, the server (the pools, RESP, every worker's
requests) runs first. Under 300 event streams through 2 workers on 2 cores, the
server waited for a core about 1.2 s of 5 s and another client's PING up to 220 ms;
with the workers at +5, 0.2 to 0.5 s and mostly under 25 ms (CFS gives a +5 process
about a third of the weight of a +0 one: the workers still use every idle cycle)."""


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.nice(NICENESS)
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the parent went away before telling us anything
    config = json.loads(line)
    from .._cli import configure_logging

    configure_logging(config["log_level"], config["log_format"])
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    sock = socket.socket(fileno=config["fd"])
    if config.get("otlp_endpoint"):
        _trace.configure(config["otlp_endpoint"])  # the HTTP spans (the server checked it)
    import uvloop

    try:
        uvloop.run(_serve(config, sock))
    finally:
        if _trace.on:
            _trace.disable()  # exports what is left
    return 0


if __name__ == "__main__":
    sys.exit(main())
