"""Live events: a bounded log of each pool's changes and the subscribers that follow it.

The actor calls ``publish`` with each batch's change records: one filter of the
batch for its lease events, one C-level ``deque.extend`` for the log and one list
append per subscriber, so watching costs the actor almost nothing. Records become
``Event`` values in the subscriber's own task, as it reads.

Rules (etcd's watch, Redis's pub/sub buffer limits):
- ``subscribe(since=r)`` first replays the logged events after revision
  ``r``, then follows live ones, with no gap between the two. A revision
  older than the log holds raises ``CompactedError`` naming the oldest one held.
- A subscriber's buffer is bounded, its replay included: a replay of more events
  than the buffer holds raises ``CompactedError`` naming the revision to resume
  from. A replay is read from the pool's log as the subscriber goes, a chunk at a
  time, never copied whole: subscribers that resume far back and never read cost
  their counters, not their replays (an outside probe's 100 connections of 1,000
  such channels each grew the server by 1 GB). One that reads too slowly gets, once its
  buffer is full, a single ``overflow`` event saying how many events it
  missed, and its stream then ends; the actor never waits for it.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import islice
from operator import itemgetter
from typing import Any

import trio

from ._errors import CompactedError
from ._model import (
    END,
    FENCE,
    GRANT,
    ID,
    KIND,
    REASON,
    RENEW,
    REV,
    SLOT,
    START,
    STOP,
    USER,
    Event,
    Record,
    record_revision,
    to_datetime,
)

KINDS = {GRANT: "granted", RENEW: "renewed", END: "ended"}
PAYLOADS = 4_096  # events whose JSON a pool keeps for its subscribers
REPLAY_CHUNK = 256  # replayed events a subscriber takes from the log at once
_REV = itemgetter(REV)
_KEY = itemgetter(REV, KIND, ID)  # an event's, for its JSON (an eviction's two share REV)


def _encoded(event: Event) -> bytes:
    """An event's JSON, as a subscriber is sent it."""
    return json.dumps(event.as_dict()).encode()


def event_of(record: Record, pool: str, names: Callable[[int], str]) -> Event:
    """A lease or end record as an ``Event``."""
    token = names(record[SLOT])
    if record[KIND] == END:
        return Event(
            "ended",
            pool,
            record[REV],
            token,
            record[ID],
            record[USER],
            record[FENCE],
            to_datetime(record[START]),
            None,
            to_datetime(record[STOP]),
            record[REASON],
        )
    return Event(
        KINDS[record[KIND]],
        pool,
        record[REV],
        token,
        record[ID],
        record[USER],
        record[FENCE],
        to_datetime(record[START]),
        to_datetime(record[STOP]),
    )


