"""The client library (tokenpool.connect) against real ``tokenpool serve`` processes, on
trio and on asyncio.

pytest-trio's trio mode takes every ``async def`` test as a trio test, so these tests
are plain functions that run their body with ``anyio.run(..., backend=backend)``, once
per backend. Each test starts its own server (about 0.3 s) so none sees another's
leases; the TTLs are short (under a second) because hold() is about real time passing
on a real server.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import tokenpool
from tests.chaos.server import Process, children, running, start
from tokenpool import (
    Event,
    ExistsError,
    FullError,
    InvalidArgumentError,
    Lease,
    LeaseLostError,
    NotActiveError,
    NotHolderError,
    NotKeptError,
    Page,
    PoolSettings,
    Release,
    Stats,
    TokenStatus,
    UnavailableError,
    UnknownPoolError,
    UnknownTokenError,
    UnreachableError,
    Usage,
)
from tokenpool._client import connection as connection_module


@pytest.fixture(params=["trio", "asyncio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server() -> Iterator[Process]:
    with running("--dsn", "memory", "--size", "4", "--ttl", "60") as process:
        yield process


def url(server: Process | int) -> str:
    port = server if isinstance(server, int) else server.port
    return f"tokenpool://127.0.0.1:{port}"


def run(backend: str, main: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(main, backend=backend)


def run_then_stop(backend: str, main: Callable[[], Awaitable[Any]], servers: list[Process]) -> None:
    """``run``, then stop every server still running (one test may start several)."""
    try:
        run(backend, main)
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP the processes for the block (SIGCONT after, whatever happens)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


class Proxy:
    """A TCP relay to the server whose connections the test can cut."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._streams: set[anyio.abc.SocketStream] = set()

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target) as upstream:
            self._streams |= {client, upstream}

            async def pump(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    async for data in a:
                        await b.send(data)
                with contextlib.suppress(Exception):
                    await b.aclose()

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pump, client, upstream)
                    tg.start_soon(pump, upstream, client)
            except BaseExceptionGroup:
                pass  # a stream closed under a pump: that is what cut() does

    async def cut(self) -> None:
        """Close every relayed connection, both sides."""
        streams, self._streams = self._streams, set()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()


@contextlib.asynccontextmanager
async def proxy_to(port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy._relay)
        yield proxy
        await proxy.cut()
        tg.cancel_scope.cancel()


# -- the same values and errors as open_pool --------------------------------------


def test_calls_return_the_library_values(backend: str, server: Process) -> None:
    """Each method returns what the library Pool's does: Lease, Usage, Page, TokenStatus,
    Stats, bool, int, with the same fields for the same lease."""

    async def main() -> None:
        async with tokenpool.connect(url(server)) as client:
            pool = client.pool("default")
            lease = await pool.activate("alice")
            assert isinstance(lease, Lease) and "alice" == lease.user_id
            assert lease == await pool.activate("alice")  # the same lease again
            assert lease == await pool.lease_of("alice")
            assert None is await pool.lease_of("nobody")
            assert True is await pool.validate(lease.token_id, lease.id)
            renewed = await pool.renew(lease.token_id, lease.id)
            assert (lease.id, lease.fence) == (renewed.id, renewed.fence)
            assert renewed.expires_at >= lease.expires_at
            token = await pool.token(lease.token_id)
            assert isinstance(token, TokenStatus)
            assert ("active", "alice") == (token.status, token.current_user_id)
            assert renewed.expires_at == token.expires_at
            assert 4 == len(await pool.tokens())
            cursor, page = await pool.tokens_page(0, 3)
            assert 3 == cursor and all(isinstance(t, TokenStatus) for t in page)
            usage = await pool.release(lease.token_id, "alice")
            assert isinstance(usage, Usage)
            assert (lease.id, "released", lease.fence) == (usage.id, usage.reason, usage.fence)
            history = await pool.history(lease.token_id)
            assert isinstance(history, Page) and [usage] == list(history)
            assert None is history.next_before
            assert [usage] == list(await pool.user_history("alice"))
            assert False is await pool.validate(lease.token_id, lease.id)
            await pool.activate("bob")
            assert 1 == await pool.clear()
            stats = await pool.stats()
            assert isinstance(stats, Stats)
            assert (4, 0, 2, 1, 1) == (
                stats.size,
                stats.active,
                stats.activations,
                stats.releases,
                stats.clears,
            )

    run(backend, main)


