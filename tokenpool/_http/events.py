"""Server-Sent Events: one pool's changes, ``id`` their revision."""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

import anyio
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from .._errors import CompactedError
from .._log import get_logger

if TYPE_CHECKING:
    from .app import HttpApp
    from .backend import EventSource

log = get_logger("tokenpool.http")

HEARTBEAT = 15.0  # seconds between comments on an idle event stream
FINAL_SEND = 1.0  # seconds the end of a stream may take to send
PAIR_WAIT = 0.05  # seconds to wait for the grant after an eviction (a worker's stream)


class _StuckReader(Exception):
    """The client stopped reading: a send stayed blocked past ``--idle-timeout``."""


class EventStream(Response):
    """Server-Sent Events of one pool: one event per change, ``id`` its revision.

    Not a generator (a cancelled generator is finalised later, by the collector, and
    its subscription would linger): one task forwards events, another watches for the
    client hanging up and cancels the first.
    """

    media_type = "text/event-stream"

    _events: Any = None

    def __init__(self, owner: HttpApp, pool: EventSource, since: int | None) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.owner = owner
        self.pool = pool
        self.since = since

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        owner = self.owner
        owner.streams += 1
        self._counted = True
        self._sending_since: float | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def hang_up() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(hang_up)
                tg.start_soon(self._watch_reader)
                try:
                    with contextlib.suppress(OSError, anyio.BrokenResourceError):
                        await self._forward(send)
                except _StuckReader:
                    pass
                tg.cancel_scope.cancel()
        finally:
            self._release_slot()
        with contextlib.suppress(Exception), anyio.move_on_after(FINAL_SEND):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _release_slot(self) -> None:
        if self._counted:
            self._counted = False
            self.owner.streams -= 1

    async def _watch_reader(self) -> None:
        """hypercorn sends a response's bytes in a shielded scope, so a reader that stops
        reading blocks the send for good, whatever cancels it: past --idle-timeout the
        stream gives its slot and its subscription back at once (the pool no longer
        buffers for it); the blocked send ends when the client reads or goes."""
        deadline = self.owner.settings.idle_timeout
        while True:
            await anyio.sleep(min(1.0, deadline / 2))
            since = self._sending_since
            if since is not None and time.monotonic() - since > deadline:
                log.warning("event_stream_dropped", pool=self.pool.name, reason="slow reader")
                self._release_slot()
                if self._events is not None:
                    self._events.close()
                    closing = getattr(self._events, "aclose", None)
                    if closing is not None:  # a worker's: its link to the server too
                        await closing()
                return

    async def _forward(self, send: Send) -> None:
        self._events = None

        async def out(text: str) -> None:
            if not self._counted:
                raise _StuckReader  # the watcher gave the slot up
            self._sending_since = time.monotonic()  # the watcher times each send
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            self._sending_since = None

        await out(f"retry: 2000\n: events of pool {self.pool.name}\n\n")
        current = self.pool.revision
        if self.since is not None and self.since > current:
            # a revision this pool never reached: the server restarted without its
            # history (memory store). Resuming would skip silently, then go back to
            # lower ids: tell the client to reload, as for compacted history.
            payload = json.dumps(
                {
                    "kind": "compacted",
                    "oldest": current + 1,
                    "message": f"revision {self.since} is ahead of this pool's {current}"
                    " (the server restarted without its history): reload",
                }
            )
            await out(f"event: compacted\ndata: {payload}\n\n")
            return
        try:
            async with self.pool.watch(self.since) as events:
                self._events = events
                self.owner.subscriptions.add(events)
                try:
                    while True:
                        event = None
                        with anyio.move_on_after(HEARTBEAT):  # the wait, never the send
                            try:
                                event = await events.__anext__()
                            except StopAsyncIteration:
                                return
                        if event is None:
                            await out(": keepalive\n\n")
                            continue
                        payload = json.dumps(event.as_dict())
                        if event.kind == "overflow":
                            await out(f"event: overflow\ndata: {payload}\n\n")
                            return
                        following = events.next_revision()
                        if following is None and event.reason == "evicted":
                            # over a worker's link the grant that follows an eviction
                            # may be a read behind it: wait a moment for it
                            wait_next = getattr(events, "wait_next_revision", None)
                            if wait_next is not None:
                                following = await wait_next(PAIR_WAIT)
                        if following == event.revision:
                            # an eviction: its ended event shares the revision with the
                            # grant after it; the resume point is after both
                            await out(f"data: {payload}\n\n")
                        else:
                            await out(f"id: {event.revision}\ndata: {payload}\n\n")
                finally:
                    self.owner.subscriptions.discard(events)
        except CompactedError as error:
            payload = json.dumps(
                {"kind": "compacted", "oldest": error.oldest, "message": str(error)}
            )
            await out(f"event: compacted\ndata: {payload}\n\n")
