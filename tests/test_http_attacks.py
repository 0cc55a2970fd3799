"""Issue 19's HTTP attacks against a real server: the bound on listings nobody reads, and
a short run of every attack (``tests/chaos/http_hostile.py``; ``make chaos`` runs them at
the sizes issue 19 measured). The real-browser half of the cross-site and rebinding
attacks is ``tests/test_browser_safety.py``."""

from __future__ import annotations

import contextlib
import time

import attrs
import httpx
import trio

from tests.chaos import http_hostile
from tests.test_http import serving


def test_listings_nobody_reads_take_a_bounded_memory() -> None:
    """200 clients ask ``GET /api/tokens`` of a pool of 10,000 held tokens (1.5 MB each)
    and never read: the server fetches, builds and holds at most ``LARGE_REPLIES`` of them
    at once (before that bound, the same attack grew it by 340 MB), and lists again once
    they go."""
    args = ("--dsn", "memory", "--size", "10000", "--ttl", "3600", "--idle-timeout", "2")
    args += ("--http-workers", "0")  # in-process; through workers: the chaos run's rows
    with serving(*args) as server:
        trio.run(http_hostile.fill, server.port, 10_000)
        memory = http_hostile.TreeMemory(server.pid)
        time.sleep(1)
        before = memory.samples[-1][1]
        sizes = attrs.evolve(http_hostile.Sizes.short(), listings=200)
        trio.run(http_hostile.unread_listings, server.http_port or 0, sizes, 4.0)
        time.sleep(3)  # the listings still queued are answered, to closed connections
        memory.stop()
        grew = (memory.peak(0, time.time()) - before) / 2**20
        assert grew < 100, f"the server grew {grew:.0f} MB"  # issue 19's goal
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
            listing = c.get("/api/tokens")
        assert 200 == listing.status_code
        assert 10_000 == len(listing.json()["data"])


# What the short run must never show, on any machine. The 50 ms PING and the exit within
# --shutdown-timeout are issue 19's goals, judged by ``make chaos`` (the README's rows): on
# the suite's shared 2 cores, where the server waits for a core longer than it runs while
# the attacker's process is busy, a short run is held to a PING answered within 2 s (a new
# client refused, or one left waiting, as issue 19 saw, fails it) and to the
# shutdown-waiters row's exit within --shutdown-timeout + 2 s.
NEVER = {"crash", "state changed", "cross-site", "stream slots", "slow body", "refused"}
NEVER |= {"unclean exit", "memory"}


def test_every_http_attack_in_a_short_run(pg_server: str) -> None:
    """Every attack of issue 19 (smaller), one after another then together with SIGTERM,
    against in-process HTTP (`--http-workers 0`) on PostgreSQL: the server stays up, grows at most
    100 MB, changes nothing, and exits within --shutdown-timeout."""
    summary, rows = http_hostile.attacks_run(dsn=pg_server, sizes=http_hostile.Sizes.short())
    assert [] == [a.detail for r in rows for a in r.anomalies if a.kind in NEVER]
    assert [r.attack for r in rows] == [
        *("h2c", "unread listings", "stalled bodies", "trickled bodies", "stuck streams"),
        *("cross-site and rebinding", "all together, then SIGTERM"),
    ]
    assert summary.worst_ping_ms is not None and summary.worst_ping_ms < 2_000
    assert rows[-1].exit_s is not None and rows[-1].exit_s < 3 + 2
    assert all(r.up and not r.state_changed for r in rows)


async def test_one_connections_error_never_reaches_the_server() -> None:
    """hypercorn's connection task, with the server's patch, on a real socket: the error
    response to a malformed request finds another task sending on the stream (the race
    that ended the whole server under the attacks: ``trio.BusyResourceError``). The
    connection ends; nothing is raised to the listener, which would end every
    connection and the pools' process."""
    from hypercorn.config import Config
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.utils import wrap_app

    from tokenpool._http.serving import contain_connection_errors

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("no request reaches the app")

    contain_connection_errors()
    ours, theirs = trio.socket.socketpair()
    server_side, client = trio.SocketStream(ours), trio.SocketStream(theirs)
    connection = TCPServer(
        wrap_app(app, 2**16, None), Config(), WorkerContext(None), {}, server_side
    )

    async def blocked_sender() -> None:  # another task sending, blocked: nobody reads
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await server_side.send_all(b"x" * 20_000_000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.sleep(0.1)
        await client.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        with trio.fail_after(10):
            await connection.run()  # raised BusyResourceError before the patch
        nursery.cancel_scope.cancel()
    await client.aclose()
