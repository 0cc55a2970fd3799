"""One RESP connection with a pipeline: many callers' requests in flight at once.

The rules it keeps, so a reply never reaches the wrong caller:
- **Replies come back in order**, so each request appends its reply slots to one FIFO
  in the same synchronous step as it queues its bytes, and one reader task hands each
  reply to the slot at the head.
- **Requests queue in order and go out together.** One writer task writes what the
  buffer holds in one write. The requests of every caller that ran in one turn of the
  loop reach the server as one pipeline, which it reads in one receive and runs as one
  batch per pool: through an HTTP worker's link, the server spent a third of the CPU
  per request it spent on one write a request spread over idle connections.
- **A write is never cut short.** The writer task, not the caller, writes, so a
  cancelled caller never leaves half a command on the stream; the write is bounded by
  the connection's timeout, and a write that fails or times out breaks the connection.
- **The buffer is bounded** (``MAX_QUEUED`` bytes): past it, callers wait in line for
  the writer before queueing (nothing of their request is queued while they wait).
- **A reply overdue breaks the connection**: one watchdog task per connection watches
  the earliest deadline of its slots (a timer per caller cost more than the request).
- **A caller cancelled while its reply is on the way** only abandons its slot: the
  reader still takes that reply off the stream and drops it, so the next caller reads
  its own. (A request the server already applied stays applied: see the client's
  rules on cancellation.)
- **A broken connection is never reused**: every slot still waiting gets
  ``UnreachableError``, the stream is closed, and the pool of connections replaces it.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import hiredis
import sniffio

from .._errors import UnreachableError
from .._resp import encode_command
from .address import Address

MAX_QUEUED = 1 << 20
"""Bytes of requests a connection holds unwritten before its callers wait (its bound)."""


class Slot:
    """Where one reply lands: ``value`` (a reply, or the ``UnreachableError`` that
    ended the connection) once ``done`` is set; due by ``deadline`` (the clock of
    ``anyio.current_time``), ``wait`` seconds after it was queued."""

    __slots__ = ("deadline", "done", "value", "wait")

    def __init__(self, done: Any, wait: float, deadline: float) -> None:
        self.done = done  # the event loop's own event (``native``)
        self.value: Any = None
        self.wait = wait
        self.deadline = deadline

    def set(self, value: Any) -> None:
        self.value = value
        self.done.set()


def _deadline(slot: Slot) -> float:
    return slot.deadline


class UnsentError(UnreachableError):
    """The connection broke before a request's bytes were handed to it: the server never
    saw the request, so any request may be sent again (``_NotSent``)."""


def native() -> tuple[Callable[[], Any], Callable[[], float]]:
    """The running event loop's own event class and clock (``anyio.current_time``'s).

    A request makes an event and reads the clock: anyio's, which ask which event loop
    runs each time, cost 4 µs of the request's 10 on asyncio; the loop's own cost less
    than 1. Both wait and cancel as anyio's do (anyio cancels by the loop's own means)."""
    if sniffio.current_async_library() == "trio":  # (trio's guest mode in asyncio too)
        import trio

        return trio.Event, trio.current_time
    return asyncio.Event, asyncio.get_running_loop().time


class Tally:
    """Writes and requests of a client's connections, over its life."""

    __slots__ = ("requests", "writes")

    def __init__(self) -> None:
        self.writes = 0
        self.requests = 0