class Subscription:
    """One subscriber's bounded buffer of record batches. Iterate it for ``Event`` values."""

    def __init__(self, hub: EventHub, buffer: int) -> None:
        self._hub = hub
        self._batches: deque[list[Record]] = deque()
        self._buffered = 0
        self._limit = buffer
        self.missed = 0
        self.overflowed = False
        self.closed = False
        self._ready = trio.Event()
        self._current: deque[Record] = deque()
        self._ended = False
        # A replay still to read from the hub's log: the events after revision
        # ``_replay_after`` up to ``_replay_until``, ``_replay_left`` of them (counted
        # in ``_buffered``); the live batches come after them.
        self._replay_after = 0
        self._replay_until = 0
        self._replay_left = 0

    def replay(self, after: int, until: int, count: int) -> None:
        """Deliver the logged events after revision ``after`` up to ``until`` first."""
        self._replay_after, self._replay_until, self._replay_left = after, until, count
        self._buffered += count

    def _take_replay(self) -> None:
        """Move the next chunk of the replay into ``_current``. A log that no longer
        holds it (the pool made a log's worth of events meanwhile) ends the stream as
        an overflow would: nothing after the gap is delivered."""
        chunk = self._hub.logged(self._replay_after, self._replay_until, REPLAY_CHUNK)
        if chunk is None:
            self.missed += self._buffered
            self._batches.clear()
            self._buffered = self._replay_left = 0
            self.overflowed = True
            return
        self._replay_after = chunk[-1][REV]
        taken = len(chunk) if self._replay_after < self._replay_until else self._replay_left
        self._replay_left -= taken
        self._buffered -= taken
        self._current = deque(chunk)

    def push(self, events: list[Record]) -> None:
        """Take one batch's event records (the hub filtered them): one append."""
        if self.closed:
            return
        if self.overflowed or self._buffered + len(events) > self._limit:
            self.overflowed = True
            self.missed += len(events)
        else:
            self._batches.append(events)
            self._buffered += len(events)
        self._ready.set()

    def close(self) -> None:
        """Stop following (the pool buffers nothing more for it, and no longer counts it)."""
        self.closed = True
        self._ready.set()
        self._hub.unsubscribe(self)

    def next_revision(self) -> int | None:
        """The revision of the next event if it is already here (``None`` if not).

        An eviction's ``ended`` and ``granted`` events share a revision: a stream that
        marks resume points (SSE ids) marks only the last event of a revision.
        """
        if not self._current and self._replay_left:
            self._take_replay()
        if self._current:
            return record_revision(self._current[0])
        if self._batches and not self._replay_left:
            return record_revision(self._batches[0][0])
        return None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        """The next event (an iterator class, not an async generator: breaking out of an
        ``async for`` must not leave a generator for the garbage collector to finalise)."""
        got = await self._next()
        if isinstance(got, Event):
            return got
        hub = self._hub
        return event_of(got, hub.pool, hub.names)

    async def next_payloads(self, most: int, make: int) -> list[bytes]:
        """The next events as their JSON (``Event.as_dict``), UTF-8: the first awaited
        as ``__anext__`` does (made if need be), then up to ``most`` in all of those
        already here, of which at most ``make`` more not made yet (a call's cost stays
        small: a subscriber far behind the others finds few made). Each event's JSON
        is made once for the pool, however many subscribers send it (a server fanning
        one pool out to hundreds of connections). Raises ``StopAsyncIteration`` at the end, as
        ``__anext__``."""
        got = await self._next()
        if isinstance(got, Event):
            return [_encoded(got)]
        hub = self._hub
        out = [hub.payload(got)]
        current = self._current
        while current and len(out) < most:
            made = hub.made(current[0])
            if made is None:
                if not make:
                    break
                make -= 1
                made = hub.payload(current[0])
            current.popleft()
            out.append(made)
        return out

    async def _next(self) -> Record | Event:
        """The next event's record, or the ``overflow`` event that ends the stream."""
        hub = self._hub
        while True:
            if self._current:
                return self._current.popleft()
            if self._replay_left:
                self._take_replay()
                await trio.lowlevel.checkpoint()
                continue
            if self._batches:
                batch = self._batches.popleft()
                self._buffered -= len(batch)
                self._current = deque(batch)
                await trio.lowlevel.checkpoint()
                continue
            if self._ended:
                raise StopAsyncIteration
            if self.overflowed:
                self._ended = True
                hub.unsubscribe(self)
                return Event("overflow", hub.pool, hub.revision(), missed=self.missed)
            if self.closed:
                self._ended = True
                hub.unsubscribe(self)
                raise StopAsyncIteration
            await self._ready.wait()
            self._ready = trio.Event()


