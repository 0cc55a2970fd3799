"""The library's façade: ``open_pool()`` and the ``Pool`` handle it yields."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar, cast

import trio

from ._actor import Actor
from ._clock import Clock
from ._errors import InvalidArgumentError, TokenPoolError
from ._ids import new_id
from ._model import Lease, Stats, TokenStatus, Usage
from ._ops import (
    Activate,
    ActivateMany,
    Clear,
    GetHistory,
    GetLease,
    GetStats,
    GetToken,
    GetTokens,
    Op,
    Release,
    Renew,
    Validate,
)
from ._state import PoolState

T = TypeVar("T")

DEFAULT_SIZE = 100
DEFAULT_TTL = 120.0
LARGE_POOL = 100_000


class Pool:
    """A handle on a running pool. Safe to use from any number of trio tasks.

    Every method is one round trip through the pool's actor. Methods raise
    ``InvalidArgumentError`` for malformed arguments and ``UnavailableError``
    once the pool is closed.
    """

    def __init__(self, actor: Actor, *, name: str) -> None:
        self._actor = actor
        self.name = name

    async def _one(self, op: Op, kind: type[T]) -> T:
        (result,) = await self._actor.call((op,))
        if isinstance(result, BaseException):
            raise result
        return cast(T, result)

    async def activate(self, user_id: str) -> Lease:
        """Lease a token to ``user_id``, or return the lease the user already holds.

        When every token is held, the oldest lease is evicted to make room.
        Raises ``UnavailableError`` while the store's backlog is full.
        """
        return await self._one(Activate(user_id), Lease)

    async def release(self, token_id: str, user_id: str | None = None) -> Usage:
        """End the token's lease (reason ``released``) and return its history entry.

        Raises ``UnknownTokenError``, ``NotActiveError`` when the token is not
        leased, ``NotHolderError`` when ``user_id`` is given and does not hold it.
        """
        return await self._one(Release(token_id, user_id), Usage)

    async def renew(self, token_id: str, lease_id: str) -> Lease:
        """Push the lease's ``expires_at`` to now + ttl.

        Raises ``NotHolderError`` when that lease is no longer the token's current one.
        """
        return await self._one(Renew(token_id, lease_id), Lease)

    async def validate(self, token_id: str, lease_id: str) -> bool:
        """Whether ``lease_id`` is the token's current lease. Raises ``UnknownTokenError``."""
        return await self._one(Validate(token_id, lease_id), bool)

    async def clear(self) -> int:
        """End every active lease (reason ``cleared``); return how many ended."""
        return await self._one(Clear(), int)

    async def tokens(self) -> list[TokenStatus]:
        """Every token's status, in a stable order (creation order)."""
        return await self._one(GetTokens(), list)

    async def token(self, token_id: str) -> TokenStatus:
        """One token's status. Raises ``UnknownTokenError``."""
        return await self._one(GetToken(token_id), TokenStatus)

    async def lease_of(self, user_id: str) -> Lease | None:
        """The user's active lease, or ``None``."""
        return cast("Lease | None", await self._one(GetLease(user_id), object))

    async def history(self, token_id: str, limit: int = 100) -> list[Usage]:
        """The token's ended leases, newest first, at most ``limit`` (1 to 10,000)."""
        return await self._one(GetHistory(token_id, limit), list)

    async def stats(self) -> Stats:
        """The pool's size, counters and revision."""
        return await self._one(GetStats(), Stats)

    async def batch(self, ops: Sequence[Op]) -> list[object]:
        """Apply many operations in one trip through the actor, in order.

        Returns one entry per op: its result, or the ``TokenPoolError`` it
        raised (the other ops still run, as in a Redis pipeline).
        """
        if not ops:
            return []
        return await self._actor.call(list(ops))

    async def activate_many(self, user_ids: Sequence[str]) -> list[Lease | TokenPoolError]:
        """``activate`` for each user in one trip through the actor (the fastest path).

        A malformed user id yields its ``InvalidArgumentError`` in place of a
        lease. Raises ``UnavailableError`` while the store's backlog is full.
        """
        if not user_ids:
            return []
        return await self._one(ActivateMany(tuple(user_ids)), list)


@asynccontextmanager
async def open_pool(
    size: int = DEFAULT_SIZE,
    ttl: float = DEFAULT_TTL,
    *,
    name: str = "default",
    store: str | None = None,
    durability: str = "async",
    history_limit: int = 1000,
    clock: Clock | None = None,
    queue_size: int = 4096,
) -> AsyncIterator[Pool]:
    """Open a pool of ``size`` tokens leased for ``ttl`` seconds; close it on exit.

    ``store`` is where the pool persists (``None``: memory only). The actor
    runs in a nursery owned by this context manager; on exit it stops taking
    requests, answers those already queued and stops.
    Raises ``InvalidArgumentError`` for a bad setting.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError(f"size must be a positive integer, not {size!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise InvalidArgumentError(f"ttl must be a positive number of seconds, not {ttl!r}")
    if durability not in ("async", "sync"):
        raise InvalidArgumentError(f"durability must be 'async' or 'sync', not {durability!r}")
    if store is not None:
        raise InvalidArgumentError("persistent stores are not available yet; use store=None")
    clock = clock or Clock()
    clock.start()
    state = PoolState(ttl=float(ttl), history_limit=history_limit)
    state.add_tokens((new_id() for _ in range(size)), clock.now())
    if size >= LARGE_POOL:
        # Move the token maps to the GC's permanent generation: full collections
        # would otherwise rescan a million entries that are never garbage.
        gc.freeze()
    actor = Actor(state, clock, queue_size=queue_size)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            try:
                yield Pool(actor, name=name)
            finally:
                actor.close()
    except BaseExceptionGroup as group:
        raise _single(group) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, else the group itself.

    trio's nurseries wrap even a lone exception in a group; a library user who
    raised ``KeyError`` inside ``async with open_pool()`` should get ``KeyError``.
    """
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
