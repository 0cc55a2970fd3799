"""A deliberately naive model of the pool rules: lists and linear scans, no cleverness.

The state machine tests compare ``PoolState`` against it step by step, and the
history checker replays a server's recorded history through it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from .._model import Lease, Reason, Usage


class NaivePool:
    def __init__(self, token_ids: list[str], ttl: timedelta, ids: Callable[[], str]) -> None:
        self.token_ids = list(token_ids)
        self.free = list(token_ids)  # front = available longest
        self.leases: list[Lease] = []  # activation order
        self.history: list[Usage] = []  # end order
        self.ttl = ttl
        self.ids = ids
        self.revision = 1
        self.now: datetime | None = None

    def advance(self, now: datetime) -> None:
        if self.now is not None and now < self.now:
            now = self.now
        self.now = now
        while True:
            due = [lease for lease in self.leases if lease.expires_at <= now]
            if not due:
                return
            first = min(due, key=lambda lease: (lease.expires_at, lease.fence))
            self.revision += 1
            self._end(first, first.expires_at, Reason.EXPIRED)

    def _end(self, lease: Lease, at: datetime, reason: Reason) -> Usage:
        self.leases.remove(lease)
        self.free.append(lease.token_id)
        usage = Usage(lease.id, lease.token_id, lease.user_id, lease.activated_at, at, reason)
        self.history.append(usage)
        return usage

    def holder_lease(self, user_id: str) -> Lease | None:
        for lease in self.leases:
            if lease.user_id == user_id:
                return lease
        return None

    def token_lease(self, token_id: str) -> Lease | None:
        for lease in self.leases:
            if lease.token_id == token_id:
                return lease
        return None

    def activate(self, user_id: str, now: datetime) -> Lease:
        self.advance(now)
        assert self.now is not None
        held = self.holder_lease(user_id)
        if held is not None:
            return held
        if self.free:
            token_id = self.free.pop(0)
        else:
            oldest = min(self.leases, key=lambda lease: (lease.activated_at, lease.fence))
            self._end(oldest, self.now, Reason.EVICTED)
            token_id = self.free.pop()
        self.revision += 1
        lease = Lease(self.ids(), token_id, user_id, self.revision, self.now, self.now + self.ttl)
        self.leases.append(lease)
        return lease

    def release(self, token_id: str, user_id: str | None, now: datetime) -> Usage | str:
        self.advance(now)
        assert self.now is not None
        lease = self.token_lease(token_id)
        if lease is None:
            return "NOTACTIVE"
        if user_id is not None and user_id != lease.user_id:
            return "NOTHOLDER"
        self.revision += 1
        return self._end(lease, self.now, Reason.RELEASED)

    def renew(self, token_id: str, lease_id: str, now: datetime) -> Lease | str:
        self.advance(now)
        assert self.now is not None
        lease = self.token_lease(token_id)
        if lease is None or lease.id != lease_id:
            return "NOTHOLDER"
        renewed = Lease(
            lease.id,
            lease.token_id,
            lease.user_id,
            lease.fence,
            lease.activated_at,
            self.now + self.ttl,
        )
        self.leases[self.leases.index(lease)] = renewed
        self.revision += 1
        return renewed

    def clear(self, now: datetime) -> int:
        self.advance(now)
        assert self.now is not None
        count = len(self.leases)
        if count:
            self.revision += 1
        for lease in list(self.leases):
            self._end(lease, self.now, Reason.CLEARED)
        return count

    def history_of(self, token_id: str) -> list[Usage]:
        return [u for u in reversed(self.history) if u.token_id == token_id]