def test_errors_are_the_library_classes(backend: str, server: Process) -> None:
    """A server's -CODE reply raises the library's exception for that code."""

    async def main() -> None:
        async with tokenpool.connect(url(server)) as client:
            rejecting = await client.create("r", PoolSettings(size=1, ttl=60, when_full="reject"))
            with pytest.raises(ExistsError):
                await client.create("r", PoolSettings(size=1, ttl=60))
            assert rejecting.name == (await client.create("r", PoolSettings(), exists_ok=True)).name
            assert ["default", "r"] == sorted(await client.names())
            lease = await rejecting.activate("alice")
            with pytest.raises(FullError):
                await rejecting.activate("bob")
            with pytest.raises(NotHolderError):
                await rejecting.release(lease.token_id, "bob")
            with pytest.raises(NotHolderError):
                await rejecting.renew(lease.token_id, "0" * 8 + "-0000-0000-0000-" + "0" * 12)
            await rejecting.release(lease.token_id)
            with pytest.raises(NotActiveError):
                await rejecting.release(lease.token_id)
            with pytest.raises(UnknownTokenError):
                await rejecting.token("00000000-0000-0000-0000-000000000000")
            with pytest.raises(InvalidArgumentError):
                await rejecting.activate("a b")
            with pytest.raises(UnknownPoolError):
                await client.pool("nope").activate("alice")
            settings = await client.alter("r", size=2, when_full="wait")
            assert (2, "wait") == (settings.size, settings.when_full)
            await client.drop("r")
            with pytest.raises(UnknownPoolError):
                await rejecting.stats()

    run(backend, main)


def test_activate_waits_on_a_connection_of_its_own(backend: str, server: Process) -> None:
    """ACTIVATE ... WAIT holds its connection on the server, so it takes one to itself:
    other calls go on meanwhile, and it gets the token once released."""

    async def main() -> None:
        async with tokenpool.connect(url(server), max_connections=2) as client:
            pool = await client.create("w", PoolSettings(size=1, ttl=60, when_full="wait"))
            held = await pool.activate("alice")
            got: list[Lease] = []
            async with anyio.create_task_group() as tg:

                async def waiter() -> None:
                    got.append(await pool.activate("bob", wait=5))

                tg.start_soon(waiter)
                await anyio.sleep(0.1)
                for _ in range(5):
                    assert held == await pool.lease_of("alice")  # not stuck behind the wait
                await pool.release(held.token_id, "alice")
            assert "bob" == got[0].user_id

    run(backend, main)


# -- connections, pipelining, failures --------------------------------------------


def test_concurrent_calls_share_one_connection(backend: str) -> None:
    """With max_connections=1, 100 concurrent activations go over one socket's pipeline
    and each caller gets its own user's lease."""

    async def main(port: int) -> None:
        async with tokenpool.connect(url(port), max_connections=1) as client:
            pool = client.pool()
            got: dict[str, Lease] = {}

            async def activate(user: str) -> None:
                got[user] = await pool.activate(user)

            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(activate, f"user{i}")
            assert {f"user{i}" for i in range(100)} == set(got)
            assert all(user == lease.user_id for user, lease in got.items())
            assert 100 == len({lease.token_id for lease in got.values()})
            assert (1, 1) == (client.statistics().opened, client.statistics().open)

    with running("--dsn", "memory", "--size", "100") as process:
        anyio.run(main, process.port, backend=backend)


def test_batch_sends_many_in_one_write(backend: str, server: Process) -> None:
    """batch() answers each op in order, errors as values, as Pool.batch does."""

    async def main() -> None:
        async with tokenpool.connect(url(server), max_connections=1) as client:
            pool = client.pool()
            a, b = await pool.activate_many(["a", "b"])
            assert isinstance(a, Lease) and isinstance(b, Lease)
            results = await pool.batch(
                [
                    tokenpool.Validate(a.token_id, a.id),
                    tokenpool.Release(a.token_id, "b"),
                    tokenpool.Release(a.token_id, "a"),
                    tokenpool.GetLease("a"),
                    tokenpool.GetStats(),
                ]
            )
            assert True is results[0]
            assert isinstance(results[1], NotHolderError)
            assert isinstance(results[2], Usage) and a.id == results[2].id
            assert None is results[3]
            assert isinstance(results[4], Stats) and 1 == results[4].active

    run(backend, main)


