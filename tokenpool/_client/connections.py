"""A bounded pool of RESP connections, shared by pipelining.

- At most ``max_connections`` connections, counting those being opened.
- A request joins the busiest connection whose pipeline holds fewer than
  ``PIPELINE_DEPTH`` requests, else opens another while under the bound, else joins
  the least loaded: concurrent callers share few sockets, and the requests queued in
  one turn of the loop go out in one write (``connection.py``), which the server reads
  in one receive and runs as one batch. Spreading them over idle connections instead
  cost an HTTP worker's server about three times the CPU per request (measured with
  8 connections against 1). ``max_connections=1`` serves any number of concurrent
  callers over one socket.
- A request that blocks its connection on the server (``ACTIVATE ... WAIT``, which the
  server answers before reading what follows it) takes a connection to itself.
- A caller waits at most ``timeout`` for a connection (connecting included) and, for a
  request that does not block, at most ``timeout`` more for its reply; past that the
  connection is broken (the server is stalled or gone) and ``UnreachableError`` raised.
- A broken connection is dropped at once and replaced on demand.

Cluster mode: a request for a pool another node owns is answered ``MOVED <slot>
<host>:<port>`` before any work, so it is sent again to that node (its own bounded
connections, opened on demand), and the pool's node is remembered; ``TRYAGAIN`` and
``CLUSTERDOWN`` (a slot being taken over) are retried with a growing pause within
``timeout``, ``CLUSTERDOWN`` and a node that cannot be reached (for a ``safe``
request) going back to the first server, which knows the new owner once it is chosen.

Retries: a request that failed before it was written is always tried once more on
another connection; one that failed after it was written is tried again only when it
is ``safe`` (means the same if the server already applied it: reads, ``ACTIVATE``,
which gives a user the lease it holds, and ``RENEW``). Never ``RELEASE``, ``CLEAR``,
or the ``POOL`` changes: their outcome is then unknown, and the caller is told so.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import attrs
import hiredis

from .._errors import (
    ClusterDownError,
    MovedError,
    TokenPoolError,
    TryAgainError,
    UnreachableError,
)
from .._resp import encode_command
from .address import Address, host_port
from .connection import Connection, Slot, Tally, UnsentError, native
from .replies import error_of


class Connections:
    """The client's connections to one server."""

    def __init__(
        self,
        address: Address,
        task_group: anyio.abc.TaskGroup,
        *,
        max_connections: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.max_connections = max_connections
        self._tg = task_group
        self._ssl = ssl_context
        self._live: list[Connection] = []
        self._nodes: dict[tuple[str, int], Connections] = {}  # cluster: other nodes
        self._routes: dict[str, tuple[str, int]] = {}  # cluster: pool -> its node
        self._opening = 0
        self._changed = anyio.Event()
        self.opened = 0  # connections made over the client's life (a figure for tests)
        self.tally = Tally()  # their writes and requests
        self._now = native()[1]
        self.closed = False  # aclose() was called: no connection is opened again

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def open_stream(self) -> anyio.abc.ByteStream:
        """A new stream to the server, authenticated (a subscription's, or a connection's).
        Raises ``UnreachableError``, or the server's error for a refused ``AUTH``."""
        address = self.address
        try:
            with anyio.fail_after(self.timeout):
                stream: anyio.abc.ByteStream
                if address.unix is not None:
                    stream = await anyio.connect_unix(address.unix)
                elif address.tls:
                    stream = await anyio.connect_tcp(
                        address.host,
                        address.port,
                        tls=True,
                        ssl_context=self._ssl,
                        tls_standard_compatible=False,
                    )
                else:
                    stream = await anyio.connect_tcp(address.host, address.port)
                auth = address.auth()
                if auth is None:
                    return stream
                try:
                    await stream.send(encode_command(*auth))
                    reader = hiredis.Reader(encoding="utf-8", errors="strict")
                    while (reply := reader.gets()) is False:
                        reader.feed(await stream.receive())
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                    raise
        except (
            OSError,
            TimeoutError,
            ssl.SSLError,
            anyio.EndOfStream,
            anyio.BrokenResourceError,  # reset while greeting (the server just died)
        ) as error:
            reason = str(error) or type(error).__name__
            raise UnreachableError(f"cannot connect to {address}: {reason}") from None
        if isinstance(reply, Exception):
            await stream.aclose()
            raise error_of(reply)
        return stream

    async def open_connection(self) -> Connection:
        """A new connection, authenticated, its reader running in the client's task group."""
        if self.closed:  # (its task group may be gone: a retry racing a shutdown)
            raise UnreachableError(f"{self.address}: closed")
        stream = await self.open_stream()
        if self.closed:
            await stream.aclose()
            raise UnreachableError(f"{self.address}: closed")
        raw = None if self.address.tls else stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if not isinstance(raw, socket.socket):  # (asyncio's TCP: a transport's, not ours)
            raw = None
        connection = Connection(stream, self.address, self.timeout, self._notify, self.tally, raw)
        self._tg.start_soon(connection.read_replies)
        self._tg.start_soon(connection.write_requests)
        self._tg.start_soon(connection.watch_replies)
        self.opened += 1
        return connection

    async def _take(self, exclusive: bool) -> Connection:
        """A connection for one request (``exclusive``: to itself until ``give_back``)."""
        while True:
            self._live = [c for c in self._live if c.broken is None]
            chosen = self._choose(exclusive)
            if chosen is not None:
                return chosen
            under = len(self._live) + self._opening < self.max_connections
            if under and (exclusive or not self._opening):
                # (one opening serves the callers that would share it: they wait for it)
                self._opening += 1
                try:
                    connection = await self.open_connection()
                finally:
                    self._opening -= 1
                    self._notify()
                connection.exclusive = exclusive
                self._live.append(connection)
                return connection
            await self._changed.wait()

    def _take_now(self, exclusive: bool) -> Connection | None:
        """``_take`` when it need not wait or connect: the common case, without a
        timeout's cancel scope."""
        if any(c.broken is not None for c in self._live):
            return None
        return self._choose(exclusive)

    def _choose(self, exclusive: bool) -> Connection | None:
        """A live connection for the request by the rules above, or None (open one if
        under the bound, else wait)."""
        free = [c for c in self._live if not c.exclusive]
        if exclusive:
            best = next((c for c in free if c.load == 0), None)
            if best is not None:
                best.exclusive = True
            return best
        shallow = [c for c in free if c.load < PIPELINE_DEPTH]
        best = max(shallow, key=_load, default=None)
        if best is None and len(self._live) + self._opening >= self.max_connections:
            best = min(free, key=_load, default=None)
        return best

    def give_back(self, connection: Connection) -> None:
        if connection.exclusive:
            connection.exclusive = False
            self._notify()

    async def call(
        self,
        commands: Sequence[Sequence[str]],
        *,
        safe: bool,
        blocks: float | None = None,
    ) -> list[Any]:
        """Send ``commands`` in one write and return their replies, in order (an error
        reply as the library's exception, not raised: the caller decides).

        ``blocks``: the seconds the server may hold the connection before answering
        (``ACTIVATE ... WAIT``): the request takes a connection to itself and waits that
        much longer for its reply. Raises ``UnreachableError`` (after one retry where
        allowed: see the module's rules). In a cluster, ``MOVED`` is followed and a slot
        being taken over waited for (see the module's rules).
        """
        pool = _pool_of(commands)
        route = self._routes.get(pool) if pool is not None else None
        target = self if route is None else self._node(route)
        now = self._now
        deadline = now() + self.timeout
        pause = 0.05
        redirects = 0
        while True:
            try:
                replies = await target._call(commands, safe=safe, blocks=blocks)
            except UnreachableError:
                if target is not self and pool is not None:
                    # that node is gone or stalled: the first server learns who is next
                    # (forgotten even when this call gives up, so the next asks there)
                    self.forget(pool)
                if target is self or not safe or now() + pause > deadline:
                    raise
                target = self
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.5)
                redirects = 0
                continue
            moved = next((r for r in replies if isinstance(r, MovedError)), None)
            if moved is not None and all(isinstance(r, MovedError) for r in replies):
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise UnreachableError(
                        f"more than {MAX_REDIRECTS} MOVED in a row for pool {pool!r}"
                    )
                target = (
                    self.moved(pool, moved) if pool is not None else self._node(_address_of(moved))
                )
                continue
            if (
                any(isinstance(r, TryAgainError | ClusterDownError) for r in replies)
                and now() + pause < deadline
            ):
                if pool is not None and any(isinstance(r, ClusterDownError) for r in replies):
                    self._routes.pop(pool, None)
                    target = self
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.5)
                redirects = 0
                continue
            return replies

    def node_of(self, pool: str) -> Connections:
        """The connections to ``pool``'s node as last learnt (this server's if none)."""
        route = self._routes.get(pool)
        return self if route is None else self._node(route)

    def moved(self, pool: str, moved: MovedError) -> Connections:
        """Follow ``MOVED``: remember the named node as ``pool``'s, and return it."""
        node = self._routes[pool] = _address_of(moved)
        return self._node(node)

    def forget(self, pool: str) -> None:
        """``pool``'s node is gone or unsure: ask the first server (it learns who is next)."""
        self._routes.pop(pool, None)

    def known(self) -> list[Connections]:
        """This server, then every other node met so far (by ``MOVED``): where to ask
        for a pool's owner when the first server cannot be reached."""
        return [self, *self._nodes.values()]

    def _node(self, node: tuple[str, int]) -> Connections:
        """The connections to another node of the cluster (made on first use)."""
        if node == (self.address.host, self.address.port):
            return self
        found = self._nodes.get(node)
        if found is None:
            found = self._nodes[node] = Connections(
                attrs.evolve(self.address, host=node[0], port=node[1]),
                self._tg,
                max_connections=self.max_connections,
                timeout=self.timeout,
                ssl_context=self._ssl,
            )
        return found

    async def _call(
        self,
        commands: Sequence[Sequence[str]],
        *,
        safe: bool,
        blocks: float | None = None,
    ) -> list[Any]:
        for attempt in (0, 1):
            try:
                return await self._call_once(commands, blocks)
            except _NotSent as failure:
                if attempt:
                    raise failure.error from None
            except UnreachableError:
                if attempt or not safe:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_once(
        self, commands: Sequence[Sequence[str]], blocks: float | None
    ) -> list[Any]:
        try:
            connection = self._take_now(exclusive=blocks is not None)
            if connection is None:
                with anyio.fail_after(self.timeout):
                    connection = await self._take(exclusive=blocks is not None)
        except TimeoutError:
            raise _NotSent(
                UnreachableError(
                    f"no connection to {self.address} within {self.timeout:g} s"
                    f" ({self.max_connections} in use or being opened)"
                )
            ) from None
        except UnreachableError as error:
            raise _NotSent(error) from None
        try:
            try:
                slots = await connection.send(commands, self.timeout + (blocks or 0.0))
            except UnreachableError as error:
                raise _NotSent(error) from None
            try:
                return [await _reply(slot) for slot in slots]
            except UnsentError as error:  # broken before its bytes were written
                raise _NotSent(error) from None
            except anyio.get_cancelled_exc_class():
                if blocks is not None:
                    # a caller that gives up a wait (ACTIVATE ... WAIT) hangs up: the server
                    # then gives the wait up too, and never grants what nobody awaits
                    connection.fail("the caller gave up waiting")
                raise
        finally:
            if blocks is not None:  # only the taker of a connection to itself gives it back
                self.give_back(connection)

    async def aclose(self) -> None:
        self.closed = True
        for connection in self._live:
            await connection.close()
        self._live = []
        for node in self._nodes.values():
            await node.aclose()
        self._nodes = {}


