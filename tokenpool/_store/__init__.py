"""Persistent stores: what the write-behind writer needs, and the choice by URL.

A store is blocking code (sync psycopg, stdlib sqlite3) run in a worker
thread by the writer; nothing here touches trio. ``coalesce`` turns a run of
changes into the few set-wise statements a batch needs, so a batch costs a
handful of round trips whatever its size.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import attrs

from .._errors import InvalidArgumentError, TokenPoolError
from .._model import Change, Lease, Renewed, TokensAdded, TokensRemoved, Usage

EPOCH_SHIFT = 40
"""Fences are ``epoch << 40 | n``: each new owner's fences start above every older one's."""


class StoreError(TokenPoolError):
    """The store could not carry out a write (connection lost, timeout): retry later."""

    code = "UNAVAILABLE"


class FencedError(StoreError):
    """Another owner took this pool over (a newer owner epoch): this process must stop writing."""

    code = "LOCKED"


@attrs.frozen
class Snapshot:
    """What recovery loads: tokens in their stable order, active leases oldest first."""

    epoch: int
    tokens: list[tuple[str, datetime]]
    leases: list[Lease]
    repaired: int = 0
    ended: dict[str, int] = attrs.Factory(dict)  # reason -> history rows of this pool


@attrs.define
class Batch:
    """Changes coalesced into set-wise writes, applied in this order in ONE transaction.

    A lease that started and ended inside the batch needs no assignment row,
    only its history row; a lease renewed several times is written once.
    """

    tokens_added: list[tuple[str, datetime]] = attrs.Factory(list)
    users: dict[str, None] = attrs.Factory(dict)
    history: list[Usage] = attrs.Factory(list)
    ended: list[str] = attrs.Factory(list)  # assignment ids to delete
    assignments: dict[str, Lease] = attrs.Factory(dict)  # lease id -> newest version
    available: dict[str, bool] = attrs.Factory(dict)  # token id -> final flag
    tokens_removed: list[str] = attrs.Factory(list)
    changes: int = 0
    fresh: set[str] = attrs.Factory(set)  # leases started inside this batch

    def add(self, changes: list[Change]) -> None:
        """Fold ``changes`` (in the order the pool made them) into the batch."""
        assignments = self.assignments
        available = self.available
        for change in changes:
            kind = type(change)
            if kind is Lease:
                assert isinstance(change, Lease)
                assignments[change.id] = change
                self.fresh.add(change.id)
                available[change.token_id] = False
                self.users[change.user_id] = None
            elif kind is Usage:
                assert isinstance(change, Usage)
                self.history.append(change)
                assignments.pop(change.id, None)
                if change.id not in self.fresh:
                    self.ended.append(change.id)
                available[change.token_id] = True
            elif kind is Renewed:
                assert isinstance(change, Renewed)
                assignments[change.lease.id] = change.lease
            elif kind is TokensAdded:
                assert isinstance(change, TokensAdded)
                self.tokens_added += [(t, change.created_at) for t in change.token_ids]
            elif kind is TokensRemoved:
                assert isinstance(change, TokensRemoved)
                self.tokens_removed += change.token_ids
                for token_id in change.token_ids:
                    available.pop(token_id, None)
        self.changes += len(changes)

    def __bool__(self) -> bool:
        return self.changes > 0


class Store(Protocol):
    """A persistent store. Every method blocks; the writer calls them from one thread."""

    kind: str
    url: str

    def open(self, name: str, ttl: float) -> Snapshot:
        """Apply the schema, take ownership of pool ``name`` (bumping its owner epoch) and load it.

        Raises ``PoolLockedError`` when another process owns the pool.
        """

    def write(self, batch: Batch) -> None:
        """Apply ``batch`` in one transaction, idempotently. Raises ``StoreError``."""

    def history(self, token_id: str, limit: int) -> list[Usage]:
        """The token's newest ``limit`` history rows, newest first (a separate connection)."""

    def close(self) -> None:
        """Release ownership and close connections."""


def open_store(url: str, *, write_timeout: float = 5.0, durability: str = "async") -> Store:
    """The store for ``url``: ``postgresql://...`` or ``sqlite:///path``.

    Raises ``InvalidArgumentError`` for any other URL.
    """
    if not isinstance(url, str):
        raise InvalidArgumentError(f"store must be a URL string or None, not {type(url).__name__}")
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url, write_timeout=write_timeout)
    if url.startswith("sqlite://"):
        from .sqlite import SqliteStore

        # WAL with synchronous=NORMAL survives a process crash; FULL also an OS crash.
        synchronous = "FULL" if durability == "sync" else "NORMAL"
        return SqliteStore(url, write_timeout=write_timeout, synchronous=synchronous)
    raise InvalidArgumentError(
        f"store must be a postgresql:// or sqlite:/// URL, or None for memory only; not {url!r}"
    )
