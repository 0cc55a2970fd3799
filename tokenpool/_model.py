"""Value classes the pool hands out, and the changes it emits for the store.

All are frozen attrs classes: a ``Lease`` returned to one caller can be shared
with the writer and with other callers without copying.
"""

from __future__ import annotations

import enum
from datetime import datetime

import attrs


class Reason(enum.StrEnum):
    """Why a lease ended; stored with every usage-history entry."""

    EXPIRED = "expired"
    EVICTED = "evicted"
    RELEASED = "released"
    CLEARED = "cleared"


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


@attrs.frozen(slots=True)
class Usage:
    """An ended lease: one row of a token's usage history. ``id`` is the lease's id."""

    id: str
    token_id: str
    user_id: str
    started_at: datetime
    ended_at: datetime
    reason: Reason


@attrs.frozen(slots=True)
class Stats:
    """Counters of the pool since it was created, and the state of its store.

    ``activations`` counts leases granted; the others count leases ended for
    each reason (``clears`` counts leases ended by ``clear()``), so
    ``activations == active + evictions + expirations + releases + clears``
    over the life of a pool (a pool shrunk by ``resize`` counts the leases it
    ended as evictions).
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
    store: str = "memory"
    durability: str = "none"
    link: str = "memory"
    backlog: int = 0
    last_commit_at: datetime | None = None
    write_lag: float | None = None


# -- changes: what the state emits for the write-behind store ---------------
# A ``Lease`` in a change list means "granted", a ``Usage`` means "ended":
# the values themselves, with no wrapper, since every activation makes them.


@attrs.frozen(slots=True)
class Renewed:
    """A lease's ``expires_at`` moved; ``lease`` is the lease as it is now."""

    lease: Lease


@attrs.frozen(slots=True)
class TokensAdded:
    """Tokens were created (a new pool, or one that grew)."""

    token_ids: tuple[str, ...]
    created_at: datetime


@attrs.frozen(slots=True)
class TokensRemoved:
    """Tokens were taken out of the pool (it shrank). Their history stays in the store."""

    token_ids: tuple[str, ...]


Change = Lease | Usage | Renewed | TokensAdded | TokensRemoved
