"""Serving the app: hypercorn's trio worker in the server's own trio run."""

from __future__ import annotations

import trio

from .._log import get_logger
from .app import HttpApp

log = get_logger("tokenpool.http")


def http1_only() -> None:
    """Serve HTTP/1.1 only. hypercorn switches a cleartext connection to HTTP/2 on an
    ``Upgrade: h2c`` or the HTTP/2 preface, with no setting to refuse it, and its
    HTTP/2 streams escape every bound here (issue 19: 5 connections of 100 unread
    streams took 2 GB). Its check is replaced by one that never switches: an Upgrade
    is answered in HTTP/1.1, as RFC 9110 §7.8 allows, and the preface is not a request
    this API serves. (TLS offers only ``http/1.1`` by ALPN, below.)"""
    from hypercorn.protocol.h11 import H11Protocol

    if not hasattr(H11Protocol, "_check_protocol"):  # pragma: no cover
        raise RuntimeError("this hypercorn does not check for h2c where tokenpool expects")

    async def serve_http1(self: H11Protocol, event: object) -> None:
        return None

    setattr(H11Protocol, "_check_protocol", serve_http1)  # noqa: B010


def contain_connection_errors() -> None:
    """A connection's own error ends that connection, logged, never the server.
    hypercorn's connection task lets anything but ``OSError`` through to its listener's
    nursery, which ends every connection and the pools' process with it (exit 1): seen
    under issue 19's attacks, when the error response to a stalled request raced the
    connection's close on the same stream (``trio.BusyResourceError``)."""
    from hypercorn.trio.tcp_server import TCPServer

    run = TCPServer.run
    if getattr(run, "contained", False):
        return

    async def contained(self: TCPServer) -> None:
        try:
            await run(self)
        except Exception as error:  # trio.Cancelled is a BaseException: it goes through
            log.warning("http_connection_failed", error=repr(error))

    contained.contained = True  # type: ignore[attr-defined]
    setattr(TCPServer, "run", contained)  # noqa: B010


async def serve_http(
    app: HttpApp,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker until ``shutdown`` is set.

    ``task_status`` gets the port once the socket is bound (an error binding it is
    raised here, before that).
    """
    import socket

    from hypercorn.config import Config
    from hypercorn.trio import serve

    s = app.settings
    family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((s.host, s.port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = s.keep_alive
    config.graceful_timeout = s.graceful
    config.h11_max_incomplete_size = 16 * 1024
    config.include_server_header = False
    config.alpn_protocols = ["http/1.1"]
    http1_only()
    contain_connection_errors()
    if s.certfile and s.keyfile:
        config.certfile = s.certfile
        config.keyfile = s.keyfile
    log.info("http_listening", host=s.host, port=port)
    task_status.started(port)
    await serve(app.asgi, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
