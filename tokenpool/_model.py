"""Value classes the pool hands out, and the change records it emits.

Two representations, on purpose:

- **Change records** are plain tuples whose fields are read by the names below
  (``record[SLOT]``): the state keeps its leases as them, the writer ships them to
  the store process as they are (pickled at C speed), the drivers format replies
  straight from them. Times are integers (microseconds since the Unix epoch)
  until the edge. Nothing on the path taken a hundred thousand times a second
  builds more than one tuple per change.
- **Public values** (``Lease``, ``Usage``, ``TokenStatus``, ``Stats``,
  ``Event``) are frozen attrs classes with timezone-aware datetimes, built
  from records at the library's edge (``Pool`` methods, events).

A lease is a ``LeaseRecord`` (kind ``GRANT``, or ``RENEW`` once renewed: the
newest one). ``SLOT`` is the token's index in its pool; the store process
learns each slot's token id from ``TokensAdded`` records and from recovery.
Every ``EndRecord`` has a revision of its own: that revision is the total
order of the usage history, in memory and in the store. This module is the
only one that knows the records' field positions.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import attrs

GRANT: Final = 0
RENEW: Final = 1
END: Final = 2
ADD: Final = 3
RETIRE: Final = 4


# Field positions. A lease record (kind GRANT, or RENEW once renewed) and an end record
# (kind END, one row of the usage history) share the first eight; an end adds REASON:
#   (KIND, ID, SLOT, USER, FENCE, START, STOP, REV[, REASON])
# ID is the lease id, SLOT the token's index in its pool, FENCE the revision that
# granted the lease, START/STOP activated_at and expires_at (ended_at for an end) in
# microseconds, REV the revision that made the record (an end's place in the history).
KIND: Final = 0
ID: Final = 1
SLOT: Final = 2
USER: Final = 3
FENCE: Final = 4
START: Final = 5
STOP: Final = 6
REV: Final = 7
REASON: Final = 8
# Tokens added: (ADD, ADDED_REV, CREATED, TOKENS: (first slot, 16 bytes of UUID per token))
# for the consecutive slots from the first (read them with ``added_tokens``);
# tokens retired: (RETIRE, ADDED_REV, CREATED: when, TOKENS: (slot, ...)).
ADDED_REV: Final = 1
CREATED: Final = 2
TOKENS: Final = 3

LeaseRecord = tuple[int, str, int, str, int, int, int, int]
EndRecord = tuple[int, str, int, str, int, int, int, int, str]
TokensAdded = tuple[int, int, int, tuple[int, bytes]]
TokensRetired = tuple[int, int, int, tuple[int, ...]]
Record = tuple[Any, ...]
"""Records are plain tuples, on purpose: CPython's collector stops tracking a tuple of
plain values after its first pass (only an exact tuple: a named tuple stays tracked
for life), so the hundred thousand ended leases a pool keeps cost nothing to full
collections. Named tuples here made the server 25% slower per activation (measured:
full collections of 80 ms instead of 36 ms, twice as often). Only this module knows
the positions; everything else reads them through the names above."""


def added_tokens(record: Record) -> Iterator[tuple[int, bytes]]:
    """The (slot, 16 UUID bytes) of each token a ``TokensAdded`` record added.

    The record keeps them as one bytes object, not a tuple of (slot, text) pairs: a pool
    made with a million tokens keeps its first record in the change log, and pairs of an
    int and a str cost 170 bytes a token there (16 here)."""
    first, blob = record[TOKENS]
    for i in range(len(blob) // 16):
        yield first + i, blob[16 * i : 16 * i + 16]


def record_revision(record: Record) -> int:
    """The revision that made a record (any kind)."""
    revision: int = record[REV] if record[KIND] <= END else record[ADDED_REV]
    return revision


def is_lease_event(record: Record) -> bool:
    """Whether a record is a grant, a renewal or an end (what watchers are told)."""
    return record[KIND] <= END  # type: ignore[no-any-return]


def is_lease(value: object) -> bool:
    """Whether a result is a lease record (a grant or a renewal)."""
    return type(value) is tuple and len(value) == 8 and value[KIND] <= RENEW


EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def to_datetime(us: int) -> datetime:
    """Microseconds since the Unix epoch as an aware UTC datetime (exact, unlike fromtimestamp)."""
    return EPOCH + timedelta(microseconds=us)


def to_us(value: datetime) -> int:
    """An aware datetime as microseconds since the Unix epoch."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def iso(us: int | None) -> str:
    """ISO-8601 UTC with microseconds and a ``Z``; ``""`` for no time.

    Each reply of a lease formats two times, nearly always in seconds already seen
    (now, and now plus the TTL): the text up to the second is kept for up to
    ``_ISO_KEPT`` seconds (all dropped when full), a fifth of the cost of formatting a
    datetime each time."""
    if us is None:
        return ""
    seconds, micro = divmod(us, 1_000_000)
    head = _iso_seconds.get(seconds)
    if head is None:
        if len(_iso_seconds) >= _ISO_KEPT:
            _iso_seconds.clear()
        whole = to_datetime(seconds * 1_000_000).isoformat(timespec="seconds")
        head = _iso_seconds[seconds] = whole.removesuffix("+00:00")
    return f"{head}.{micro:06d}Z"


_ISO_KEPT = 64
_iso_seconds: dict[int, str] = {}


class Reason(enum.StrEnum):
    """Why a lease ended; stored with every usage-history entry."""

    EXPIRED = "expired"
    EVICTED = "evicted"
    RELEASED = "released"
    CLEARED = "cleared"