def test_next_call_works_after_the_server_restarts(backend: str) -> None:
    """A connection the server closed is dropped; the next call opens a new one."""

    async def main(process: Process) -> None:
        async with tokenpool.connect(url(process), max_connections=1) as client:
            pool = client.pool()
            await pool.activate("alice")
            port = process.port
            process.stop()
            with pytest.raises(UnreachableError):
                await pool.activate("alice")
            again = start("--dsn", "memory", "--size", "4", port=port)
            try:
                assert "bob" == (await pool.activate("bob")).user_id
                assert None is await pool.lease_of("alice")  # a new memory server
                assert 2 == client.statistics().opened
            finally:
                again.stop()

    process = start("--dsn", "memory", "--size", "4")
    try:
        anyio.run(main, process, backend=backend)
    finally:
        if process.proc.poll() is None:
            process.stop()


def test_a_safe_call_is_retried_on_a_new_connection(backend: str, server: Process) -> None:
    """A connection cut while ACTIVATE ... WAIT waits: the activation is sent again on a
    new connection (an activation means the same twice) and still gets the token."""

    async def main() -> None:
        async with proxy_to(server.port) as proxy, tokenpool.connect(url(proxy.port)) as client:
            pool = await client.create("w", PoolSettings(size=1, ttl=60, when_full="wait"))
            held = await pool.activate("alice")
            got: list[Lease] = []
            async with anyio.create_task_group() as tg:

                async def waiter() -> None:
                    got.append(await pool.activate("bob", wait=5))

                tg.start_soon(waiter)
                await anyio.sleep(0.2)
                await proxy.cut()
                await anyio.sleep(0.2)
                await pool.release(held.token_id, "alice")
            assert "bob" == got[0].user_id
            assert 3 <= client.statistics().opened

    run(backend, main)


def test_a_release_is_not_retried(backend: str, server: Process) -> None:
    """A RELEASE whose connection breaks before its reply raises UnreachableError (it may
    have run): it is never sent twice."""

    async def main() -> None:
        async with tokenpool.connect(url(server), max_connections=1, timeout=0.5) as client:
            pool = client.pool()
            lease = await pool.activate("alice")
            with stopped([server.pid]), pytest.raises(UnreachableError):
                await pool.release(lease.token_id, "alice")
            await anyio.sleep(0.3)  # the server answers the RELEASE it read
            assert None is await pool.lease_of("alice")
            assert 1 == (await pool.stats()).releases

    run(backend, main)


def test_a_release_the_next_owner_lacks_is_not_reported_as_another_leases_end(
    backend: str, tmp_path: Path
) -> None:
    """An async store's loss window, for real: a RELEASE is answered while the store
    process is stopped, then the server and its store are SIGKILLed and the server starts
    again from the file. The history the client reads for the release's ``Usage`` lacks
    it and holds an older release of the same token: the client must raise
    ``UnreachableError`` (the release may be lost), not report the older lease's end as
    this one's."""
    args = ("--dsn", f"sqlite:///{tmp_path / 'pool.db'}", "--size", "1", "--ttl", "600")
    servers = [start(*args)]

    async def main() -> None:
        async with tokenpool.connect(url(servers[0]), max_connections=1) as client:
            pool = client.pool()
            first = await pool.activate("alice")
            ended = await pool.release(first.token_id, "alice")
            assert first.id == ended.id
            with anyio.fail_after(10):
                while (await pool.stats()).backlog:  # until the store kept alice's lease
                    await anyio.sleep(0.01)
            (store,) = children(servers[0].pid)
            os.kill(store, signal.SIGSTOP)
            second = await pool.activate("bob")
            assert first.token_id == second.token_id
            read = pool.history

            async def crash_first(
                token_id: str, limit: int = 100, before: int | None = None
            ) -> Page:
                os.kill(store, signal.SIGKILL)  # it never wrote bob's lease or its release
                servers[0].kill()
                servers.append(start(*args, port=servers[0].port))
                return await read(token_id, limit, before)

            pool.history = crash_first  # type: ignore[method-assign]
            with pytest.raises(UnreachableError, match="history lacks it"):
                await pool.release(second.token_id, "bob")
            del pool.history
            # The new server never saw bob's lease: alice's release is the newest end.
            assert [first.id] == [u.id for u in await pool.history(first.token_id)]
            with anyio.fail_after(10):  # (it vouches once the old owner's 2 s ran out)
                while True:
                    try:
                        assert None is await pool.lease_of("bob")
                        break
                    except UnavailableError:
                        await anyio.sleep(0.2)

    run_then_stop(backend, main, servers)


