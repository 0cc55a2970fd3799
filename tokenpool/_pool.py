"""The library's façade: ``open_pool()``, ``open_pools()`` and the ``Pool`` handle.

A ``Pools`` serves any number of named pools from one trio nursery: each pool
has its own actor, its own write-behind queue and its own ownership in the
store; pools on one store share one store process and one reader.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, cast

import attrs
import trio

from ._actor import Actor, ActorStatistics
from ._clock import Clock
from ._errors import (
    ExistsError,
    InvalidArgumentError,
    NotKeptError,
    TokenPoolError,
    UnavailableError,
    UnknownPoolError,
    lone_error,
)
from ._events import EventHub, Subscription
from ._ids import check_user_id, uuid_bytes, uuid_text
from ._log import get_logger
from ._model import (
    GRANT,
    SLOT,
    EndRecord,
    Lease,
    Page,
    Stats,
    TokenStatus,
    Usage,
    lease_value,
    to_datetime,
    usage_value,
)
from ._ops import (
    END_STEP,
    Activate,
    ActivateMany,
    Clear,
    GetHistory,
    GetLease,
    GetStats,
    GetToken,
    GetTokens,
    GetUserHistory,
    Op,
    Release,
    Renew,
    Revision,
    Validate,
)
from ._settings import (
    CURSOR,
    DEFAULT_FLUSH_INTERVAL,
    FLUSH_INTERVAL,
    HISTORY_LIMIT,
    HISTORY_MEMORY,
    LOCK_WAIT,
    MAX_BACKLOG,
    MAX_TOKENS,
    PAGE_COUNT,
    QUEUE_SIZE,
    REVISION,
    SHUTDOWN_TIMEOUT,
    TOKENS_MAX,
    WAIT,
    WRITE_TIMEOUT,
    PoolSettings,
    check_choice,
    check_int,
    check_listing,
    check_name,
)
from ._state import PoolState
from ._store import (
    EPOCH_SHIFT,
    OWNERSHIP_VALIDITY,
    Reader,
    Snapshot,
    StoreError,
    check_store_url,
    open_reader,
)
from ._store.analytics import REPORT_TIMEOUT, Analyst, open_analyst
from ._store.link import StoreLink
from ._writer import Writer, WriterStatistics

log = get_logger("tokenpool.pool")

DEFAULT_SIZE = 100
DEFAULT_TTL = 120.0
LARGE_POOL = 100_000
GROW_STEP = 2_000
"""Tokens a running pool grows by per actor batch (create and alter at run time)."""


@attrs.frozen
class PoolStatistics:
    """Everything measured about one pool: what benchmarks, ``INFO`` and ``/metrics`` read."""

    name: str
    settings: PoolSettings
    stats: Stats
    actor: ActorStatistics
    writer: WriterStatistics | None
    subscribers: int
    events_logged: int
    oldest_event: int  # the oldest revision whose events a watch(since=...) can replay


class _Op(Op):
    """Configure, EndAll: admin ops the façade sends."""

    changes = True


class _Configure(_Op):
    __slots__ = ("settings",)

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings

    def apply(self, state: PoolState, now: int) -> Any:
        state.configure(self.settings, now)


class _EndAll(_Op):
    __slots__ = ()

    def apply(self, state: PoolState, now: int) -> Any:
        return state.end_all(now)


class PoolCore:
    """What a served pool is: its actor, its events, its write-behind and its store reader.

    The library's ``Pool`` and the command layer (every transport) are both built on
    it; neither reaches past it. It speaks in the state's own values (records, slots):
    ``Pool`` turns them into public values, the drivers into replies.
    """

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        actor: Actor,
        hub: EventHub,
        *,
        writer: Writer | None,
        link: StoreLink | None,
        reader: Reader | None,
        durability: str,
        write_timeout: float,
    ) -> None:
        self.name = name
        self.settings = settings
        self.actor = actor
        self.hub = hub
        self.writer = writer
        self.link = link
        self.reader = reader
        self.durability = durability if writer is not None else "none"
        self.write_timeout = write_timeout
        self.closed = False
        self.names = actor.state.token_text  # slot -> token id

    @property
    def size(self) -> int:
        return self.actor.state.size

    async def call(self, ops: Sequence[Op], trace: list[Any] | None = None) -> list[object]:
        """Apply ``ops`` in one actor batch: a result (the state's own value) or an error
        each. ``trace``: the span contexts of the commands they carry (``_trace``)."""
        return await self.actor.call(ops, trace)

    async def one(self, op: Op, *, last: bool = False) -> Any:
        """Apply one op; ``last``: as the actor's last message (nothing sent later is
        applied). Raises the op's error."""
        actor = self.actor
        (result,) = await (actor.call_last((op,)) if last else actor.call((op,)))
        if isinstance(result, BaseException):
            raise result
        return result

    async def complete_history(
        self,
        result: tuple[list[EndRecord], int],
        token_id: str | None,
        user_id: str | None,
        limit: int,
    ) -> Page:
        """Complete a history page read from memory (at its place in a batch) from the store.

        Only entries older than everything memory returned (or memory's floor)
        are taken from the store, so the page is one consistent snapshot even
        when more leases ended since.
        """
        entries, store_before = result
        names = self.names
        page = [usage_value(r, names(r[SLOT])) for r in entries]
        if store_before and self.reader is not None and len(page) < limit:
            assert self.writer is not None
            try:
                if not await self.writer.wait_committed(store_before - 1, self.write_timeout):
                    raise StoreError("the older entries are not committed to the store yet")
                if token_id is not None:
                    token = uuid_text(uuid_bytes(token_id, "token_id"))
                    rows = await trio.to_thread.run_sync(
                        self.reader.history, self.name, token, store_before, limit - len(page)
                    )
                else:
                    assert user_id is not None
                    rows = await trio.to_thread.run_sync(
                        self.reader.user_history,
                        self.name,
                        check_user_id(user_id),
                        store_before,
                        limit - len(page),
                    )
            except StoreError as error:
                if not page:
                    raise UnavailableError(f"history: {error}") from None
                log.warning("history_page_short", pool=self.name, error=str(error))
                return Page(page, page[-1].revision)  # the rest can be read later
            page += rows
        return Page(page, page[-1].revision if len(page) >= limit else None)

    def with_store(self, stats: Stats) -> Stats:
        """``stats`` (from a ``GetStats`` op in a batch) with the store's figures filled in."""
        writer = self.writer
        if writer is None or self.link is None:
            return stats
        committed = writer.last_commit_at_us
        return attrs.evolve(
            stats,
            store=self.link.kind,
            durability=self.durability,
            link=writer.state,
            backlog=writer.backlog,
            last_commit_at=None if committed is None else to_datetime(committed),
            write_lag=writer.write_lag,
        )

    def stats_now(self) -> Stats:
        """The pool's ``Stats`` now, its store's included (no await; cheaper than
        ``statistics()``, which sorts the writer's recent lags: the once-a-second sampler
        of the series reads this)."""
        state = self.actor.state
        return self.with_store(GetStats().apply(state, state.now))

    def statistics(self) -> PoolStatistics:
        """Every figure of the pool, its actor and its writer (no await: a snapshot now)."""
        stats = self.stats_now()
        events = self.hub.statistics()
        return PoolStatistics(
            name=self.name,
            settings=self.settings,
            stats=stats,
            actor=self.actor.statistics(),
            writer=None if self.writer is None else self.writer.statistics(),
            subscribers=events["subscribers"],
            events_logged=events["events_logged"],
            oldest_event=events["oldest_revision"],
        )

    @property
    def ready(self) -> tuple[bool, str]:
        """Whether the pool can take activations now, and why not."""
        if self.closed:
            return False, "the pool is closed"
        writer = self.writer
        if writer is not None and writer.full():
            return False, writer.refusal()
        if writer is not None and not writer.owns():
            return False, writer.disowned()
        return True, ""

    async def flush(self) -> None:
        if self.writer is not None:
            await self.writer.flush()

    async def configure(self, settings: PoolSettings) -> None:
        """Apply new settings. Cost before work: a pool grown by millions is grown
        GROW_STEP tokens at a time, each step one actor batch (committed before the
        next, so the backlog stays bounded), so other clients are served between; a
        pool shrunk by many tokens loses END_STEP of them (and their leases) a step."""
        live = self.actor.state.size
        while settings.size > live + GROW_STEP:
            live += GROW_STEP
            await self.one(_Configure(attrs.evolve(settings, size=live)))
            await self._between_steps()
        while settings.size < live - END_STEP:
            live -= END_STEP
            await self.one(_Configure(attrs.evolve(settings, size=live)))
            await self._between_steps()
        await self.one(_Configure(settings))
        self.settings = settings
        if self.link is not None and self.writer is not None:
            await self.link.save_settings(self.writer.key, settings.as_dict())

    async def reach_size(self) -> None:
        """Grow or shrink to the settings' size, a step at a time (a pool is opened at
        most a step away from the size it had: ``_recovered``)."""
        if self.size != self.settings.size:
            await self.configure(self.settings)

    async def _between_steps(self) -> None:
        """Between two steps of a long change: others get a turn, and what the step
        changed is committed first so the backlog stays bounded."""
        if self.writer is not None:
            await self.writer.flush()
        else:
            await trio.lowlevel.checkpoint()

    async def clear(self) -> tuple[int, int]:
        """End every lease granted before now (``cleared``), END_STEP an actor batch;
        how many ended and the revision after the last step."""
        results = await self.call([Clear(END_STEP), Revision()])
        for result in results:
            if isinstance(result, BaseException):
                raise result
        ended, revision = cast(tuple[int, int], tuple(results))
        return await self.clear_rest(ended, revision)

    async def clear_rest(self, ended: int, revision: int) -> tuple[int, int]:
        """Go on with a clear whose first step ended ``ended`` leases (``revision``
        after it): the leases granted before it, END_STEP an actor batch, other
        requests served between; leases granted meanwhile are not ended. How many
        ended in all, and the revision after the last step."""
        step, cutoff = ended, revision
        while step == END_STEP:
            await self._between_steps()
            results = await self.call([Clear(END_STEP, cutoff), Revision()])
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            step, revision = cast(tuple[int, int], tuple(results))
            ended += step
        return ended, revision