PIPELINE_DEPTH = 64
"""Requests in flight on one connection before another is opened (under the bound)."""


def _load(connection: Connection) -> int:
    return connection.load


MAX_REDIRECTS = 16
"""``MOVED`` replies one call follows in a row (redis-py's bound); waits for a slot
being taken over are bounded by the client's ``timeout`` instead."""


def _pool_of(commands: Sequence[Sequence[str]]) -> str | None:
    """The pool the commands name (they name one: a ``TP.`` command's first argument,
    a ``POOL`` command's name), for routing in a cluster."""
    if not commands or len(commands[0]) < 2:
        return None
    first = commands[0]
    name = str(first[0]).upper()
    if name.startswith("TP."):
        return str(first[1])
    if name == "POOL" and len(first) > 2:
        return str(first[2])
    return None


def _address_of(moved: MovedError) -> tuple[str, int]:
    """``MOVED <slot> <host>:<port>``'s node."""
    try:
        return host_port(moved.address)
    except ValueError:
        raise UnreachableError(f"a MOVED reply names no address: {str(moved)[:80]!r}") from None


class _NotSent(Exception):
    """A request that never reached the stream: safe to try again."""

    def __init__(self, error: UnreachableError) -> None:
        self.error = error


async def _reply(slot: Slot) -> Any:
    """The reply in ``slot``: an error reply as an exception value; raises
    ``UnreachableError`` if the connection broke (or no reply came in time: the
    connection's watchdog breaks it)."""
    await slot.done.wait()
    value = slot.value
    if isinstance(value, UnreachableError):
        raise value
    if isinstance(value, Exception) and not isinstance(value, TokenPoolError):
        return error_of(value)
    return value