class Connection:
    """A connected, authenticated stream; its reader runs in the client's task group."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        address: Address,
        timeout: float,
        on_change: Callable[[], None],
        tally: Tally | None = None,
        raw_socket: socket.socket | None = None,
    ) -> None:
        self._stream = stream
        self._socket = raw_socket  # the stream's own socket (never under TLS), or None
        self._tally = tally or Tally()
        self._event, self._now = native()
        self._address = address
        self._timeout = timeout
        self._on_change = on_change
        self._reader = hiredis.Reader(encoding="utf-8", errors="strict")
        self._pending: deque[Slot] = deque()
        self._queued: list[bytes] = []  # requests not written yet, in order
        self._queued_bytes = 0
        self._queued_slots = 0  # the slots of the requests queued, the newest in the FIFO
        self._wake = self._event()  # set when the writer has something to write
        self._room: anyio.Event | None = None  # set when a full buffer is taken
        self._line = anyio.Lock()  # the callers waiting for room, in order
        self._scope = anyio.CancelScope()
        self._writer_scope = anyio.CancelScope()
        self._watch_scope = anyio.CancelScope()
        self.broken: UnreachableError | None = None
        self.exclusive = False  # taken by a request that blocks it (ACTIVATE ... WAIT)

    @property
    def load(self) -> int:
        """Replies still awaited on this connection."""
        return len(self._pending)

    async def read_replies(self) -> None:
        """The reader task: each reply to the oldest waiting slot, until the stream ends."""
        reason = "the server closed the connection"
        with self._scope:
            try:
                while True:
                    data = await self._stream.receive()
                    self._reader.feed(data)
                    while (reply := self._reader.gets()) is not False:
                        if not self._pending:
                            reason = f"an unexpected reply {str(reply)[:60]!r}"
                            return
                        self._pending.popleft().set(reply)
                        if not self._pending:
                            self._on_change()  # idle: a blocking request may take it
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            except (OSError, ssl.SSLError, hiredis.ProtocolError) as error:
                reason = f"the connection failed: {error}"
            finally:
                self.fail(reason)
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()

    def fail(self, reason: str) -> None:
        """Break the connection: every waiting slot gets ``UnreachableError``, the reader
        stops and closes the stream. Idempotent."""
        if self.broken is None:
            self.broken = UnreachableError(f"{self._address}: {reason}")
        unsent = UnsentError(str(self.broken))
        while self._queued_slots:  # the newest slots: their bytes never left the queue
            self._pending.pop().set(unsent)
            self._queued_slots -= 1
        while self._pending:
            self._pending.popleft().set(self.broken)
        self._queued.clear()
        self._queued_bytes = 0
        if self._room is not None:
            self._room.set()  # a caller waiting for room sees ``broken``
        self._scope.cancel()
        self._writer_scope.cancel()
        self._watch_scope.cancel()
        self._on_change()

    async def send(self, commands: Sequence[Sequence[str]], wait: float) -> list[Slot]:
        """Queue ``commands`` to be written together; their slots, in order, each due
        within ``wait`` seconds (else the connection breaks). Raises
        ``UnreachableError`` (nothing was queued) if the connection is broken."""
        payload = b"".join(encode_command(*c) for c in commands)
        if self._queued_bytes >= MAX_QUEUED:
            # Past the bound, callers wait in line (a fair lock): only the first waits
            # for the writer to take the buffer, so a take wakes one caller, not all;
            # each for at most ``timeout`` (nothing of its request is queued yet).
            with anyio.move_on_after(self._timeout):
                async with self._line:
                    while self._queued_bytes >= MAX_QUEUED and self.broken is None:
                        if self._room is None:
                            self._room = anyio.Event()
                        await self._room.wait()
            if self._queued_bytes >= MAX_QUEUED and self.broken is None:
                raise UnsentError(
                    f"{self._address}: no room to queue a request within {self._timeout:g} s"
                )
        if self.broken is not None:
            raise self.broken
        deadline = self._now() + wait if math.isfinite(wait) else math.inf
        event = self._event
        slots = [Slot(event(), wait, deadline) for _ in commands]
        self._pending.extend(slots)
        self._queued_slots += len(slots)
        self._tally.requests += len(slots)
        self._queued.append(payload)
        self._queued_bytes += len(payload)
        if len(self._queued) == 1:
            self._wake.set()
        return slots

    async def write_requests(self) -> None:
        """The writer task: what the buffer holds, in one write each turn, until the
        connection breaks."""
        with self._writer_scope:
            while True:
                await self._wake.wait()
                self._wake = self._event()
                while self._queued:
                    data = b"".join(self._queued) if len(self._queued) > 1 else self._queued[0]
                    self._queued.clear()
                    self._queued_bytes = 0
                    self._queued_slots = 0  # handed to the stream (whatever comes of it)
                    if self._room is not None:
                        self._room.set()
                        self._room = None
                    self._tally.writes += 1
                    if self._socket is not None:
                        # What the kernel takes now, written at once: no turn of the
                        # loop and no timer for a write that does not wait (nearly all).
                        try:
                            sent = self._socket.send(data)
                        except (BlockingIOError, InterruptedError):
                            sent = 0
                        except OSError as error:
                            self.fail(f"a write failed: {error}")
                            return
                        if sent == len(data):
                            continue
                        data = data[sent:]
                        # The rest goes through the stream, which may keep some of it in
                        # a buffer of its own (asyncio's transports do): from now on every
                        # write does, so no later bytes pass earlier ones.
                        self._socket = None
                    with anyio.move_on_after(self._timeout) as scope:
                        try:
                            await self._stream.send(data)
                        except (
                            anyio.BrokenResourceError,
                            anyio.ClosedResourceError,
                            OSError,
                        ) as error:
                            self.fail(f"a write failed: {error}")
                            return
                    if scope.cancelled_caught:
                        self.fail(f"a write took longer than {self._timeout:g} s")
                        return

    async def watch_replies(self) -> None:
        """The watchdog task: the connection breaks when a reply it awaits is overdue
        (the server is stalled or gone). One task per connection, waking at most once a
        ``timeout`` while idle, instead of a timer around every caller's wait (anyio's
        cancel scope cost an HTTP worker 12 µs a request on asyncio)."""
        with self._watch_scope:
            while True:
                delay = self._timeout
                if self._pending:
                    # the earliest deadline, not the oldest slot's: a request behind one
                    # that blocks (ACTIVATE ... WAIT) is due long before it
                    due = min(self._pending, key=_deadline)
                    left = due.deadline - self._now()
                    if left <= 0:
                        self.fail(f"no reply within {due.wait:g} s")
                        return
                    delay = min(delay, left)
                await anyio.sleep(delay)

    async def close(self) -> None:
        self.fail("the client closed")