class Pool:
    """A handle on a running pool. Safe to use from any number of trio tasks.

    Every method is one round trip through the pool's actor. Methods raise
    ``InvalidArgumentError`` for malformed arguments and ``UnavailableError``
    once the pool is closed.
    """

    def __init__(self, core: PoolCore) -> None:
        self._core = core
        self._one = core.one
        self._names = core.names
        # Changes acknowledged (async) that the store never wrote, counted when the
        # pool closed (``open_pool``'s exit; ``Pools.lost`` for ``open_pools``): a store
        # process that died, a shutdown past ``shutdown_timeout``. 0: all were written.
        self.lost = 0

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def settings(self) -> PoolSettings:
        return self._core.settings

    @property
    def durability(self) -> str:
        return self._core.durability

    @property
    def closed(self) -> bool:
        return self._core.closed

    async def activate(self, user_id: str, wait: float | None = None) -> Lease:
        """Lease a token to ``user_id``, or return the lease the user already holds.

        When every token is held the pool's ``when_full`` decides: ``evict``
        ends the oldest lease, ``reject`` raises ``FullError``, ``wait`` waits up
        to ``wait`` seconds for a token (first come, first served) and raises
        ``FullError`` when none came; a cancelled waiter is never granted one.
        Raises ``UnavailableError`` while the store's backlog is full.
        """
        if wait is not None:
            wait = WAIT.check(wait)
        record = await self._one(Activate(user_id, wait))
        return lease_value(record, self._names(record[SLOT]))

    async def release(self, token_id: str, user_id: str | None = None) -> Usage:
        """End the token's lease (reason ``released``) and return its history entry.

        Raises ``UnknownTokenError``, ``NotActiveError`` when the token is not
        leased, ``NotHolderError`` when ``user_id`` is given and does not hold it.
        """
        record = await self._one(Release(token_id, user_id))
        return usage_value(record, self._names(record[SLOT]))

    async def renew(self, token_id: str, lease_id: str) -> Lease:
        """Push the lease's ``expires_at`` to now + ttl (never past ``max_lifetime``).

        Raises ``NotHolderError`` when that lease is no longer the token's current one.
        """
        record = await self._one(Renew(token_id, lease_id))
        return lease_value(record, self._names(record[SLOT]))

    async def validate(self, token_id: str, lease_id: str) -> bool:
        """Whether ``lease_id`` is the token's current lease. Raises ``UnknownTokenError``."""
        return bool(await self._one(Validate(token_id, lease_id)))

    async def clear(self) -> int:
        """End every active lease (reason ``cleared``); return how many ended.

        Many leases end a step at a time (``END_STEP`` per actor batch, others served
        between): leases granted while it runs are not ended."""
        ended, _revision = await self._core.clear()
        return ended

    async def tokens(self) -> list[TokenStatus]:
        """Every token's status in creation order, as one snapshot.

        Raises ``InvalidArgumentError`` past 10,000 tokens: page with ``tokens_page``.
        """
        check_listing(self._core.size)
        op = GetTokens(0, TOKENS_MAX)
        _cursor, page = op.value(await self._one(op), self._names)
        return cast(list[TokenStatus], page)

    async def tokens_page(
        self, cursor: int = 0, count: int = 1000
    ) -> tuple[int, list[TokenStatus]]:
        """Up to ``count`` (1 to 1,000) tokens from ``cursor`` on, and the next cursor.

        Start with 0; the next cursor is 0 once the last token was returned (as
        Redis's ``SCAN``). Tokens there throughout a walk are returned exactly once.
        """
        CURSOR.check(cursor)
        PAGE_COUNT.check(count)
        op = GetTokens(cursor, count)
        return cast(tuple[int, list[TokenStatus]], op.value(await self._one(op), self._names))

    async def token(self, token_id: str) -> TokenStatus:
        """One token's status. Raises ``UnknownTokenError``."""
        op = GetToken(token_id)
        return cast(TokenStatus, op.value(await self._one(op), self._names))

    async def lease_of(self, user_id: str) -> Lease | None:
        """The user's active lease, or ``None``."""
        op = GetLease(user_id)
        return cast("Lease | None", op.value(await self._one(op), self._names))

    async def history(self, token_id: str, limit: int = 100, before: int | None = None) -> Page:
        """The token's ended leases, newest first, at most ``limit`` (1 to 10,000).

        ``before``: only those ended before that revision; pass the page's
        ``next_before`` to read the next page. Pages stay consistent while leases
        keep ending: every entry is read exactly once, page by page. The newest
        entries come from memory; older ones from the store (in a worker thread,
        never in the actor). Raises ``UnknownTokenError``, ``InvalidArgumentError``,
        and ``UnavailableError`` when the page needs the store and it cannot be read.
        """
        HISTORY_LIMIT.check(limit)
        result = await self._one(GetHistory(token_id, limit, before))
        return await self._core.complete_history(result, token_id, None, limit)

    async def user_history(self, user_id: str, limit: int = 100, before: int | None = None) -> Page:
        """The leases ``user_id`` held in this pool, ended, newest first; paged as ``history``."""
        HISTORY_LIMIT.check(limit)
        result = await self._one(GetUserHistory(user_id, limit, before))
        return await self._core.complete_history(result, None, user_id, limit)

    async def stats(self) -> Stats:
        """The pool's size, counters and revision, and its store's state."""
        return self._core.with_store(await self._one(GetStats()))

    def statistics(self) -> PoolStatistics:
        """Every figure of the pool, its actor and its writer (no await: a snapshot now)."""
        return self._core.statistics()

    @property
    def ready(self) -> tuple[bool, str]:
        """Whether the pool can take activations now, and why not."""
        return self._core.ready

    async def flush(self) -> None:
        """Wait until every change made so far is committed to the store (no-op in memory).

        Raises ``UnavailableError`` if this process no longer owns the pool.
        """
        await self._core.flush()

    async def batch(self, ops: Sequence[Op]) -> list[object]:
        """Apply many operations in one trip through the actor, in order.

        Returns one entry per op: its result as a public value, or the
        ``TokenPoolError`` it raised (the other ops still run, as in a Redis pipeline).
        """
        if not ops:
            return []
        ops = list(ops)
        results = await self._core.call(ops)
        return [
            r if isinstance(r, BaseException) else op.value(r, self._names)
            for op, r in zip(ops, results, strict=True)
        ]

    async def activate_many(self, user_ids: Sequence[str]) -> list[Lease | TokenPoolError]:
        """``activate`` for each user in one trip through the actor (the fastest path).

        A malformed user id (or a refusal) yields its error in place of a lease.
        Raises ``UnavailableError`` while the store's backlog is full.
        """
        if not user_ids:
            return []
        op = ActivateMany(tuple(user_ids))
        return cast(list[Lease | TokenPoolError], op.value(await self._one(op), self._names))

    @asynccontextmanager
    async def watch(
        self, since: int | None = None, *, buffer: int = 10_000
    ) -> AsyncIterator[Subscription]:
        """Follow the pool's changes: ``async for event in events``.

        ``since``: first replay the events after that revision still in memory;
        raises ``CompactedError`` (with the oldest revision held) when some are
        gone. A subscriber that falls ``buffer`` events behind gets one
        ``overflow`` event and its stream ends; it never slows the pool.
        """
        if since is not None:
            REVISION.check(since, "since")
        check_int(buffer, "buffer", 1, 1_000_000)
        hub = self._core.hub
        subscription = hub.subscribe(since, buffer)
        try:
            yield subscription
        finally:
            subscription.close()
            hub.unsubscribe(subscription)


