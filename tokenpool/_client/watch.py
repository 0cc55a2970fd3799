"""``RemotePool.watch()``: a pool's events over ``SUBSCRIBE``, resumed after a reconnect.

A subscription has a connection of its own (a subscribed connection takes no other
command). It subscribes to ``events:<pool>@<revision>`` from the pool's revision at
start (or ``since``), so the first connection and every later one are the same case:
events after the last revision delivered. An eviction's ``ended`` and ``granted`` share
a revision, so a resume starts one revision earlier and drops what was already
delivered (same revision and kind): no gap, no repeat.

The rules it keeps in a cluster, where a pool's events come from its owner only:
- A subscription is made on the pool's node: ``MOVED`` is followed (the node is
  remembered with the client's routes), ``TRYAGAIN`` and ``CLUSTERDOWN`` waited out,
  and a node that cannot be reached replaced by the first server, then by any other
  node met so far; all within the client's ``timeout``.
- It is made again when the node says the slot left it (an ``unsubscribe`` push, as
  Redis 7 sends for a shard channel whose slot moved: a drain, a spread, a lease run
  out), when the connection breaks (a killed node), and when the connection stays
  silent for ``timeout`` though a ``PING`` was sent a third of the way in (a paused or
  cut-off node).
- Events a resumed subscription cannot replay are never skipped silently: a new owner
  starts its revisions above every older one (``epoch << 40``) and recovers the pool
  from the store, not the old owner's events; a server that restarted without its
  history, or that compacted the events, cannot replay them either. The stream then
  delivers one ``gap`` event whose ``revision`` is where it goes on from (every event
  after it follows), and the reader reads the pool's state again. Only the first
  subscription with the caller's own ``since`` raises ``CompactedError`` instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import hiredis

from .._errors import (
    ClusterDownError,
    CompactedError,
    MovedError,
    TokenPoolError,
    TryAgainError,
    UnreachableError,
)
from .._model import Event
from .._resp import encode_command
from . import replies
from .connections import MAX_REDIRECTS, Connections

if TYPE_CHECKING:
    from .remote import RemotePool


class EventStream:
    """The events of one pool: ``async for event in stream``. Ends after an
    ``overflow`` event (the server dropped the subscription: watch again), and when the
    pool is dropped (the server's ``dropped`` message, not delivered). A ``gap``
    event says events up to its ``revision`` could not be replayed (see the module)."""

    def __init__(
        self, connections: Connections, pool: RemotePool, since: int, *, strict: bool = True
    ) -> None:
        self._connections = connections
        self._pool = pool
        self._last = since  # the last revision delivered in full
        self._seen_at_last: set[str] = set()  # kinds delivered at revision _last
        self._strict = strict  # the first subscription's CompactedError is raised
        self._stream: Any = None
        self._reader: Any = None
        self._channel = ""
        self._early: deque[Any] = deque()  # read with the subscribe confirmation
        self._moved = False  # the node unsubscribed us: subscribe again, where it moved
        self._ready: deque[Event] = deque()  # accepted, not delivered yet (next_revision)
        self._failed: TokenPoolError | None = None  # to raise after what is ready
        self._waiting: anyio.CancelScope | None = None
        self._ended = False
        self.reconnects = 0  # how many times the subscription was made again
        self.gaps = 0  # ``gap`` events delivered

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._ready:
                event: Event = self._ready.popleft()
                return event
            if self._failed is not None:
                failed, self._failed = self._failed, None
                raise failed
            if self._ended:
                raise StopAsyncIteration
            if self._moved:
                self._moved = False
                await self._drop()
            if self._stream is None:
                await self._subscribe()
            reply = await self._next_reply()
            if reply is None:
                continue  # the connection broke (subscribe again), or close() was called
            accepted = self._accept(reply)
            if accepted is not None:
                return accepted

    def _accept(self, reply: Any) -> Event | None:
        """A reply as the next event to deliver, or None (a confirmation, a repeat)."""
        if not isinstance(reply, list) or len(reply) != 3 or reply[0] != "message":
            if isinstance(reply, Exception):
                raise replies.error_of(reply)
            if isinstance(reply, list) and reply[:2] == ["unsubscribe", self._channel]:
                self._moved = True  # the slot left that node (we never unsubscribe)
            return None  # the subscribe confirmation, a PING's answer
        event = replies.event(self._pool.name, reply[2])
        if isinstance(event, CompactedError):
            if self._strict and not self.reconnects:
                raise event
            return self._gap(event.oldest - 1)
        if event.kind == "overflow":
            self._ended = True
            return event
        if event.kind == "dropped":  # the pool was dropped: the stream ends, as the library's
            self._ended = True
            return None
        if event.revision < self._last or (
            event.revision == self._last and event.kind in self._seen_at_last
        ):
            return None  # delivered before the reconnect
        if event.revision > self._last:
            self._last = event.revision
            self._seen_at_last = set()
        self._seen_at_last.add(event.kind)
        return event

    def _gap(self, resume: int) -> Event:
        """The events after the last delivered, up to ``resume``, cannot be replayed:
        say so, and subscribe again after ``resume`` (the server ended that one)."""
        self._last = resume
        self._seen_at_last = set()
        self._moved = True
        self.gaps += 1
        return Event("gap", self._pool.name, resume)

    def next_revision(self) -> int | None:
        """The revision of the next event if it has arrived already (``None`` if not): an
        eviction's ``ended`` and ``granted`` share one, and come in one message burst."""
        if not self._ready and self._reader is not None and self._failed is None:
            try:
                while (reply := self._early_or_read()) is not False:
                    accepted = self._accept(reply)
                    if accepted is not None:
                        self._ready.append(accepted)
                        break
            except TokenPoolError as error:
                self._failed = error
        return self._ready[0].revision if self._ready else None

    async def wait_next_revision(self, seconds: float) -> int | None:
        """``next_revision``, waiting up to ``seconds`` for the next event to arrive."""
        with anyio.move_on_after(seconds):
            while self.next_revision() is None and not self._ended and self._stream is not None:
                try:
                    data = await self._stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break  # the next __anext__ sees it again, and reconnects
                self._reader.feed(data)
        return self.next_revision()

    def close(self) -> None:
        """Stop: the stream ends (a wait for the next event ends at once)."""
        self._ended = True
        if self._waiting is not None:
            self._waiting.cancel()

    def _early_or_read(self) -> Any:
        return self._early.popleft() if self._early else self._reader.gets()

    async def _next_reply(self) -> Any:
        while True:
            reply = self._early_or_read()
            if reply is not False:
                return reply
            if self._moved:
                return None
            with anyio.CancelScope() as self._waiting:
                try:
                    data = await self._receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    await self._drop()
                    return None
            self._waiting = None
            if self._ended:
                return None
            self._reader.feed(data)

    async def _receive(self) -> bytes:
        """The next bytes. Silent for a third of ``timeout``: a ``PING`` (answered even
        while subscribed); still silent at ``timeout``: the node is paused or cut off,
        and the connection is taken as broken."""
        stream = self._stream
        quiet = self._connections.timeout / 3
        with anyio.move_on_after(quiet):
            data: bytes = await stream.receive()
            return data
        with anyio.move_on_after(quiet):
            await stream.send(encode_command("PING"))
        with anyio.move_on_after(self._connections.timeout - quiet):
            data = await stream.receive()
            return data
        raise anyio.BrokenResourceError(f"no answer within {self._connections.timeout:g} s")

    async def _subscribe(self) -> None:
        """Subscribe from the last revision on the pool's node (see the module's rules);
        retry for up to the client's ``timeout``, then raise ``UnreachableError`` (or the
        cluster's last answer)."""
        connections = self._connections
        pool = self._pool.name
        timeout = connections.timeout
        pause = 0.05
        redirects = 0
        fallback = 0  # the next of connections.known() to ask when a node is unreachable
        failure: TokenPoolError | None = None
        node = connections.node_of(pool)
        with anyio.move_on_after(timeout):
            while True:
                resume = max(self._last - 1, 0) if self._seen_at_last else self._last
                channel = f"events:{pool}@{resume}"
                try:
                    stream, reader, first = await self._subscribe_on(node, channel)
                except UnreachableError as error:
                    failure = error
                    connections.forget(pool)
                    known = connections.known()
                    node = known[fallback % len(known)]
                    fallback += 1
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                if not isinstance(first, Exception):
                    self._stream, self._reader, self._channel = stream, reader, channel
                    self._early.append(first)
                    return
                await stream.aclose()
                refused = replies.error_of(first)
                if isinstance(refused, MovedError):
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise UnreachableError(
                            f"more than {MAX_REDIRECTS} MOVED in a row for pool {pool!r}"
                        )
                    node = connections.moved(pool, refused)
                    continue
                if not isinstance(refused, TryAgainError | ClusterDownError):
                    raise refused
                failure = refused
                if isinstance(refused, ClusterDownError):
                    connections.forget(pool)  # the first server learns the new owner
                    node = connections
                redirects = 0
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.5)
        raise failure or UnreachableError(f"cannot subscribe within {timeout:g} s")

    async def _subscribe_on(
        self, node: Connections, channel: str
    ) -> tuple[anyio.abc.ByteStream, Any, Any]:
        """A stream to ``node`` that sent ``SUBSCRIBE channel``, its reader, and the first
        reply (the confirmation, an event replayed before it, or the refusal)."""
        stream = await node.open_stream()
        reader = hiredis.Reader(encoding="utf-8", errors="strict")
        try:
            with anyio.fail_after(node.timeout):
                await stream.send(encode_command("SUBSCRIBE", channel))
                while (first := reader.gets()) is False:
                    reader.feed(await stream.receive())
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as error:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            reason = str(error) or type(error).__name__
            raise UnreachableError(f"cannot subscribe at {node.address}: {reason}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return stream, reader, first

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        self._early.clear()
        self.reconnects += 1
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def aclose(self) -> None:
        self._ended = True
        stream, self._stream = self._stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()


@asynccontextmanager
async def open_event_stream(
    connections: Connections, pool: RemotePool, since: int | None
) -> AsyncIterator[EventStream]:
    strict = since is not None
    if since is None:
        since = (await pool.stats()).revision  # live from now, and resumable from here
    stream = EventStream(connections, pool, since, strict=strict)
    try:
        yield stream
    finally:
        await stream.aclose()