def test_a_release_a_memory_only_history_let_go_is_not_called_lost(backend: str) -> None:
    """No store, a history of one ended lease: two releases in one write each run, but
    the first's ``Usage`` is gone from memory by the time the client reads it. That is
    ``NotKeptError`` (the release ran), not ``UnreachableError`` ("may be lost"), which
    only an owner change behind an async store can cause."""

    async def main(port: int) -> None:
        async with tokenpool.connect(url(port)) as client:
            pool = client.pool()
            a, b = await pool.activate("a"), await pool.activate("b")
            first, second = await pool.batch([Release(a.token_id, "a"), Release(b.token_id, "b")])
            assert isinstance(first, NotKeptError), first
            assert "ran" in str(first) and "history_memory" in str(first)
            assert isinstance(second, Usage) and b.id == second.id
            stats = await pool.stats()
            assert (2, 0) == (stats.releases, stats.active)  # both ran

    with running("--dsn", "memory", "--size", "4", "--ttl", "60", "--history-memory", "1") as s:
        run(backend, lambda: main(s.port))


def test_cancelled_calls_never_get_or_give_another_reply(backend: str) -> None:
    """Callers cancelled at random moments while their replies are on the way: every
    caller that completes gets its own user's lease, over one pipelined connection."""

    async def main(port: int) -> None:
        rng = random.Random(19)
        async with tokenpool.connect(url(port), max_connections=1) as client:
            pool = client.pool()
            got: dict[str, Lease] = {}

            async def activate(user: str, patience: float) -> None:
                with anyio.move_on_after(patience):
                    got[user] = await pool.activate(user)

            async with anyio.create_task_group() as tg:
                for i in range(300):
                    tg.start_soon(activate, f"u{i}", rng.choice([0, 0.0005, 0.002, 1.0]))
            assert got and all(user == lease.user_id for user, lease in got.items())
            for i in range(300):  # the connection still pairs replies with requests
                lease = await pool.lease_of(f"u{i}")
                assert lease is None or f"u{i}" == lease.user_id
            assert 1 == client.statistics().opened

    with running("--dsn", "memory", "--size", "400") as process:
        anyio.run(main, process.port, backend=backend)


def test_concurrent_calls_share_a_connection_and_its_writes(backend: str) -> None:
    """Calls made together join one connection (under its depth) rather than opening
    idle ones, and what they queue in one turn goes out in fewer writes than calls; each
    still gets its own reply."""

    async def main(port: int) -> None:
        async with tokenpool.connect(url(port), max_connections=8) as client:
            pool = client.pool()
            got: dict[str, Lease] = {}

            async def activate(user: str) -> None:
                got[user] = await pool.activate(user)

            for _ in range(3):
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(activate, f"u{i}")
            assert 50 == len(got) and all(u == lease.user_id for u, lease in got.items())
            figures = client.statistics()
            assert 1 == figures.opened
            assert 150 <= figures.requests  # (connecting asked for nothing: no password)
            assert figures.writes < figures.requests / 5, figures

    with running("--dsn", "memory", "--size", "100") as process:
        anyio.run(main, process.port, backend=backend)


