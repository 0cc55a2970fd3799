"""One RESP connection with a pipeline: many callers' requests in flight at once.

The rules it keeps, so a reply never reaches the wrong caller:
- **Replies come back in order**, so each request appends its reply slots to one FIFO
  (under the write lock, in the same step as its bytes are written) and one reader
  task hands each reply to the slot at the head.
- **A write is never cut short.** The write runs shielded from the caller's
  cancellation (bounded by the connection's timeout instead), so the stream never
  holds half a command; a write that fails or times out breaks the connection.
- **A caller cancelled while its reply is on the way** only abandons its slot: the
  reader still takes that reply off the stream and drops it, so the next caller reads
  its own. (A request the server already applied stays applied: see the client's
  rules on cancellation.)
- **A broken connection is never reused**: every slot still waiting gets
  ``UnreachableError``, the stream is closed, and the pool of connections replaces it.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import hiredis

from .._errors import UnreachableError
from .._resp import encode_command
from .address import Address


class Slot:
    """Where one reply lands: ``value`` (a reply, or the ``UnreachableError`` that
    ended the connection) once ``done`` is set."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value
        self.done.set()


class Connection:
    """A connected, authenticated stream; its reader runs in the client's task group."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        address: Address,
        timeout: float,
        on_change: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._address = address
        self._timeout = timeout
        self._on_change = on_change
        self._reader = hiredis.Reader(encoding="utf-8", errors="strict")
        self._pending: deque[Slot] = deque()
        self._write_lock = anyio.Lock()
        self._scope = anyio.CancelScope()
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
        while self._pending:
            self._pending.popleft().set(self.broken)
        self._scope.cancel()
        self._on_change()

    async def send(self, commands: Sequence[Sequence[str]]) -> list[Slot]:
        """Write ``commands`` in one write; their slots, in order. Raises
        ``UnreachableError`` (nothing was sent) if the connection is broken."""
        payload = b"".join(encode_command(*c) for c in commands)
        slots = [Slot() for _ in commands]
        async with self._write_lock:
            if self.broken is not None:
                raise self.broken
            self._pending.extend(slots)
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + self._timeout
                try:
                    await self._stream.send(payload)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
                    self.fail(f"a write failed: {error}")
            if scope.cancelled_caught:
                self.fail(f"a write took longer than {self._timeout:g} s")
        return slots

    async def close(self) -> None:
        self.fail("the client closed")
