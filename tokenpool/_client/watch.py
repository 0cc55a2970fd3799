"""``RemotePool.watch()``: a pool's events over ``SUBSCRIBE``, resumed after a reconnect.

A subscription has a connection of its own (a subscribed connection takes no other
command). It subscribes to ``events:<pool>@<revision>`` from the pool's revision at
start (or ``since``), so the first connection and every later one are the same case:
events after the last revision delivered. An eviction's ``ended`` and ``granted`` share
a revision, so a resume starts one revision earlier and drops what was already
delivered (same revision and kind): no gap, no repeat.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import hiredis

from .._errors import CompactedError, TokenPoolError, UnreachableError
from .._model import Event
from .._resp import encode_command
from . import replies
from .connections import Connections

if TYPE_CHECKING:
    from .remote import RemotePool


class EventStream:
    """The events of one pool: ``async for event in stream``. Ends after an
    ``overflow`` event (the server dropped the subscription: watch again)."""

    def __init__(self, connections: Connections, pool: RemotePool, since: int) -> None:
        self._connections = connections
        self._pool = pool
        self._last = since  # the last revision delivered in full
        self._seen_at_last: set[str] = set()  # kinds delivered at revision _last
        self._stream: Any = None
        self._reader: Any = None
        self._ready: deque[Event] = deque()  # accepted, not delivered yet (next_revision)
        self._failed: TokenPoolError | None = None  # to raise after what is ready
        self._waiting: anyio.CancelScope | None = None
        self._ended = False
        self.reconnects = 0  # how many times the subscription was made again

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
            return None  # the subscribe confirmation
        event = replies.event(self._pool.name, reply[2])
        if isinstance(event, CompactedError):
            raise event
        if event.kind == "overflow":
            self._ended = True
            return event
        if event.revision < self._last or (
            event.revision == self._last and event.kind in self._seen_at_last
        ):
            return None  # delivered before the reconnect
        if event.revision > self._last:
            self._last = event.revision
            self._seen_at_last = set()
        self._seen_at_last.add(event.kind)
        return event

    def next_revision(self) -> int | None:
        """The revision of the next event if it has arrived already (``None`` if not): an
        eviction's ``ended`` and ``granted`` share one, and come in one message burst."""
        if not self._ready and self._reader is not None and self._failed is None:
            try:
                while (reply := self._reader.gets()) is not False:
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

    async def _next_reply(self) -> Any:
        while True:
            reply = self._reader.gets()
            if reply is not False:
                return reply
            with anyio.CancelScope() as self._waiting:
                try:
                    data = await self._stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    await self._drop()
                    return None
            self._waiting = None
            if self._ended:
                return None
            self._reader.feed(data)

    async def _subscribe(self) -> None:
        """Connect and subscribe from the last revision; retry for up to the client's
        ``timeout``, then raise ``UnreachableError``."""
        timeout = self._connections.timeout
        pause = 0.05
        failure: TokenPoolError | None = None
        with anyio.move_on_after(timeout):
            while True:
                try:
                    stream = await self._connections.open_stream()
                except UnreachableError as error:
                    failure = error
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                resume = max(self._last - 1, 0) if self._seen_at_last else self._last
                channel = f"events:{self._pool.name}@{resume}"
                try:
                    await stream.send(encode_command("SUBSCRIBE", channel))
                except (anyio.BrokenResourceError, OSError) as error:
                    failure = UnreachableError(f"cannot subscribe: {error}")
                    await stream.aclose()
                    continue
                self._stream = stream
                self._reader = hiredis.Reader(encoding="utf-8", errors="strict")
                return
        raise failure or UnreachableError(f"cannot subscribe within {timeout:g} s")

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
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
    if since is None:
        since = (await pool.stats()).revision  # live from now, and resumable from here
    stream = EventStream(connections, pool, since)
    try:
        yield stream
    finally:
        await stream.aclose()
