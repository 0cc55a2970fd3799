"""Server-Sent Events: one pool's changes, ``id`` their revision."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import trio
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from .._errors import CompactedError

if TYPE_CHECKING:
    from .._pool import Pool
    from .app import HttpApp

HEARTBEAT = 15.0  # seconds between comments on an idle event stream


class EventStream(Response):
    """Server-Sent Events of one pool: one event per change, ``id`` its revision.

    Not a generator (a cancelled generator is finalised later, by the collector, and
    its subscription would linger): one task forwards events, another watches for the
    client hanging up and cancels the first.
    """

    media_type = "text/event-stream"

    def __init__(self, owner: HttpApp, pool: Pool, since: int | None) -> None:
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
        try:
            async with trio.open_nursery() as nursery:

                async def hang_up() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hang_up)
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    await self._forward(send)
                nursery.cancel_scope.cancel()
        finally:
            owner.streams -= 1
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _forward(self, send: Send) -> None:
        async def out(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        await out(f"retry: 2000\n: events of pool {self.pool.name}\n\n")
        current = self.pool.statistics().stats.revision
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
                self.owner.subscriptions.add(events)
                try:
                    while True:
                        with trio.move_on_after(HEARTBEAT):
                            try:
                                event = await events.__anext__()
                            except StopAsyncIteration:
                                return
                            payload = json.dumps(event.as_dict())
                            if event.kind == "overflow":
                                await out(f"event: overflow\ndata: {payload}\n\n")
                                return
                            following = events.next_revision()
                            if following == event.revision:
                                # an eviction: its ended event shares the revision with the
                                # grant after it; the resume point is after both
                                await out(f"data: {payload}\n\n")
                            else:
                                await out(f"id: {event.revision}\ndata: {payload}\n\n")
                            continue
                        await out(": keepalive\n\n")
                finally:
                    self.owner.subscriptions.discard(events)
        except CompactedError as error:
            payload = json.dumps(
                {"kind": "compacted", "oldest": error.oldest, "message": str(error)}
            )
            await out(f"event: compacted\ndata: {payload}\n\n")