@attrs.frozen
class _StoreConfig:
    durability: str
    flush_interval: float
    write_timeout: float
    shutdown_timeout: float
    lock_wait: float
    max_backlog: int
    queue_size: int
    history_memory: int


REPORTS_WAITING = 8
"""Usage reports that may wait for their turn on a server (``Pools.report_turn``)."""
REPORT_WAIT = REPORT_TIMEOUT
"""Seconds a usage report may wait for its turn: with the report's own deadline, a
report is answered within twice ``REPORT_TIMEOUT``, run or refused."""


def report_waited() -> UnavailableError:
    """The refusal of a usage report that waited ``REPORT_WAIT`` for its turn."""
    return UnavailableError(
        f"this usage report waited {REPORT_WAIT:g} s for the reports before it"
        " (reports run one at a time): try again later, or narrow the range"
    )


class Pools:
    """The named pools of one process, on one store. Made by ``open_pools``."""

    def __init__(
        self, nursery: trio.Nursery, store: str | None, config: _StoreConfig, clock: Clock | None
    ) -> None:
        self._nursery = nursery
        self.store = store
        self._config = config
        self._clock = clock
        self._pools: dict[str, Pool] = {}
        self._done: dict[str, trio.Event] = {}
        self._link: StoreLink | None = None
        self._reader: Reader | None = None
        self._analyst: Analyst | None = None
        self._report_turn = trio.Lock()  # FIFO: the analyst's one connection, in turn
        self._reports_waiting = 0
        self._lock = trio.Lock()
        self._changed = trio.Event()
        # Memory store: the highest revision a dropped pool reached, so a pool created
        # later (under that name or any: one number, however many pools come and go)
        # starts above it, even when the clock has not moved past it.
        self._reached = 0
        self.lost = 0  # changes not written at shutdown
        # The most tokens the pools served here may have together (None: no bound), and
        # the size each pool is being resized to (a resize goes a step at a time).
        self.max_tokens: int | None = None
        self._targets: dict[str, int] = {}
        # The per-second and per-minute figures of the pools (``_series.SeriesBook``), while
        # something samples them (the HTTP side of ``tokenpool serve``); None otherwise.
        self.series: Any = None
        self._hurry: float | None = None
        self._on_batch: Callable[[float], None] | None = None
        # Cluster mode (set before any pool is served): each pool's writer vouches only
        # while lease_of(name)() is true, and a pool's lock held by a stale owner's
        # store process is taken over (the node holds the slot's lease).
        self.lease_of: Callable[[str], Callable[[], bool]] | None = None

    def observe_batches(self, callback: Callable[[float], None] | None) -> None:
        """Tell ``callback`` how many seconds each actor batch of every pool (served now
        or later) held the event loop: the server's pause histogram."""
        self._on_batch = callback
        for pool in self._pools.values():
            pool._core.actor.on_batch = callback

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Wait until a pool is created or dropped."""
        await self._changed.wait()

    @property
    def store_died(self) -> bool:
        """Whether the store process exited before shutdown told it to."""
        return self._link is not None and self._link.died

    @property
    def link(self) -> StoreLink | None:
        return self._link

    def analyst(self) -> Analyst:
        """The store's usage analytics (its own connection, opened on first use).
        Raises ``NotKeptError`` when there is no store: memory keeps no history."""
        if self.store is None:
            raise NotKeptError(
                "usage analytics need a store (--dsn postgresql://... or sqlite:///...):"
                " a memory-only server keeps no history"
            )
        if self._analyst is None:
            self._analyst = open_analyst(self.store)
        return self._analyst

    @asynccontextmanager
    async def report_turn(self, *, bounded: bool = True) -> AsyncIterator[Analyst]:
        """The analyst, to one user at a time, in the order asked.

        The analyst has one connection and one thread: reports, roll-ups and backfills
        run one after another. Cost before work: a report (``bounded``) waits for its
        turn at most ``REPORT_WAIT`` seconds and behind at most ``REPORTS_WAITING``
        others, in the event loop (no thread held); past either bound it is refused at
        once (``UnavailableError``), so whoever asks for many reports gets refusals,
        not a queue that grows and answers minutes late. The server's own roll-ups and
        backfills wait their turn unbounded."""
        analyst = self.analyst()
        if not bounded:
            async with self._report_turn:
                yield analyst
            return
        if self._reports_waiting >= REPORTS_WAITING:
            raise UnavailableError(
                f"{self._reports_waiting} usage reports are waiting for their turn (reports"
                " run one at a time; this is the most that may wait): try again in a few"
                " seconds"
            )
        self._reports_waiting += 1
        try:
            with trio.move_on_after(REPORT_WAIT) as waiting:
                await self._report_turn.acquire()
        finally:
            self._reports_waiting -= 1
        if waiting.cancelled_caught:
            raise report_waited()
        try:
            yield analyst
        finally:
            self._report_turn.release()

    def names(self) -> list[str]:
        """The names of the pools served, in creation order."""
        return list(self._pools)

    def get(self, name: str) -> Pool:
        """The pool called ``name``. Raises ``UnknownPoolError``."""
        pool = self._pools.get(name)
        if pool is None:
            raise UnknownPoolError(f"no pool {str(name)[:64]!r} is served here")
        return pool

    def find(self, name: str) -> Pool | None:
        """The pool called ``name``, or None if none is served by that name."""
        return self._pools.get(name)

    def core(self, name: str) -> PoolCore:
        """The served pool behind ``get(name)`` (for the command layer)."""
        return self.get(name)._core

    def __contains__(self, name: object) -> bool:
        return name in self._pools

    async def _start_link(self) -> StoreLink | None:
        if self.store is None:
            return None
        if self._link is None:
            c = self._config
            link = StoreLink(
                self.store,
                durability=c.durability,
                flush_interval=c.flush_interval if c.durability == "async" else 0.0,
                write_timeout=c.write_timeout,
                shutdown_timeout=c.shutdown_timeout,
                now_us=_wall_us,
                lock_wait=c.lock_wait,
                take_over=self.lease_of is not None,
            )
            await self._nursery.start(link.run)
            self._link = link
            self._reader = open_reader(self.store, write_timeout=c.write_timeout)
        return self._link

    async def create(self, name: str, settings: PoolSettings, *, exists_ok: bool = False) -> Pool:
        """Serve a pool: a new one, or the store's pool of that name with these settings.

        Raises ``ExistsError`` if it is already served here (unless ``exists_ok``),
        ``PoolLockedError`` if another process owns it, ``UnavailableError`` when the
        store cannot be reached.
        """
        check_name(name)
        async with self._lock:
            if name in self._pools:
                if exists_ok:
                    return self._pools[name]
                raise ExistsError(f"pool {name!r} already exists")
            self._check_tokens(name, settings.size)
            pool = await self._open(name, settings, create=True, stored=False, grow=True)
        await pool._core.reach_size()
        return pool

    async def restore(self, name: str) -> Pool:
        """Serve the store's pool ``name`` with the settings it has there (the pool
        served already if it is: opened twice, it had two actors, and the second took the
        first's ownership for a predecessor's that was never released)."""
        async with self._lock:
            if name in self._pools:
                return self._pools[name]
            pool = await self._open(name, PoolSettings(), create=False, stored=True)
        await pool._core.reach_size()
        return pool

    async def restore_all(self, names: Sequence[str]) -> list[Pool]:
        """Serve the store's pools ``names`` (those not served yet) with their stored
        settings, in bulk: ownership and snapshots for RESTORE_BATCH pools per request
        to the store process (one transaction), and what recovery changed submitted for
        all of them before waiting for any commit."""
        served: list[Pool] = []
        async with self._lock:
            names = list(dict.fromkeys(n for n in names if n not in self._pools))
            link = await self._start_link()
            if link is None:
                raise UnknownPoolError("a pool can only be restored from a store")
            for start in range(0, len(names), RESTORE_BATCH):
                chunk = names[start : start + RESTORE_BATCH]
                opened = await link.open_pools(chunk)
                recovered = []
                for name, (key, snapshot) in zip(chunk, opened, strict=True):
                    settings = PoolSettings.make(**snapshot.settings)
                    clock = self._clock.fork() if self._clock is not None else Clock()
                    state, writer = self._recover(link, name, settings, key, snapshot, clock)
                    recovered.append((name, settings, state, clock, writer))
                for _name, _settings, state, _clock, writer in recovered:
                    await writer.flush()  # commit what recovery changed, then serve
                    writer.committed = state.revision
                for name, settings, state, clock, writer in recovered:
                    served.append(await self._serve(name, settings, state, clock, writer, link))
        for pool in served:  # one left mid-resize (a stop, a crash) finishes it, in steps
            await pool._core.reach_size()
        return served

    async def _open(
        self, name: str, settings: PoolSettings, *, create: bool, stored: bool, grow: bool = False
    ) -> Pool:
        """``grow``: a memory-only pool starts with at most GROW_STEP new tokens (the
        caller grows it to its size afterwards, a step at a time); a stored pool always
        starts at most a step away from the size it had (``_recovered``)."""
        c = self._config
        link = await self._start_link()
        clock = self._clock.fork() if self._clock is not None else Clock()
        if link is None:
            clock.start()
            state = PoolState(
                settings,
                history_memory=c.history_memory,
                revision=max(clock.now_us(), self._reached),
            )
            state.resize(min(settings.size, GROW_STEP) if grow else settings.size, clock.now_us())
            state.changes = []
            return await self._serve(name, settings, state, clock, None, None)
        key, snapshot = await link.open_pool(name, settings.as_dict(), create)
        if stored:
            settings = PoolSettings.make(**snapshot.settings)
        state, writer = self._recover(link, name, settings, key, snapshot, clock)
        await writer.flush()  # commit what recovery changed, then serve
        writer.committed = state.revision
        if not stored and not snapshot.created and snapshot.settings != settings.as_dict():
            # Declared settings win over the stored ones: said, since a restart with one
            # flag changed resets the others to their defaults (a shrink ends leases).
            log.warning(
                "pool_settings_changed",
                pool=name,
                stored=snapshot.settings,
                now=settings.as_dict(),
                note="the settings given at start replace the stored ones",
            )
            await link.save_settings(key, settings.as_dict())
        return await self._serve(name, settings, state, clock, writer, link)

    def _recover(
        self,
        link: StoreLink,
        name: str,
        settings: PoolSettings,
        key: int,
        snapshot: Snapshot,
        clock: Clock,
    ) -> tuple[PoolState, Writer]:
        """Rebuild a pool from its snapshot and give it a writer holding what recovery
        changed (submitted, not yet committed: the caller waits for that)."""
        c = self._config
        state, base = _recovered(snapshot, settings, c.history_memory, clock, name, link.shown)
        writer = Writer(
            link,
            key,
            name,
            max_backlog=c.max_backlog,
            write_timeout=c.write_timeout,
            gather=c.flush_interval if c.durability == "async" else 0.0,
            committed=base,
            # sync callers are told of a refusal; async ones were answered already
            hold_after_refusal=REFUSAL_HOLD if c.durability == "async" else 0.0,
            # In cluster mode the slot's lease already outlived the old owner's (it was
            # taken only once expired), so there is nothing more to wait out.
            vouch_from=time.monotonic() + OWNERSHIP_VALIDITY
            if snapshot.unclean and self.lease_of is None
            else 0.0,
        )
        if self.lease_of is not None:
            writer.lease = self.lease_of(name)
        elif snapshot.unclean:
            log.warning(
                "store_not_released",
                pool=name,
                store=link.shown,
                seconds=OWNERSHIP_VALIDITY,
                note="the previous owner did not release the pool (killed, cut off or"
                " its file replaced): it may still vouch; this pool vouches for no"
                " lease until its validity has run out",
            )
        link.add_writer(writer)
        changes, state.changes = state.changes, []
        writer.submit(changes, state.counters(), state.now, state.revision)
        return state, writer

    async def _serve(
        self,
        name: str,
        settings: PoolSettings,
        state: PoolState,
        clock: Clock,
        writer: Writer | None,
        link: StoreLink | None,
    ) -> Pool:
        """Start the actor of a pool recovered (or made) and serve it."""
        c = self._config
        if settings.size >= LARGE_POOL:
            # Move the token tables to the GC's permanent generation: full collections
            # would otherwise rescan structures that are never garbage.
            gc.freeze()
        hub = EventHub(name, state.token_text, lambda: state.revision, start=state.revision)
        actor = Actor(
            state,
            clock.now_us,
            clock.trio_time,
            writer=writer,
            sync=c.durability == "sync",
            queue_size=c.queue_size,
            publish=hub.publish,
            write_timeout=c.write_timeout,
            name=name,
        )
        actor.on_batch = self._on_batch
        core = PoolCore(
            name,
            settings,
            actor,
            hub,
            writer=writer,
            link=link,
            reader=self._reader,
            durability=c.durability,
            write_timeout=c.write_timeout,
        )
        pool = Pool(core)
        done = trio.Event()
        await self._nursery.start(_run_actor, actor, done)
        self._pools[name] = pool
        self._done[name] = done
        self._touch()
        return pool

    async def alter(self, name: str, **changes: object) -> PoolSettings:
        """Change a pool's settings (``size``, ``ttl``, ``when_full``, ``min_hold``,
        ``max_lifetime``); a new size is applied as at start. Returns the settings now."""
        pool = self.get(name)
        values = pool.settings.as_dict()
        for key, value in changes.items():
            if key not in values:
                raise InvalidArgumentError(f"unknown pool setting {key!r}")
            values[key] = value
        settings = PoolSettings.make(**values)
        async with self._lock:
            if settings.size > self._target(name, pool):
                self._check_tokens(name, settings.size)
            self._targets[name] = settings.size
        await pool._core.configure(settings)
        return settings

    def _target(self, name: str, pool: Pool) -> int:
        return self._targets.get(name, pool._core.settings.size)

    def _check_tokens(self, name: str, size: int) -> None:
        """Refuse a pool (or a size) that would take the tokens served past ``max_tokens``."""
        if self.max_tokens is None:
            return
        others = sum(self._target(n, p) for n, p in self._pools.items() if n != name)
        if others + size > self.max_tokens:
            raise InvalidArgumentError(
                f"pool {name!r} of {size:,} tokens would make {others + size:,} tokens served"
                f" in all, past the server's max-tokens of {self.max_tokens:,} (the tokens of"
                " every pool served together; drop or shrink a pool, or raise --max-tokens)"
            )

    async def drop(self, name: str) -> int:
        """Stop serving a pool: end every lease (``cleared``) and every wait, keep its
        tokens and history in the store. Returns how many leases ended."""
        async with self._lock:
            pool = self.get(name)
            pool._core.closed = True
            ended, _revision = await pool._core.clear()  # a step at a time, others served
            ended += int(await pool._core.one(_EndAll(), last=True))
            await self._stop(name)
            writer = pool._core.writer
            if self._link is not None and writer is not None:
                with suppress(TokenPoolError):
                    await pool.flush()
                await self._link.drop_pool(writer.key)
            return ended

    async def release(self, name: str, *, wait: bool = True) -> None:
        """Stop serving a pool and give up its ownership in the store, keeping its
        leases there (cluster mode: its slot moves to another node, which recovers it).
        Requests queued are answered first; later ones find no pool here. ``wait``: for
        the store process to write what the pool has pending and release it (else it
        does so when it can: the node's lease ran out, the store may be down)."""
        async with self._lock:
            pool = self._pools.get(name)
            if pool is None:
                return
            pool._core.closed = True
            await self._stop(name)
            writer = pool._core.writer
            if self._link is not None and writer is not None and not wait:
                self._link.forget_pool(writer.key)
            elif self._link is not None and writer is not None:
                try:
                    await self._link.release_pool(writer.key)
                except TokenPoolError as error:
                    log.warning("pool_release_failed", pool=name, error=str(error))

    async def _stop(self, name: str) -> None:
        pool = self._pools.pop(name)
        self._targets.pop(name, None)
        if self._link is None:
            self._reached = max(self._reached, pool._core.actor.state.revision)
        pool._core.actor.close()
        pool._core.hub.close()
        await self._done.pop(name).wait()
        self._touch()

    async def stop_waiting(self) -> None:
        """Shutdown begins: every pool answers its waiting activations now, and every
        later one at once (``UnavailableError``)."""
        for pool in list(self._pools.values()):
            await pool._core.actor.stop_waiting()

    def hurry(self, seconds: float) -> None:
        """Shorten shutdown (a second signal): ``close`` waits for the store process at
        most ``seconds`` more, then counts what was not written."""
        self._hurry = seconds
        if self._link is not None:
            self._link.hurry(seconds)

    async def close(self) -> None:
        """Stop every pool, write what is queued (bounded), stop the store process."""
        for pool in self._pools.values():
            pool._core.closed = True
            pool._core.actor.close()
            pool._core.hub.close()
        for done in self._done.values():  # each actor answers what was queued first
            await done.wait()
        if self._link is not None:
            if self._hurry is not None:
                self._link.hurry(self._hurry)
            self.lost += await self._link.close()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(reader.close)
        if self._analyst is not None:
            analyst, self._analyst = self._analyst, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(analyst.close)


RESTORE_BATCH = 1_000
"""Pools opened per request to the store process at start (one transaction each): the
round trips grow with the pools a thousand at a time, and no request nears its deadline."""

REFUSAL_HOLD = 5.0
"""Seconds an async pool refuses activations after the store refused a batch for good,
unless a write commits sooner (then at once): a store that keeps refusing keeps the
pool refusing, not acknowledging leases it will lose."""


def _wall_us() -> int:
    return time.time_ns() // 1000


async def _run_actor(actor: Actor, done: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
    try:
        await actor.run(task_status=task_status)
    finally:
        done.set()


def _recovered(
    snapshot: Snapshot,
    settings: PoolSettings,
    history_memory: int,
    clock: Clock,
    name: str,
    store: str,
) -> tuple[PoolState, int]:
    """Rebuild a pool from its snapshot; the changes recovery made are left in ``changes``.

    Returns the state and the revision everything in the store is at. The state is at
    most a step (GROW_STEP, END_STEP) from its settings' size: the caller reaches the
    size a step at a time once the pool is served (``PoolCore.reach_size``).
    """
    started = trio.current_time()
    clock.start(floor=snapshot.clock_us + 1 if snapshot.clock_us else 0)
    if clock.behind:
        log.warning(
            "wall_clock_behind_store",
            pool=name,
            seconds=round(clock.behind / 1e6, 3),
            note="the pool's clock starts at the store's newest time: time never runs backwards",
        )
    stored = PoolSettings.make(**snapshot.settings)
    state = PoolState(stored, history_memory=history_memory, revision=snapshot.epoch << EPOCH_SHIFT)
    state.restore_tokens(snapshot.tokens)
    slots = {token: slot for slot, (token, _) in enumerate(snapshot.tokens)}
    for lease_id, token_id, user_id, fence, activated, expires in snapshot.leases:
        slot = slots.get(token_id)
        if slot is None:
            log.warning("lease_of_unknown_token", pool=name, lease=lease_id, token=token_id)
            continue
        state.restore_lease((GRANT, lease_id, slot, user_id, fence, activated, expires, fence))
    state.revision = max(state.revision, snapshot.epoch << EPOCH_SHIFT)
    state.restore_counters(snapshot.counters)
    state.restored()
    base = state.revision
    now = clock.now_us()
    leases = state.active
    state.advance(now)  # leases that expired while we were down
    expired = leases - state.active
    if snapshot.created or settings != stored or state.size != settings.size:
        # Cost before work: at most one step of tokens added or retired now (one bounded
        # write); the caller reaches the size a step at a time once the pool is served.
        # Retiring a million tokens of a pool revived smaller was one statement past the
        # write timeout, retried for good: the store stalled for every pool, and again
        # after each restart.
        size = max(min(settings.size, state.size + GROW_STEP), state.size - END_STEP)
        state.configure(attrs.evolve(settings, size=size), now)
    log.info(
        "pool_recovered",
        pool=name,
        store=store,
        epoch=snapshot.epoch,
        tokens=state.size,
        leases=state.active,
        expired_while_down=expired,
        seconds=round(trio.current_time() - started, 3),
    )
    return state, base


def _check_common(
    durability: object,
    history_memory: object,
    queue_size: object,
    max_backlog: object,
    flush_interval: object,
    write_timeout: object,
    shutdown_timeout: object,
    lock_wait: object = 5.0,
) -> _StoreConfig:
    return _StoreConfig(
        durability=check_choice(durability, "durability", ("async", "sync")),
        history_memory=HISTORY_MEMORY.check(history_memory),
        queue_size=QUEUE_SIZE.check(queue_size),
        max_backlog=MAX_BACKLOG.check(max_backlog),
        flush_interval=FLUSH_INTERVAL.check(flush_interval),
        write_timeout=WRITE_TIMEOUT.check(write_timeout),
        shutdown_timeout=SHUTDOWN_TIMEOUT.check(shutdown_timeout),
        lock_wait=LOCK_WAIT.check(lock_wait),
    )


@asynccontextmanager
async def open_pools(
    store: str | None = None,
    *,
    durability: str = "async",
    history_memory: int = 100_000,
    clock: Clock | None = None,
    queue_size: int = 4096,
    max_backlog: int = 100_000,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    write_timeout: float = 5.0,
    shutdown_timeout: float = 10.0,
    lock_wait: float = 5.0,
    declared: dict[str, PoolSettings] | None = None,
    restore: bool = True,
    max_tokens: int | None = None,
) -> AsyncIterator[Pools]:
    """Serve named pools on one store; stop them all on exit.

    ``store``: a ``postgresql://`` URL, a ``sqlite:///path`` URL, or ``None``
    for memory only. ``declared`` pools are served with those settings (created
    when missing, changed when they differ); with ``restore``, every other pool
    the store holds (and was not dropped) is served again with its stored
    settings; ``create`` serves more. ``max_tokens``: the most tokens the pools may
    have together; a ``create`` or ``alter`` past it raises ``InvalidArgumentError``
    (pools restored from the store are served whatever their sizes).
    On exit every pool stops taking requests, answers those queued, and the
    store process writes what is queued (at most ``shutdown_timeout`` seconds).
    Raises ``InvalidArgumentError`` for a bad setting, ``PoolLockedError`` when
    another process owns a pool, ``UnavailableError`` when the store cannot be
    reached.
    """
    config = _check_common(
        durability,
        history_memory,
        queue_size,
        max_backlog,
        flush_interval,
        write_timeout,
        shutdown_timeout,
        lock_wait,
    )
    store = check_store_url(store)
    cap = None if max_tokens is None else MAX_TOKENS.check(max_tokens)
    try:
        async with trio.open_nursery() as nursery:
            pools = Pools(nursery, store, config, clock)
            pools.max_tokens = cap
            try:
                for name, settings in (declared or {}).items():
                    await pools.create(name, settings)
                if restore and store is not None:
                    link = await pools._start_link()
                    assert link is not None
                    await pools.restore_all(await link.list_pools())
                yield pools
            finally:
                with trio.CancelScope(shield=True):
                    await pools.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise lone_error(group) from None


@asynccontextmanager
async def open_pool(
    size: int = DEFAULT_SIZE,
    ttl: float = DEFAULT_TTL,
    *,
    name: str = "default",
    store: str | None = None,
    durability: str = "async",
    when_full: str = "evict",
    min_hold: float = 0.0,
    max_lifetime: float | None = None,
    history_memory: int = 100_000,
    clock: Clock | None = None,
    queue_size: int = 4096,
    max_backlog: int = 100_000,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    write_timeout: float = 5.0,
    shutdown_timeout: float = 10.0,
    lock_wait: float = 5.0,
) -> AsyncIterator[Pool]:
    """Open one pool of ``size`` tokens leased for ``ttl`` seconds; close it on exit.

    ``store`` is where the pool persists: a ``postgresql://`` URL, a
    ``sqlite:///path`` URL, or ``None`` for memory only. With a store, the
    pool is rebuilt from it on open (same token ids, same leases; leases that
    expired meanwhile end ``expired``; a changed size or rule is applied) and
    every change is written behind in batches by a store process.
    ``durability="async"`` answers callers at once (a change is committed
    within about ``flush_interval`` plus one write); ``"sync"`` answers only
    once the change has committed.

    Raises ``InvalidArgumentError`` for a bad setting (naming it, its value and
    its range), ``PoolLockedError`` when another process owns the pool,
    ``UnavailableError`` when the store cannot be reached.
    """
    settings = PoolSettings.make(
        size=size, ttl=ttl, when_full=when_full, min_hold=min_hold, max_lifetime=max_lifetime
    )
    check_name(name)
    served: tuple[Pools, Pool] | None = None
    try:
        async with open_pools(
            store,
            durability=durability,
            history_memory=history_memory,
            clock=clock,
            queue_size=queue_size,
            max_backlog=max_backlog,
            flush_interval=flush_interval,
            write_timeout=write_timeout,
            shutdown_timeout=shutdown_timeout,
            lock_wait=lock_wait,
            declared={name: settings},
            restore=False,
        ) as pools:
            served = pools, pools.get(name)
            yield served[1]
    finally:
        if served is not None:  # what the close counted: the library's exit status
            served[1].lost = served[0].lost