def test_a_caller_waits_while_its_connection_queue_is_full(
    backend: str, server: Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes queued on a connection are bounded: to a stopped server (the socket
    buffers fill), callers past the bound wait in line without queueing; once it
    resumes, every caller gets its replies."""
    monkeypatch.setattr(connection_module, "MAX_QUEUED", 4096)
    callers, users = 100, 1000  # 15 MB in writes of 150 KB: past the kernel's buffers

    async def main() -> None:
        async with tokenpool.connect(url(server), max_connections=1, timeout=60) as client:
            pool = client.pool()
            await pool.activate("warm")
            done: list[int] = []

            async def activate(i: int) -> None:
                names = [f"{'u' * 120}{i}.{j}" for j in range(users)]
                leases = await pool.activate_many(names)
                # in order, whole: the writes past the full buffer kept their order
                assert names == [lease.user_id for lease in leases]  # type: ignore[union-attr]
                done.append(i)

            with stopped([server.pid]):
                async with anyio.create_task_group() as tg:
                    for i in range(callers):
                        tg.start_soon(activate, i)
                    writes = -1
                    with anyio.fail_after(20):
                        while writes != (writes := client.statistics().writes) or not writes:
                            await anyio.sleep(0.5)  # until the writer is blocked
                    (connection,) = client._connections._live
                    queued = connection._queued_bytes
                    assert 0 < queued <= 4096 + 200 * users, queued
                    assert client.statistics().requests < callers * users  # the rest wait
                    assert not done
                    os.kill(server.pid, signal.SIGCONT)
            assert callers == len(done)

    run(backend, main)


def test_a_call_never_queues_behind_a_waiting_activation(backend: str) -> None:
    """A call whose reply empties a connection just as an ``ACTIVATE ... WAIT`` takes it
    to itself does not give that connection back: the next call never joins the
    blocked pipeline (where it would wait as long as the WAIT), it waits at most
    ``timeout`` for a connection of its own."""

    async def main(port: int) -> None:
        async with tokenpool.connect(url(port), max_connections=1, timeout=0.5) as client:
            pool = client.pool()
            await pool.activate("holder")
            for attempt in range(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_reads, pool, "holder")  # in flight: C is not idle
                    tg.start_soon(_waits, pool, f"waiter{attempt}")  # takes C when idle
                    await anyio.sleep(0.2)
                    started = anyio.current_time()
                    with contextlib.suppress(UnreachableError):
                        await pool.lease_of("holder")
                    assert anyio.current_time() - started < 1.5
                    tg.cancel_scope.cancel()

    with running("--dsn", "memory", "--size", "1", "--when-full", "wait") as process:
        anyio.run(main, process.port, backend=backend)


async def _reads(pool: tokenpool.RemotePool, user: str) -> None:
    with contextlib.suppress(UnreachableError):  # (no connection while the WAIT holds it)
        await pool.lease_of(user)


async def _waits(pool: tokenpool.RemotePool, user: str) -> None:
    with contextlib.suppress(UnreachableError):
        await pool.activate(user, wait=30)


def test_no_connection_within_timeout(backend: str) -> None:
    """A server that does not answer: UnreachableError after timeout, not a hang."""

    async def main() -> None:
        async with tokenpool.connect(url(1), timeout=0.5) as client:
            with pytest.raises(UnreachableError):
                await client.pool().activate("alice")

    run(backend, main)


def test_password_and_admin_user(backend: str) -> None:
    """tokenpool://:pw@ authenticates as the default user, tokenpool://admin:pw@ as the
    admin; a wrong password is the server's error."""

    async def main(port: int) -> None:
        async with tokenpool.connect(f"tokenpool://:pw@127.0.0.1:{port}") as client:
            assert "alice" == (await client.pool().activate("alice")).user_id
            with pytest.raises(tokenpool.NoPermError):
                await client.pool().clear()
        async with tokenpool.connect(f"tokenpool://admin:apw@127.0.0.1:{port}") as admin:
            assert 1 == await admin.pool().clear()
        async with tokenpool.connect(f"tokenpool://:wrong@127.0.0.1:{port}") as client:
            with pytest.raises(tokenpool.TokenPoolError) as refused:
                await client.ping()
            assert "WRONGPASS" == refused.value.code

    env = {"TOKENPOOL_PASSWORD": "pw", "TOKENPOOL_ADMIN_PASSWORD": "apw"}
    with running("--dsn", "memory", env=env) as process:
        anyio.run(main, process.port, backend=backend)


# -- watch ------------------------------------------------------------------------


def test_watch_resumes_after_a_reconnect(backend: str, server: Process) -> None:
    """Events made while the subscription's connection was cut come after the reconnect,
    each once, in order."""

    async def main() -> None:
        async with (
            tokenpool.connect(url(server)) as direct,
            proxy_to(server.port) as proxy,
            tokenpool.connect(url(proxy.port)) as client,
        ):
            pool = direct.pool()
            async with client.pool().watch() as events:
                seen: list[Event] = []
                await pool.activate("a")
                async for event in events:
                    seen.append(event)
                    break
                await proxy.cut()
                await pool.activate("b")
                await pool.activate("c")
                with anyio.fail_after(5):
                    async for event in events:
                        seen.append(event)
                        if len(seen) == 3:
                            break
            assert ["a", "b", "c"] == [e.user_id for e in seen]
            assert ["granted"] * 3 == [e.kind for e in seen]
            assert 1 <= events.reconnects

    run(backend, main)


def test_watch_ends_when_its_pool_is_dropped(backend: str, server: Process) -> None:
    """As the embedded library's: the pool's leases end (``cleared``), then the stream
    does (it waited for good: the server's subscription outlives its pool)."""

    async def main() -> None:
        async with tokenpool.connect(url(server)) as client:
            pool = await client.create("gone", PoolSettings(size=2, ttl=60))
            async with pool.watch() as events:
                await pool.activate("a")
                seen = []
                with anyio.fail_after(5):
                    async for event in events:
                        seen.append((event.kind, event.reason))
                        if len(seen) == 1:
                            await client.drop("gone")
            assert [("granted", None), ("ended", "cleared")] == seen

    run(backend, main)


def test_watch_says_gap_after_a_memory_only_server_restarts(backend: str) -> None:
    """A memory-only server killed and started again keeps no events: a watch that
    resumes there gets one ``gap`` event, then every event of the new server, none
    dropped. (Its revisions once began at 1 again, so the resume from the old revision
    was taken for a place in the new history and the new server's first events were
    dropped as already seen.)"""
    args = ("--dsn", "memory", "--size", "3", "--ttl", "60")
    servers = [start(*args)]

    async def main() -> None:
        async with tokenpool.connect(url(servers[0])) as client:
            pool = client.pool()
            async with pool.watch() as events:
                for user in ("a1", "a2"):
                    await pool.activate(user)
                with anyio.fail_after(5):
                    before = [await events.__anext__() for _ in range(2)]
                assert ["a1", "a2"] == [e.user_id for e in before]
                servers[0].kill()
                servers.append(start(*args, port=servers[0].port))
                for n in range(4):
                    await pool.activate(f"b{n}")
                after: list[Event] = []
                with anyio.fail_after(10):
                    async for event in events:
                        after.append(event)
                        if event.user_id == "b3" and event.kind == "granted":
                            break
            assert "gap" == after[0].kind
            granted = [e.user_id for e in after if e.kind == "granted"]
            assert ["b0", "b1", "b2", "b3"] == granted
            assert 1 == events.gaps

    run_then_stop(backend, main, servers)


# -- hold -------------------------------------------------------------------------


def test_hold_keeps_the_lease_past_several_ttls(backend: str) -> None:
    """A hold renews its lease in the background: valid 4 TTLs later, released on exit."""

    async def main(port: int) -> None:
        async with tokenpool.connect(url(port)) as client:
            pool = client.pool()
            async with pool.hold("alice") as held:
                first = held.lease
                await anyio.sleep(1.6)
                assert await pool.validate(held.token_id, held.id)
                assert (first.id, first.fence) == (held.id, held.fence)
                assert held.expires_at > first.expires_at and 4 <= held.renewals
                assert not held.lost
            assert None is await pool.lease_of("alice")
            assert "released" == (await pool.history(first.token_id))[0].reason

    with running("--dsn", "memory", "--ttl", "0.4") as process:
        anyio.run(main, process.port, backend=backend)


TTL = 0.6


async def _evict(server: Process, client: tokenpool.Client, held: tokenpool.Hold) -> None:
    await client.pool().activate("intruder")  # a full evict pool of one token


async def _release(server: Process, client: tokenpool.Client, held: tokenpool.Hold) -> None:
    await client.pool().release(held.token_id)


async def _clear(server: Process, client: tokenpool.Client, held: tokenpool.Hold) -> None:
    await client.pool().clear()


async def _unreachable(server: Process, client: tokenpool.Client, held: tokenpool.Hold) -> None:
    with stopped([server.pid]):
        await anyio.sleep(TTL * 2.5)


async def _refused(server: Process, client: tokenpool.Client, held: tokenpool.Hold) -> None:
    # The store process stopped and a backlog of one change: the next renewals are
    # refused UNAVAILABLE.
    with stopped(children(server.pid)):
        await anyio.sleep(TTL * 2)


WAYS: dict[str, tuple[Callable[..., Awaitable[None]], type[Exception]]] = {
    "evicted": (_evict, NotHolderError),
    "released elsewhere": (_release, NotHolderError),
    "cleared": (_clear, NotHolderError),
    "unreachable past its expiry": (_unreachable, UnreachableError),
    "refused": (_refused, UnavailableError),
}


@pytest.mark.parametrize("on_lost", ["cancel", "notify"])
@pytest.mark.parametrize("way", list(WAYS))
def test_hold_loses_the_lease(backend: str, way: str, on_lost: str, tmp_path: Path) -> None:
    """Every way a lease is lost: the block is cancelled and LeaseLostError raised (its
    cause saying how), or with on_lost="notify" `lost` is set and the block runs on."""
    lose, cause = WAYS[way]
    args = ["--size", "1", "--ttl", str(TTL)]
    if way == "refused":
        args += ["--dsn", f"sqlite:///{tmp_path}/t.db", "--max-backlog", "1"]
    else:
        args += ["--dsn", "memory"]

    async def main(server: Process) -> None:
        async with (
            tokenpool.connect(url(server), timeout=5) as client,
            tokenpool.connect(url(server), timeout=5) as other,
        ):
            pool = client.pool()
            finished = False
            started = anyio.current_time()
            if on_lost == "cancel":
                with pytest.raises(LeaseLostError) as raised:
                    async with pool.hold("alice", on_lost="cancel") as held:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(lose, server, other, held)
                            await anyio.sleep(30)
                        finished = True
                assert isinstance(raised.value.cause, cause)
                assert held.fence == raised.value.lease.fence
            else:
                async with pool.hold("alice", on_lost="notify") as held:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(lose, server, other, held)
                        with anyio.fail_after(TTL * 4):
                            error = await held.wait_lost()
                    finished = True
                assert isinstance(error, cause)
            assert held.lost and isinstance(held.lost_error, cause)
            assert finished is (on_lost == "notify")
            assert anyio.current_time() - started < TTL * 5

    with running(*args) as process:
        anyio.run(main, process, backend=backend)


def test_hold_releases_and_passes_on_the_blocks_own_error(backend: str, server: Process) -> None:
    """A block that raises: the lease is released and the block's own exception comes out,
    not wrapped in a group."""

    async def main() -> None:
        async with tokenpool.connect(url(server)) as client:
            pool = client.pool()
            with pytest.raises(KeyError):
                async with pool.hold("alice"):
                    raise KeyError("mine")
            assert None is await pool.lease_of("alice")

    run(backend, main)


def test_urls() -> None:
    """The URL forms: scheme, TLS, user, password (never shown), default port; bad ones
    are refused naming what is wrong."""
    from tokenpool._client.address import Address

    plain = Address.parse("tokenpool://h")
    assert ("h", 7379, False, None) == (plain.host, plain.port, plain.tls, plain.auth())
    admin = Address.parse("rediss://admin:p%40w@h:1")
    assert (1, True, ("AUTH", "admin", "p@w")) == (admin.port, admin.tls, admin.auth())
    assert ("AUTH", "pw") == Address.parse("redis://:pw@h").auth()
    assert "pw" not in str(Address.parse("redis://:pw@h")) + repr(Address.parse("redis://:pw@h"))
    for bad in ("http://h", "tokenpool://", "tokenpool://h:99999", "tokenpool://h/gpu"):
        with pytest.raises(InvalidArgumentError):
            Address.parse(bad)


def test_the_client_s_seconds_are_numbers_checked_where_given() -> None:
    """``timeout`` and ``renew_every`` are numbers of seconds within their ranges: a
    string was a TypeError, and an infinite renew_every never renewed."""

    async def scenario() -> None:
        for timeout in ("5", 0, math.inf, True):
            with pytest.raises(tokenpool.InvalidArgumentError, match="timeout"):
                async with tokenpool.connect("tokenpool://127.0.0.1:1", timeout=timeout):
                    pass
        async with tokenpool.connect("tokenpool://127.0.0.1:1") as client:
            for every in ("1", 0, math.inf, math.nan):
                with pytest.raises(tokenpool.InvalidArgumentError, match="renew_every"):
                    client.pool("p").hold("ann", renew_every=every)

    anyio.run(scenario, backend="trio")
