"""A deliberately naive model of the pool rules: lists and linear scans, no cleverness.

The state machine tests compare ``PoolState`` against it step by step, and the
history checker replays a server's recorded history through it. It speaks the
public values (``Lease``, ``Usage``, datetimes), never the state's records.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from tokenpool._model import Lease, Reason, Usage


class NaivePool:
    def __init__(
        self,
        token_ids: list[str],
        ttl: timedelta,
        ids: Callable[[], str],
        *,
        when_full: str = "evict",
        min_hold: timedelta = timedelta(0),
        max_lifetime: timedelta | None = None,
        revision: int = 1,
    ) -> None:
        self.token_ids = list(token_ids)
        self.free = list(token_ids)  # front = available longest
        self.leases: list[Lease] = []  # activation order
        self.history: list[Usage] = []  # end order
        self.ttl = ttl
        self.ids = ids
        self.when_full = when_full
        self.min_hold = min_hold
        self.max_lifetime = max_lifetime
        self.revision = revision
        self.now: datetime | None = None
        self.waiters: list[list[object]] = []  # [ticket, user, until], arrival order
        self.woken: list[tuple[object, object]] = []  # (ticket, Lease or "FULL")

    def _expiry(self, start: datetime, now: datetime) -> datetime:
        end = now + self.ttl
        if self.max_lifetime is not None:
            end = min(end, start + self.max_lifetime)
        return end

    def advance(self, now: datetime) -> None:
        if self.now is not None and now < self.now:
            now = self.now
        self.now = now
        while True:
            due = [lease for lease in self.leases if lease.expires_at <= now]
            if not due:
                break
            first = min(due, key=lambda lease: (lease.expires_at, lease.fence))
            self._end(first, first.expires_at, Reason.EXPIRED)
            self._serve(first.token_id)
        for waiter in list(self.waiters):
            if waiter[2] <= now:  # type: ignore[operator]
                self.waiters.remove(waiter)
                self.woken.append((waiter[0], "FULL"))

    def _end(
        self, lease: Lease, at: datetime, reason: Reason, revision: int | None = None
    ) -> Usage:
        self.leases.remove(lease)
        if revision is None:
            self.revision += 1
            revision = self.revision
        usage = Usage(
            lease.id,
            lease.token_id,
            lease.user_id,
            lease.activated_at,
            at,
            reason,
            revision,
            lease.fence,
        )
        self.history.append(usage)
        return usage

    def _serve(self, token_id: str) -> None:
        """A token became free: the first waiter gets it, else it joins the free list."""
        while self.waiters:
            ticket, user, _until = self.waiters.pop(0)
            held = self.holder_lease(user)  # type: ignore[arg-type]
            if held is not None:
                self.woken.append((ticket, held))
                continue
            assert self.now is not None
            self.revision += 1
            lease = Lease(
                self.ids(),
                token_id,
                user,  # type: ignore[arg-type]
                self.revision,
                self.now,
                self._expiry(self.now, self.now),
            )
            self.leases.append(lease)
            self.woken.append((ticket, lease))
            for other in [w for w in self.waiters if w[1] == user]:  # the user's other waits
                self.waiters.remove(other)
                self.woken.append((other[0], lease))
            return
        self.free.append(token_id)

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

    def activate(
        self, user_id: str, now: datetime, *, wait: float | None = None, ticket: object = None
    ) -> Lease | str | None:
        """The user's lease; ``"FULL"`` when refused; ``None`` when queued to wait."""
        self.advance(now)
        assert self.now is not None
        held = self.holder_lease(user_id)
        if held is not None:
            return held
        if self.free:
            token_id = self.free.pop(0)
            self.revision += 1
        elif self.when_full == "evict" and self.leases:
            oldest = min(self.leases, key=lambda lease: (lease.activated_at, lease.fence))
            if self.now - oldest.activated_at < self.min_hold:
                return "FULL"
            self.revision += 1
            self._end(oldest, self.now, Reason.EVICTED, self.revision)
            token_id = oldest.token_id
        elif self.when_full == "wait" and wait:
            self.waiters.append([ticket, user_id, self.now + timedelta(seconds=wait)])
            return None
        else:
            return "FULL"
        lease = Lease(
            self.ids(),
            token_id,
            user_id,
            self.revision,
            self.now,
            self._expiry(self.now, self.now),
        )
        self.leases.append(lease)
        return lease

    def cancel(self, ticket: object) -> None:
        self.waiters = [w for w in self.waiters if w[0] is not ticket]

    def release(self, token_id: str, user_id: str | None, now: datetime) -> Usage | str:
        self.advance(now)
        assert self.now is not None
        lease = self.token_lease(token_id)
        if lease is None:
            return "NOTACTIVE"
        if user_id is not None and user_id != lease.user_id:
            return "NOTHOLDER"
        usage = self._end(lease, self.now, Reason.RELEASED)
        self._serve(token_id)
        return usage

    def renew(self, token_id: str, lease_id: str, now: datetime) -> Lease | str:
        self.advance(now)
        assert self.now is not None
        lease = self.token_lease(token_id)
        if lease is None or lease.id != lease_id:
            return "NOTHOLDER"
        expires = self._expiry(lease.activated_at, self.now)
        if self.max_lifetime is not None:
            expires = max(expires, lease.expires_at)
        renewed = Lease(
            lease.id, lease.token_id, lease.user_id, lease.fence, lease.activated_at, expires
        )
        self.leases[self.leases.index(lease)] = renewed
        self.revision += 1
        return renewed

    def clear(self, now: datetime) -> int:
        self.advance(now)
        assert self.now is not None
        count = len(self.leases)
        for lease in list(self.leases):
            self._end(lease, self.now, Reason.CLEARED)
            self._serve(lease.token_id)
        return count

    def history_of(self, token_id: str) -> list[Usage]:
        return [u for u in reversed(self.history) if u.token_id == token_id]

    def history_of_user(self, user_id: str) -> list[Usage]:
        return [u for u in reversed(self.history) if u.user_id == user_id]
