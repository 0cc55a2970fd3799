"""The pool as a pure state machine: the lease rules, with no I/O and no clock.

Every operation that changes the pool takes ``now`` and returns its result
with the list of changes it made (for the write-behind store). Reads see the
pool as of the last call that took a ``now``; the actor calls ``advance(now)``
before each batch so reads are never stale by more than that.

The rules:

1. ``activate(user)``: a user who holds a lease gets that same lease back,
   unchanged. Otherwise the token that has been available the longest is
   leased (FIFO). With no token available, the lease with the oldest
   ``activated_at`` ends ``evicted`` and its token goes to the new user.
2. A lease covers ``[activated_at, expires_at)``: at ``expires_at`` it ends
   ``expired``, and its usage's ``ended_at`` is exactly ``expires_at``
   whenever the pool notices.
3. ``release`` ends a lease ``released``; ``clear`` ends every lease
   ``cleared``; ``renew`` moves a current lease's ``expires_at`` to
   ``now + ttl``. Nothing extends a lease by itself.
4. ``revision`` grows by one for every operation that changes the pool and
   for every lease that expires. A lease's ``fence`` is the revision that
   granted it, so fences are unique and only grow.
5. Every operation costs O(1) or O(log n) in the pool size: available tokens
   are an insertion-ordered map (oldest first), leases an insertion-ordered
   map in activation order (``now`` never goes back, so insertion order is
   activation order), deadlines a heap with lazy deletion, compacted when
   stale entries outnumber live ones.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from ._errors import (
    InvalidArgumentError,
    NotActiveError,
    NotHolderError,
    UnavailableError,
    UnknownTokenError,
)
from ._ids import check_user_id, check_uuid, new_id
from ._model import (
    Change,
    Lease,
    Reason,
    Renewed,
    Stats,
    Status,
    TokensAdded,
    TokensRemoved,
    TokenStatus,
    Usage,
)

HISTORY_LIMIT_MAX = 10_000
"""The most history entries one ``history()`` call returns."""

_EXPIRED = Reason.EXPIRED
_EVICTED = Reason.EVICTED


class PoolState:
    """The authoritative data of one pool. Not thread- or task-safe: one owner."""

    def __init__(
        self,
        *,
        ttl: float,
        history_limit: int = 1000,
        revision: int = 0,
        ids: Callable[[], str] = new_id,
    ) -> None:
        if not ttl > 0:
            raise InvalidArgumentError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if history_limit < 1:
            raise InvalidArgumentError(f"history_limit must be at least 1, not {history_limit!r}")
        self.ttl = timedelta(seconds=ttl)
        self.history_limit = history_limit
        self.revision = revision
        self._ids = ids
        self._now: datetime | None = None
        self._expires = datetime.min  # now + ttl for the current ``now``, computed once
        # token id -> created_at, in creation order (the stable order of tokens()).
        self._tokens: dict[str, datetime] = {}
        self._available: OrderedDict[str, None] = OrderedDict()
        # token id -> its current lease, oldest activation first.
        self._leases: OrderedDict[str, Lease] = OrderedDict()
        self._by_user: dict[str, Lease] = {}
        # (expires_at, fence, token_id, lease_id); an entry is live only while
        # that lease is current with that expires_at.
        self._deadlines: list[tuple[datetime, int, str, str]] = []
        # token id -> its ended leases, oldest first; created on a token's first
        # ended lease (a million idle tokens cost no lists) and trimmed in steps
        # to the newest ``history_limit`` entries (amortised O(1) per append).
        self._history: dict[str, list[Usage]] = {}
        self._history_trim = history_limit + max(1, history_limit // 4)
        self.activations = 0
        self.evictions = 0
        self.expirations = 0
        self.releases = 0
        self.clears = 0
        self.renewals = 0

    # -- time ---------------------------------------------------------------

    def _tick(self, now: datetime, changes: list[Change]) -> datetime:
        """Move the pool's time to ``now`` (never back) and end every lease due by then."""
        if now is not self._now:
            last = self._now
            if last is not None and now < last:
                now = last
            else:
                self._now = now
                self._expires = now + self.ttl
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            expires_at, _fence, token_id, lease_id = heapq.heappop(deadlines)
            lease = self._leases.get(token_id)
            if lease is not None and lease.id == lease_id and lease.expires_at == expires_at:
                self.revision += 1
                self.expirations += 1
                changes.append(self._end(lease, expires_at, _EXPIRED))
        return now

    def advance(self, now: datetime) -> list[Change]:
        """End every lease whose ``expires_at`` is at or before ``now``."""
        changes: list[Change] = []
        self._tick(now, changes)
        return changes

    def next_deadline(self) -> datetime | None:
        """When the next lease expires (``None`` if none is active): the actor's one timer."""
        deadlines = self._deadlines
        while deadlines:
            expires_at, _fence, token_id, lease_id = deadlines[0]
            lease = self._leases.get(token_id)
            if lease is not None and lease.id == lease_id and lease.expires_at == expires_at:
                return expires_at
            heapq.heappop(deadlines)
        return None

    # -- tokens ---------------------------------------------------------------

    def add_tokens(self, token_ids: Iterable[str], now: datetime) -> list[Change]:
        """Add tokens (available, behind those already available)."""
        added: list[str] = []
        for raw in token_ids:
            token_id = check_uuid(raw, "token_id")
            if token_id in self._tokens:
                raise InvalidArgumentError(f"token {token_id} is already in the pool")
            self._tokens[token_id] = now
            self._available[token_id] = None
            added.append(token_id)
        if not added:
            return []
        self.revision += 1
        return [TokensAdded(tuple(added), now)]

    def restore_tokens(self, tokens: Iterable[tuple[str, datetime]]) -> None:
        """Put back tokens loaded from the store (recovery), in their stable order."""
        for token_id, created_at in tokens:
            self._tokens[check_uuid(token_id, "token_id")] = created_at
            self._available[token_id] = None

    def resize(self, size: int, now: datetime) -> list[Change]:
        """Grow or shrink the pool to ``size`` tokens.

        Growing mints new tokens. Shrinking removes available tokens first
        (the most recently freed ones), then ends the oldest leases
        (``evicted``) and removes their tokens.
        """
        if size < 1:
            raise InvalidArgumentError(f"size must be at least 1, not {size!r}")
        changes: list[Change] = []
        self._tick(now, changes)
        missing = size - len(self._tokens)
        if missing > 0:
            # Sorted: the stores load tokens in (created_at, id) order, so the
            # order of tokens() is the same before and after a restart.
            changes += self.add_tokens(sorted(self._ids() for _ in range(missing)), now)
        elif missing < 0:
            removed: list[str] = []
            while len(self._tokens) - len(removed) > size and self._available:
                removed.append(self._available.popitem(last=True)[0])
            while len(self._tokens) - len(removed) > size:
                token_id, lease = next(iter(self._leases.items()))
                self.evictions += 1
                changes.append(self._end(lease, now, _EVICTED))
                del self._available[token_id]
                removed.append(token_id)
            for token_id in removed:
                del self._tokens[token_id]
                self._history.pop(token_id, None)
            self.revision += 1
            changes.append(TokensRemoved(tuple(removed)))
        return changes

    def restore_lease(self, lease: Lease) -> None:
        """Put back a lease loaded from the store (recovery). Load them oldest first.

        The caller ends the leases that expired meanwhile with ``advance(now)``.
        """
        token_id = lease.token_id
        if token_id not in self._tokens:
            raise UnknownTokenError(f"token {token_id} of lease {lease.id} is not in the pool")
        if token_id in self._leases or lease.user_id in self._by_user:
            raise InvalidArgumentError(f"lease {lease.id} collides with a lease already restored")
        del self._available[token_id]
        self._grant(lease)
        self.revision = max(self.revision, lease.fence)

    def restore_counters(self, ended: dict[str, int]) -> None:
        """Put back the lifetime counters from the store's history (``renewals`` is not kept)."""
        self.expirations = ended.get(Reason.EXPIRED, 0)
        self.evictions = ended.get(Reason.EVICTED, 0)
        self.releases = ended.get(Reason.RELEASED, 0)
        self.clears = ended.get(Reason.CLEARED, 0)
        self.activations = len(self._leases) + sum(ended.values())

    # -- operations that change the pool ------------------------------------

    def activate(self, user_id: str, now: datetime) -> tuple[Lease, list[Change]]:
        """Lease a token to ``user_id`` (rule 1). Raises ``InvalidArgumentError``."""
        changes: list[Change] = []
        now = self._tick(now, changes)
        return self._activate(user_id, now, changes), changes

    def activate_many(
        self, user_ids: Iterable[str], now: datetime
    ) -> tuple[list[Lease | InvalidArgumentError], list[Change]]:
        """``activate`` for each user in order; a malformed user id yields its error."""
        changes: list[Change] = []
        now = self._tick(now, changes)
        results: list[Lease | InvalidArgumentError] = []
        activate = self._activate
        for user_id in user_ids:
            try:
                results.append(activate(user_id, now, changes))
            except InvalidArgumentError as error:
                results.append(error)
        return results, changes

    def _activate(self, user_id: str, now: datetime, changes: list[Change]) -> Lease:
        # The hot path of the whole service, hence inlined by hand.
        by_user = self._by_user
        if type(user_id) is str:
            held = by_user.get(user_id)
            if held is not None:
                return held  # a key of _by_user was checked when it was granted
        check_user_id(user_id)
        leases = self._leases
        if self._available:
            token_id = self._available.popitem(last=False)[0]
        elif leases:
            token_id, oldest = leases.popitem(last=False)
            del by_user[oldest.user_id]
            usage = Usage(oldest.id, token_id, oldest.user_id, oldest.activated_at, now, _EVICTED)
            history = self._history.get(token_id)
            if history is None or len(history) >= self._history_trim:
                self._remember(usage)
            else:
                history.append(usage)
            changes.append(usage)
            self.evictions += 1
        else:
            raise UnavailableError("the pool has no tokens")
        self.revision = fence = self.revision + 1
        self.activations += 1
        expires_at = self._expires
        lease_id = self._ids()
        lease = Lease(lease_id, token_id, user_id, fence, now, expires_at)
        leases[token_id] = lease
        by_user[user_id] = lease
        deadlines = self._deadlines
        heapq.heappush(deadlines, (expires_at, fence, token_id, lease_id))
        if len(deadlines) > 2 * len(leases) + 64:
            self._compact_deadlines()
        changes.append(lease)
        return lease

    def release(
        self, token_id: str, user_id: str | None, now: datetime
    ) -> tuple[Usage, list[Change]]:
        """End the token's lease ``released``.

        Raises ``UnknownTokenError``, ``NotActiveError`` (no lease), ``NotHolderError``
        (``user_id`` given and not the holder), ``InvalidArgumentError``.
        """
        token_id = self._token_id(token_id)
        if user_id is not None:
            check_user_id(user_id)
        changes: list[Change] = []
        now = self._tick(now, changes)
        lease = self._leases.get(token_id)
        if lease is None:
            raise NotActiveError(f"token {token_id} is not active")
        if user_id is not None and lease.user_id != user_id:
            raise NotHolderError(f"user {user_id!r} does not hold token {token_id}")
        self.revision += 1
        self.releases += 1
        usage = self._end(lease, now, Reason.RELEASED)
        changes.append(usage)
        return usage, changes

    def release_lease(self, token_id: str, lease_id: str, now: datetime) -> list[Change]:
        """End that exact lease ``released`` if it is still current; else do nothing.

        The undo for a grant whose caller was cancelled before it saw the reply.
        """
        changes: list[Change] = []
        now = self._tick(now, changes)
        lease = self._leases.get(token_id)
        if lease is not None and lease.id == lease_id:
            self.revision += 1
            self.releases += 1
            changes.append(self._end(lease, now, Reason.RELEASED))
        return changes

    def renew(self, token_id: str, lease_id: str, now: datetime) -> tuple[Lease, list[Change]]:
        """Move the lease's ``expires_at`` to ``now + ttl``.

        Raises ``NotHolderError`` when that lease is not the token's current one
        (it ended, or another lease replaced it), ``UnknownTokenError``,
        ``InvalidArgumentError``.
        """
        lease_id = check_uuid(lease_id, "lease_id")
        token_id = self._token_id(token_id)
        changes: list[Change] = []
        now = self._tick(now, changes)
        lease = self._leases.get(token_id)
        if lease is None or lease.id != lease_id:
            raise NotHolderError(f"lease {lease_id} is not the current lease of token {token_id}")
        renewed = Lease(
            lease.id, token_id, lease.user_id, lease.fence, lease.activated_at, self._expires
        )
        # Replace in place: renewing keeps the lease's place in activation order.
        self._leases[token_id] = renewed
        self._by_user[lease.user_id] = renewed
        self._push_deadline(renewed)
        self.revision += 1
        self.renewals += 1
        changes.append(Renewed(renewed))
        return renewed, changes

    def clear(self, now: datetime) -> tuple[int, list[Change]]:
        """End every active lease ``cleared``; return how many."""
        changes: list[Change] = []
        now = self._tick(now, changes)
        count = len(self._leases)
        if count:
            self.revision += 1
            self.clears += count
            for lease in list(self._leases.values()):
                changes.append(self._end(lease, now, Reason.CLEARED))
        return count, changes

    # -- reads ------------------------------------------------------------------

    def validate(self, token_id: str, lease_id: str) -> bool:
        """Whether that lease is the token's current one. Raises ``UnknownTokenError``."""
        lease_id = check_uuid(lease_id, "lease_id")
        token_id = self._token_id(token_id)
        lease = self._leases.get(token_id)
        return lease is not None and lease.id == lease_id

    def tokens(self) -> list[TokenStatus]:
        """Every token, in creation order."""
        leases = self._leases
        return [self._status(token_id, leases.get(token_id)) for token_id in self._tokens]

    def token(self, token_id: str) -> TokenStatus:
        """One token's status. Raises ``UnknownTokenError``, ``InvalidArgumentError``."""
        token_id = self._token_id(token_id)
        return self._status(token_id, self._leases.get(token_id))

    def lease_of(self, user_id: str) -> Lease | None:
        """The user's active lease, or ``None``."""
        return self._by_user.get(check_user_id(user_id))

    def history(self, token_id: str, limit: int = 100) -> list[Usage]:
        """The token's ended leases kept in memory, newest first, at most ``limit``."""
        check_limit(limit)
        token_id = self._token_id(token_id)
        history = self._history.get(token_id, ())
        count = min(limit, len(history), self.history_limit)
        return [history[-1 - i] for i in range(count)]

    def history_kept(self, token_id: str) -> int:
        """How many entries of the token's history are in memory (the rest are in the store)."""
        kept = len(self._history.get(self._token_id(token_id), ()))
        return min(kept, self.history_limit)

    def leases(self) -> list[Lease]:
        """Every active lease, oldest activation first."""
        return list(self._leases.values())

    def token_ids(self) -> list[str]:
        """Every token id, in creation order."""
        return list(self._tokens)

    def stats(self) -> Stats:
        """The pool's counters."""
        return Stats(
            size=len(self._tokens),
            active=len(self._leases),
            available=len(self._available),
            revision=self.revision,
            activations=self.activations,
            evictions=self.evictions,
            expirations=self.expirations,
            releases=self.releases,
            clears=self.clears,
            renewals=self.renewals,
        )

    @property
    def size(self) -> int:
        return len(self._tokens)

    # -- internals --------------------------------------------------------------

    def _token_id(self, token_id: str) -> str:
        if token_id in self._tokens:
            return token_id
        token_id = check_uuid(token_id, "token_id")
        if token_id not in self._tokens:
            raise UnknownTokenError(f"no token {token_id} in this pool")
        return token_id

    def _grant(self, lease: Lease) -> None:
        self._leases[lease.token_id] = lease
        self._by_user[lease.user_id] = lease
        self._push_deadline(lease)

    def _push_deadline(self, lease: Lease) -> None:
        deadlines = self._deadlines
        heapq.heappush(deadlines, (lease.expires_at, lease.fence, lease.token_id, lease.id))
        if len(deadlines) > 2 * len(self._leases) + 64:
            self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        # Stale entries (ended or renewed leases) outnumber live ones: rebuild
        # from the live leases, O(n) once per n pushes.
        self._deadlines = [
            (lease.expires_at, lease.fence, lease.token_id, lease.id)
            for lease in self._leases.values()
        ]
        heapq.heapify(self._deadlines)

    def _end(self, lease: Lease, ended_at: datetime, reason: Reason) -> Usage:
        token_id = lease.token_id
        del self._leases[token_id]
        del self._by_user[lease.user_id]
        self._available[token_id] = None
        usage = Usage(lease.id, token_id, lease.user_id, lease.activated_at, ended_at, reason)
        self._remember(usage)
        return usage

    def _remember(self, usage: Usage) -> None:
        history = self._history.get(usage.token_id)
        if history is None:
            self._history[usage.token_id] = [usage]
            return
        history.append(usage)
        if len(history) > self._history_trim:
            del history[: -self.history_limit]

    @staticmethod
    def _status(token_id: str, lease: Lease | None) -> TokenStatus:
        if lease is None:
            return TokenStatus(token_id, Status.AVAILABLE, None, None, None)
        return TokenStatus(
            token_id, Status.ACTIVE, lease.user_id, lease.activated_at, lease.expires_at
        )


def check_limit(limit: object) -> int:
    """Return ``limit`` if it is a valid history limit, else raise ``InvalidArgumentError``."""
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise InvalidArgumentError(f"limit must be an integer, not {type(limit).__name__}")
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise InvalidArgumentError(f"limit must be from 1 to {HISTORY_LIMIT_MAX}, not {limit}")
    return limit