class EventHub:
    """The event log of one pool (its newest ``capacity`` lease events) and its subscribers."""

    def __init__(
        self,
        pool: str,
        names: Callable[[int], str],
        revision: Callable[[], int],
        *,
        capacity: int = 100_000,
        start: int = 0,
    ) -> None:
        self.pool = pool
        self.names = names
        self.revision = revision
        self.capacity = capacity
        self._log: deque[Record] = deque(maxlen=capacity)
        self._floor = start + 1  # the oldest revision whose events are all in the log
        self._subscribers: set[Subscription] = set()
        self._payloads: OrderedDict[tuple[int, int, str], bytes] = OrderedDict()

    def made(self, record: Record) -> bytes | None:
        """The event's JSON if it was made (and is still kept), else None."""
        return self._payloads.get(_KEY(record))

    def payload(self, record: Record) -> bytes:
        """An event's JSON, made once for every subscriber that sends it: the newest
        ``PAYLOADS`` made are kept (subscribers that keep up share them)."""
        key = _KEY(record)
        made = self._payloads.get(key)
        if made is None:
            made = _encoded(event_of(record, self.pool, self.names))
            payloads = self._payloads
            if len(payloads) >= PAYLOADS:
                payloads.popitem(last=False)  # the oldest made
            payloads[key] = made
        return made

    def publish(self, records: list[Record]) -> None:
        """Log a batch's lease events (only those: what watchers are told, each at its
        ``REV``, so a resume finds its place by bisection) and hand them to every
        subscriber, filtered once per batch, not per subscriber."""
        events = [r for r in records if r[KIND] <= END]
        if not events:
            return
        log = self._log
        log.extend(events)
        if len(log) == self.capacity:
            self._floor = log[0][REV] + 1
        for subscriber in self._subscribers:
            subscriber.push(events)

    @property
    def oldest(self) -> int:
        """The oldest revision whose events ``subscribe(since=oldest - 1)`` can replay."""
        return self._floor

    def subscribe(self, since: int | None = None, buffer: int = 10_000) -> Subscription:
        """Follow the pool's events; with ``since``, replay those after it first.

        Raises ``CompactedError`` when events after ``since`` are no longer all held.
        """
        subscription = Subscription(self, buffer)
        if since is not None:
            current = self.revision()
            if since > current:  # as the server answers it: no event can be "after" it
                raise CompactedError(
                    f"revision {since} is ahead of this pool's {current} (a revision of"
                    " another pool, or of this one before a memory-only restart)",
                    current + 1,
                )
            if since + 1 < self._floor:
                raise CompactedError(
                    f"events after revision {since} are compacted; the oldest still held is"
                    f" {self._floor} (subscribe with since={self._floor - 1} or later, or read"
                    " the history for what came before)",
                    self._floor,
                )
            # The replay counts against the buffer. The log holds lease events alone, in
            # revision order: where the replay starts is a bisection, whether it fits
            # one index (hundreds of subscribers resuming far behind at once held the
            # loop for 80 ms when each walked the log record by record).
            log = self._log
            after = len(log) - bisect.bisect_right(log, since, key=_REV)
            if after > buffer:
                revision = log[-(buffer + 1)][REV]
                raise CompactedError(
                    f"more than {buffer:,} events came after revision {since}: a"
                    f" subscriber replays at most {buffer:,} (subscribe with"
                    f" since={revision} or later, or read the history for what"
                    " came before)",
                    revision + 1,
                )
            if after:
                subscription.replay(since, log[-1][REV], after)
        self._subscribers.add(subscription)
        return subscription

    def logged(self, after: int, until: int, most: int) -> list[Record] | None:
        """The logged events after revision ``after`` up to ``until``: at most ``most``
        (more only to keep a revision's events together), at least one; ``None`` when
        the log no longer holds those after ``after``. Walked from the log's newest end,
        where a replay's events are."""
        if after + 1 < self._floor:
            return None
        log = self._log
        start = bisect.bisect_right(log, after, key=_REV)
        behind = len(log) - start
        if not behind:
            return None  # (the count said more: as compacted, never a silent gap)
        chunk = list(islice(reversed(log), max(behind - most, 0), behind))
        chunk.reverse()
        end = start + len(chunk)
        while end < len(log) and log[end][REV] == chunk[-1][REV]:
            chunk.append(log[end])  # an eviction's ended and granted share a revision
            end += 1
        if chunk[-1][REV] > until:
            chunk = [r for r in chunk if r[REV] <= until]
        return chunk or None

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        if not self._subscribers:
            self._payloads.clear()  # kept for subscribers only (up to about 2 MB)

    def close(self) -> None:
        for subscriber in list(self._subscribers):
            subscriber.close()

    def statistics(self) -> dict[str, Any]:
        return {
            "subscribers": len(self._subscribers),
            "events_logged": len(self._log),
            "oldest_revision": self._floor,
        }