COUNTERS: Final = {
    "activations": "Leases granted.",
    "evictions": "Leases ended to make room (reason evicted).",
    "expirations": "Leases that reached their expiry (reason expired).",
    "releases": "Leases released by their holder (reason released).",
    "clears": "Leases ended by clear or drop (reason cleared).",
    "renewals": "Leases renewed.",
    "refusals": "Activations refused FULL.",
}
"""A pool's lifetime counters, once: the state keeps them, the store's ``pools`` row has a
column for each (a test holds the SQL to this), ``Stats``, INFO and /metrics show them."""


class Status(enum.StrEnum):
    """Whether a token is leased right now."""

    AVAILABLE = "available"
    ACTIVE = "active"


@attrs.frozen(slots=True)
class Lease:
    """A user's hold on a token from ``activated_at`` until ``expires_at`` (exclusive).

    ``fence`` is the pool revision that granted the lease. Fences only grow, so
    a resource guarded by tokens can reject a request carrying a smaller fence
    than one it has seen: an evicted holder may still believe it holds the token.
    """

    id: str
    token_id: str
    user_id: str
    fence: int
    activated_at: datetime
    expires_at: datetime


@attrs.frozen(slots=True)
class TokenStatus:
    """One token as ``tokens()`` and ``token()`` report it."""

    id: str
    status: Status
    current_user_id: str | None
    activated_at: datetime | None
    expires_at: datetime | None
    lease_id: str | None = None
    fence: int | None = None


@attrs.frozen(slots=True)
class Usage:
    """An ended lease: one row of the usage history. ``id`` is the lease's id.

    ``revision`` is the pool revision that ended it: unique in the pool, it
    orders the history and is the cursor for the next page (``before=``).
    """

    id: str
    token_id: str
    user_id: str
    started_at: datetime
    ended_at: datetime
    reason: Reason
    revision: int = 0
    fence: int = 0


class Page(list[Usage]):
    """One page of a history, newest first. ``next_before`` is the cursor of the next
    page (pass it as ``before=``), or ``None`` when this page is the last."""

    __slots__ = ("next_before",)

    def __init__(self, items: list[Usage], next_before: int | None) -> None:
        super().__init__(items)
        self.next_before = next_before


@attrs.frozen(slots=True)
class Stats:
    """Counters of the pool since it was created, and the state of its store.

    ``activations`` counts leases granted; the others count leases ended for
    each reason (``clears`` counts leases ended by ``clear()``), so
    ``activations == active + evictions + expirations + releases + clears``
    over the life of a pool (a pool shrunk by ``resize`` counts the leases it
    ended as evictions). ``refusals`` counts activations refused ``FULL``;
    ``waiting`` the callers waiting for a token now.
    """

    size: int
    active: int
    available: int
    revision: int
    activations: int
    evictions: int
    expirations: int
    releases: int
    clears: int
    renewals: int
    refusals: int = 0
    waiting: int = 0
    store: str = "memory"
    durability: str = "none"
    link: str = "memory"
    backlog: int = 0
    last_commit_at: datetime | None = None
    write_lag: float = 0.0


@attrs.frozen(slots=True)
class Event:
    """One change of a pool, as ``Pool.watch()`` delivers it.

    ``kind`` is ``granted``, ``renewed`` or ``ended`` (with ``reason``), or
    ``overflow``: the subscriber read too slowly, ``missed`` events were
    dropped and the stream ends after this one; or (the client library's
    ``watch``, resuming) ``gap``: the events after the last one delivered, up
    to ``revision``, could not be replayed (a restarted server, a pool that moved
    to another node), and the stream goes on after it. ``revision`` is the revision
    that made the change (an activation that evicted gives its ``ended`` and
    ``granted`` events the same revision).
    """

    kind: str
    pool: str
    revision: int
    token_id: str | None = None
    lease_id: str | None = None
    user_id: str | None = None
    fence: int | None = None
    activated_at: datetime | None = None
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    reason: str | None = None
    missed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (times as ISO-8601 strings, absent fields left out)."""
        out: dict[str, Any] = {}
        for field in attrs.fields(Event):
            value = getattr(self, field.name)
            if value is None or (field.name == "missed" and self.kind != "overflow"):
                continue
            if isinstance(value, datetime):
                value = value.isoformat(timespec="microseconds").replace("+00:00", "Z")
            out[field.name] = value
        return out


# -- records to public values (the library's edge) ------------------------------


def lease_value(record: LeaseRecord, token_id: str) -> Lease:
    """A lease record as a ``Lease``."""
    return Lease(
        record[ID],
        token_id,
        record[USER],
        record[FENCE],
        to_datetime(record[START]),
        to_datetime(record[STOP]),
    )


def usage_value(record: EndRecord, token_id: str) -> Usage:
    """An end record as a ``Usage``."""
    return Usage(
        record[ID],
        token_id,
        record[USER],
        to_datetime(record[START]),
        to_datetime(record[STOP]),
        Reason(record[REASON]),
        record[REV],
        record[FENCE],
    )


def token_value(token_id: str, lease: LeaseRecord | None) -> TokenStatus:
    """A token and its lease record (or ``None``) as a ``TokenStatus``."""
    if lease is None:
        return TokenStatus(token_id, Status.AVAILABLE, None, None, None)
    return TokenStatus(
        token_id,
        Status.ACTIVE,
        lease[USER],
        to_datetime(lease[START]),
        to_datetime(lease[STOP]),
        lease[ID],
        lease[FENCE],
    )
