"""The library's façade: ``open_pool()`` and the ``Pool`` handle it yields."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar, cast

import attrs
import structlog
import trio

from ._actor import Actor
from ._clock import Clock
from ._errors import InvalidArgumentError, TokenPoolError, UnavailableError
from ._ids import check_uuid
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
from ._store import EPOCH_SHIFT, Batch, Store, StoreError, open_store
from ._writer import Writer

log = structlog.get_logger("tokenpool.pool")

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

    def __init__(
        self,
        actor: Actor,
        *,
        name: str,
        store: Store | None = None,
        writer: Writer | None = None,
        durability: str = "async",
    ) -> None:
        self._actor = actor
        self._store = store
        self._writer = writer
        self.name = name
        self.durability = durability if store is not None else "none"

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
        """The token's ended leases, newest first, at most ``limit`` (1 to 10,000).

        The newest entries come from memory; with a store, older ones are read
        from it (in a worker thread, never in the actor). While the store
        cannot be read, the entries in memory are returned (reads keep working
        through an outage) and a warning is logged. Raises
        ``UnknownTokenError``, ``InvalidArgumentError``.
        """
        recent: list[Usage] = await self._one(GetHistory(token_id, limit), list)
        if self._store is None or len(recent) >= limit:
            return recent
        token_id = check_uuid(token_id, "token_id")
        try:
            stored = await trio.to_thread.run_sync(self._store.history, token_id, limit)
        except StoreError as error:
            log.warning("history_from_memory_only", token_id=token_id, error=str(error))
            return recent
        # Memory holds the token's newest entries in their exact order (leases of one
        # batch can share every timestamp, so times alone cannot order them). From the
        # store take only what ended before the oldest of them: the entries trimmed
        # from memory or from before a restart. Anything newer that the store has by
        # now ended after this read's snapshot and belongs to a later state.
        known = {u.id for u in recent}
        horizon = recent[-1].ended_at if recent else None
        older = sorted(
            (u for u in stored if u.id not in known and (horizon is None or u.ended_at < horizon)),
            key=lambda u: (u.ended_at, u.started_at),
            reverse=True,
        )
        return (recent + older)[:limit]

    async def stats(self) -> Stats:
        """The pool's size, counters and revision, and its store's state."""
        return self.with_store(await self._one(GetStats(), Stats))

    def with_store(self, stats: Stats) -> Stats:
        """``stats`` (from a ``GetStats`` op in a batch) with the store's figures filled in."""
        writer = self._writer
        if writer is None or self._store is None:
            return stats
        return attrs.evolve(
            stats,
            store=self._store.kind,
            durability=self.durability,
            link=writer.link,
            backlog=writer.backlog,
            last_commit_at=writer.last_commit_at,
            write_lag=writer.last_lag,
        )

    async def flush(self) -> None:
        """Wait until every change made so far is committed to the store (no-op in memory).

        Raises ``UnavailableError`` if this process no longer owns the pool.
        """
        if self._writer is not None:
            await self._writer.flush()

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
    max_backlog: int = 100_000,
    flush_interval: float = 0.002,
    write_timeout: float = 5.0,
) -> AsyncIterator[Pool]:
    """Open a pool of ``size`` tokens leased for ``ttl`` seconds; close it on exit.

    ``store`` is where the pool persists: a ``postgresql://`` URL, a
    ``sqlite:///path`` URL, or ``None`` for memory only. With a store, the
    pool is rebuilt from it on open (same token ids, same leases; leases that
    expired meanwhile end ``expired``) and every change is written behind in
    batches. ``durability="async"`` answers callers at once (a change is
    committed within about ``flush_interval`` plus one write);
    ``"sync"`` answers only once the change has committed.

    The actor (and the writer) run in a nursery owned by this context manager;
    on exit it stops taking requests, answers those queued, flushes the store
    and closes it. Raises ``InvalidArgumentError`` for a bad setting,
    ``PoolLockedError`` when another process owns the pool, ``UnavailableError``
    when the store cannot be reached.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError(f"size must be a positive integer, not {size!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise InvalidArgumentError(f"ttl must be a positive number of seconds, not {ttl!r}")
    if durability not in ("async", "sync"):
        raise InvalidArgumentError(f"durability must be 'async' or 'sync', not {durability!r}")
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
        raise InvalidArgumentError(f"name must be 1 to 64 printable characters, not {name!r}")
    if isinstance(history_limit, bool) or not isinstance(history_limit, int) or history_limit < 1:
        raise InvalidArgumentError(
            f"history_limit must be a positive integer, not {history_limit!r}"
        )
    clock = clock or Clock()
    clock.start()
    backend = (
        open_store(store, write_timeout=write_timeout, durability=durability) if store else None
    )
    writer: Writer | None = None
    if backend is None:
        state = PoolState(ttl=float(ttl), history_limit=history_limit)
        state.resize(size, clock.now())
    else:
        state = await _recover(backend, name, size, float(ttl), history_limit, clock)
        writer = Writer(
            backend,
            now=clock.now,
            max_backlog=max_backlog,
            flush_interval=flush_interval if durability == "async" else 0.0,
            write_timeout=write_timeout,
        )
    if size >= LARGE_POOL:
        # Move the token maps to the GC's permanent generation: full collections
        # would otherwise rescan a million entries that are never garbage.
        gc.freeze()
    if writer is not None:
        writer.committed_fence = state.revision  # everything recovered is committed
    actor = Actor(state, clock, writer=writer, sync=durability == "sync", queue_size=queue_size)
    pool = Pool(actor, name=name, store=backend, writer=writer, durability=durability)
    try:
        async with trio.open_nursery() as nursery:
            if writer is not None:
                await nursery.start(writer.run)

            async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                await actor.run(task_status=task_status)
                if writer is not None:
                    await writer.close()  # after the actor: its last changes are queued

            await nursery.start(serve)
            try:
                yield pool
            finally:
                actor.close()
    except BaseExceptionGroup as group:
        raise _single(group) from None
    finally:
        if backend is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(backend.close)


async def _recover(
    store: Store, name: str, size: int, ttl: float, history_limit: int, clock: Clock
) -> PoolState:
    """Rebuild the pool from its store; commit what recovery changed before serving."""
    started = trio.current_time()
    try:
        snapshot = await trio.to_thread.run_sync(store.open, name, ttl)
    except StoreError as error:
        raise UnavailableError(str(error)) from None
    state = PoolState(ttl=ttl, history_limit=history_limit, revision=snapshot.epoch << EPOCH_SHIFT)
    state.restore_tokens(snapshot.tokens)
    for lease in snapshot.leases:
        state.restore_lease(lease)
    state.restore_counters(snapshot.ended)
    now = clock.now()
    changes = state.advance(now)  # leases that expired while we were down
    expired = len(changes)
    changes += state.resize(size, now)
    if changes:
        batch = Batch()
        batch.add(changes)
        try:
            await trio.to_thread.run_sync(store.write, batch)
        except StoreError as error:
            await trio.to_thread.run_sync(store.close)
            raise UnavailableError(str(error)) from None
    log.info(
        "pool_recovered",
        pool=name,
        store=store.url,
        epoch=snapshot.epoch,
        tokens=state.size,
        leases=len(snapshot.leases) - expired,
        expired_while_down=expired,
        flags_repaired=snapshot.repaired,
        seconds=round(trio.current_time() - started, 3),
    )
    return state


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, else the group itself.

    trio's nurseries wrap even a lone exception in a group; a library user who
    raised ``KeyError`` inside ``async with open_pool()`` should get ``KeyError``.
    """
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
