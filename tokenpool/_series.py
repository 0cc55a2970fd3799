"""Each pool's figures over time, in memory: the last hour a second at a time, the last
day a minute at a time (the dashboard's charts, ``/api/.../series``), with no Prometheus.

The rules it keeps:
- Bounded. A ring per window holds ``capacity`` slots of ``len(FIELDS)`` 4-byte floats
  and one 8-byte stamp each, in flat arrays: no Python object per sample, nothing the
  cyclic collector walks. A pool's hour and day cost 213 KiB; only the first
  ``SERIES_POOLS`` pools served have series.
- A slot says which second (minute) it holds: its stamp. A slot whose stamp is not the
  one asked for is a gap (``None``): the server was not running, or not sampling.
- Counters (grants, ended leases by reason, refusals) are kept as rates, events a
  second; gauges (tokens held, the pool's size, callers waiting, write lag) as sampled;
  ``wait`` is the mean wait, in seconds, of the grants made to queued callers then.
- A minute is the mean of its seconds (rates stay events a second), the partial
  current minute included when read.
- Pure: the sampler hands in wall-clock seconds and cumulative figures; nothing here
  reads a clock or a pool. ``Sampler`` is the task that does, once a second.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import trio

from ._errors import NotKeptError, TokenPoolError

if TYPE_CHECKING:
    from ._pool import Pools

FIELDS = (
    "held",
    "size",
    "grants",
    "evictions",
    "expirations",
    "releases",
    "clears",
    "refusals",
    "waiters",
    "wait",
    "write_lag",
)
"""What each sample holds, in this order (the JSON's keys)."""
_N = len(FIELDS)
_RATES = (2, 3, 4, 5, 6, 7)  # the counters kept as events a second
HELD, SIZE, GRANTS, EVICTIONS, EXPIRATIONS, RELEASES, CLEARS, REFUSALS, WAITERS, WAIT, LAG = range(
    _N
)

HOUR = 3600
"""Seconds the per-second ring holds."""
DAY = 1440
"""Minutes the per-minute ring holds."""
SERIES_POOLS = 100
"""Pools with series, the first served (creation order); the others answer NOTKEPT."""
FILL_GAP = 60
"""A sample late by up to this many seconds spreads its counters' growth evenly over
the seconds it missed; after a longer gap those seconds stay gaps."""


class Figures(NamedTuple):
    """One pool's cumulative figures at one instant (what the sampler reads)."""

    held: int
    size: int
    activations: int
    evictions: int
    expirations: int
    releases: int
    clears: int
    refusals: int
    waiting: int
    wait_grants: int
    waited_us: int
    write_lag: float


class Window(NamedTuple):
    """A window of one ring: ``step`` seconds a slot, the first slot's start (Unix
    seconds), and per field its values (``None`` for a gap), oldest first."""

    step: int
    start: int
    values: dict[str, list[float | None]]


class Ring:
    """``capacity`` slots of ``len(FIELDS)`` figures, slot ``t % capacity`` holding period ``t``."""

    __slots__ = ("_stamps", "_values", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values = array("f", bytes(4 * capacity * _N))
        self._stamps = array("q", [-1]) * capacity

    def put(self, t: int, values: Sequence[float]) -> None:
        """Hold ``values`` (one per field) for period ``t``."""
        slot = t % self.capacity
        self._stamps[slot] = t
        base = slot * _N
        self._values[base : base + _N] = array("f", values)

    def holds(self, t: int) -> bool:
        return self._stamps[t % self.capacity] == t

    def get(self, t: int) -> list[float] | None:
        """The figures of period ``t``, or ``None`` (never held, or overwritten)."""
        slot = t % self.capacity
        if self._stamps[slot] != t:
            return None
        base = slot * _N
        return list(self._values[base : base + _N])

    def columns(self, last: int) -> list[list[float | None]]:
        """Per field, the ``capacity`` periods up to ``last``, oldest first."""
        out: list[list[float | None]] = [[] for _ in range(_N)]
        values, stamps, capacity = self._values, self._stamps, self.capacity
        for t in range(last - capacity + 1, last + 1):
            slot = t % capacity
            if stamps[slot] == t:
                base = slot * _N
                for i in range(_N):
                    out[i].append(values[base + i])
            else:
                for column in out:
                    column.append(None)
        return out


class PoolSeries:
    """One pool's hour (a second a slot) and day (a minute a slot)."""

    __slots__ = ("_last", "_last_t", "_minute", "_seen", "_sums", "day", "hour")

    def __init__(self) -> None:
        self.hour = Ring(HOUR)
        self.day = Ring(DAY)
        self._last: Figures | None = None
        self._last_t = -1
        self._minute = -1
        self._sums = array("d", bytes(8 * _N))
        self._seen = 0  # seconds summed in _sums

    def sample(self, t: int, now: Figures) -> None:
        """Record the figures read at second ``t`` (Unix seconds; later than the last)."""
        last, last_t = self._last, self._last_t
        if t <= last_t:
            return
        self._last, self._last_t = now, t
        gap = t - last_t
        rates = [0.0] * _N
        wait = 0.0
        if last is not None and gap <= FILL_GAP:
            grown = (
                now.activations - last.activations,
                now.evictions - last.evictions,
                now.expirations - last.expirations,
                now.releases - last.releases,
                now.clears - last.clears,
                now.refusals - last.refusals,
            )
            if min(grown) < 0:  # the counters started again (a pool made anew)
                gap = 1
                grown = (0, 0, 0, 0, 0, 0)
            for i, g in zip(_RATES, grown, strict=True):
                rates[i] = g / gap
            grants = now.wait_grants - last.wait_grants
            if grants > 0:
                wait = (now.waited_us - last.waited_us) / grants / 1e6
        else:
            gap = 1
        rates[HELD] = now.held
        rates[SIZE] = now.size
        rates[WAITERS] = now.waiting
        rates[WAIT] = wait
        rates[LAG] = now.write_lag
        for second in range(t - gap + 1, t + 1):
            self._second(second, rates)

    def _second(self, t: int, values: list[float]) -> None:
        self.hour.put(t, values)
        minute = t // 60
        if minute != self._minute:
            self._close_minute()
            self._minute = minute
        sums = self._sums
        for i in range(_N):
            sums[i] += values[i]
        self._seen += 1

    def _close_minute(self) -> None:
        if self._seen:
            self.day.put(self._minute, [s / self._seen for s in self._sums])
        self._sums = array("d", bytes(8 * _N))
        self._seen = 0

    def backfill(self, step: int, rows: Sequence[tuple[int, Sequence[float]]]) -> int:
        """Fill periods nothing sampled (``step`` 1: seconds; 60: minutes) with figures
        rebuilt from the store's history; never overwrites a sample. How many filled."""
        ring = self.hour if step == 1 else self.day
        filled = 0
        for t, values in rows:
            if not ring.holds(t) and not (step == 60 and t == self._minute):
                ring.put(t, values)
                filled += 1
        return filled

    def window(self, name: str, now: int) -> Window:
        """The hour (``name`` "hour", up to second ``now``) or the day ("day", up to
        the minute holding ``now``, that minute as sampled so far)."""
        if name == "hour":
            columns = self.hour.columns(now)
            return Window(1, now - HOUR + 1, dict(zip(FIELDS, columns, strict=True)))
        minute = now // 60
        columns = self.day.columns(minute)
        if self._minute == minute and self._seen:
            for i in range(_N):
                columns[i][-1] = self._sums[i] / self._seen
        return Window(60, (minute - DAY + 1) * 60, dict(zip(FIELDS, columns, strict=True)))


class SeriesBook:
    """The series of every pool a server samples (the first ``limit`` served)."""

    def __init__(self, limit: int = SERIES_POOLS) -> None:
        self.limit = limit
        self._pools: dict[str, PoolSeries] = {}

    def names(self) -> list[str]:
        return list(self._pools)

    def of(self, pool: str) -> PoolSeries:
        """The pool's series. Raises ``NotKeptError`` for a pool without any."""
        series = self._pools.get(pool)
        if series is None:
            raise NotKeptError(
                f"no series are kept for pool {pool[:64]!r}: only the first {self.limit}"
                " pools served have them (or the pool is not served here)"
            )
        return series

    def keep(self, names: Sequence[str]) -> list[str]:
        """Keep series for these pools (the first ``limit``), forget the others; the
        pools that are new."""
        wanted = list(names)[: self.limit]
        for gone in set(self._pools) - set(wanted):
            del self._pools[gone]
        new = [n for n in wanted if n not in self._pools]
        for name in new:
            self._pools[name] = PoolSeries()
        return new


def json_window(pool: str, window: Window) -> dict[str, object]:
    """A window as the API's JSON: columns of numbers, ``null`` for gaps."""
    values = {
        k: [None if v is None or math.isnan(v) else round(v, 4) for v in column]
        for k, column in window.values.items()
    }
    return {"pool": pool, "step": window.step, "start": window.start, "values": values}


Rows = list[tuple[int, list[float]]]
Backfill = Callable[[str, int], Awaitable[tuple[Rows, Rows]]]
"""Rebuilds a pool's past from its store: (pool, now) -> (its seconds of the last hour,
its minutes of the last day), each (period, figures in FIELDS order)."""


class Sampler:
    """The task that samples every pool with series once a second (``run``), and has
    the past of each pool it starts sampling rebuilt from the store (``backfill``)."""

    YIELD_EVERY = 50
    """Pools sampled between two yields to the event loop: a server of many pools is
    never held for all of them at once."""

    def __init__(
        self,
        book: SeriesBook,
        pools: Callable[[], Pools | None],
        *,
        wall: Callable[[], float] = time.time,
        backfill: Callable[[Pools], Backfill] | None = None,
    ) -> None:
        self.book = book
        self._pools = pools
        self._wall = wall
        self._backfill = backfill
        self._nursery: trio.Nursery | None = None
        self.samples = 0
        self.backfilled = 0

    def now(self) -> int:
        return int(self._wall())

    async def run(self) -> None:
        """Sample just after each wall-clock second begins, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                await trio.sleep(1.0 - (self._wall() % 1.0) + 0.005)
                await self.sample_once()

    async def sample_once(self) -> None:
        pools = self._pools()
        if pools is None:
            return
        new = self.book.keep(pools.names())
        t = self.now()
        if self._backfill is not None and self._nursery is not None and pools.store:
            fill = self._backfill(pools)
            for name in new:
                self._nursery.start_soon(self._fill, fill, name, t)
        for i, name in enumerate(self.book.names()):
            if i and i % self.YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            try:
                core = pools.core(name)
            except LookupError:
                continue  # dropped meanwhile
            stats, actor = core.stats_now(), core.actor.statistics()
            self.book.of(name).sample(
                t,
                Figures(
                    stats.active,
                    stats.size,
                    stats.activations,
                    stats.evictions,
                    stats.expirations,
                    stats.releases,
                    stats.clears,
                    stats.refusals,
                    stats.waiting,
                    actor.wait_grants,
                    actor.waited_us,
                    stats.write_lag,
                ),
            )
        self.samples += 1

    async def _fill(self, fill: Backfill, name: str, t: int) -> None:
        try:
            seconds, minutes = await fill(name, t)
        except TokenPoolError:
            return  # no store, or it did not answer in time: the series start now
        try:
            series = self.book.of(name)
        except NotKeptError:
            return
        self.backfilled += series.backfill(1, seconds) + series.backfill(60, minutes)


def rebuilt(
    timeline: dict[int, list[int]], first: int, last: int, step: int, held: int, size: int
) -> Rows:
    """Periods ``first`` to ``last`` rebuilt from the store's timeline (per period:
    grants, then ended by reason in ``Reason`` order), from the first period with
    anything in it: counters as events a second; tokens held walked back from ``held``
    now (each period's figure is the one at its end). What history cannot tell (the
    refusals, the waiters, the write lag) is NaN: a gap in the JSON."""
    if not timeline:
        return []
    start = max(first, min(timeline))
    out: Rows = []
    unknown = math.nan
    for period in range(last, start - 1, -1):
        figures = timeline.get(period)
        if figures is None:
            figures = [0] * 5
        grants, expired, evicted, released, cleared = figures
        out.append(
            (
                period,
                [
                    max(0, held),
                    size,
                    grants / step,
                    evicted / step,
                    expired / step,
                    released / step,
                    cleared / step,
                    unknown,
                    unknown,
                    unknown,
                    unknown,
                ],
            )
        )
        held += expired + evicted + released + cleared - grants
    out.reverse()
    return out


def store_backfill(pools: Pools) -> Backfill:
    """A pool's past rebuilt from its store's history (its last hour and day)."""

    async def backfill(name: str, now: int) -> tuple[Rows, Rows]:
        stats = pools.core(name).stats_now()
        out = []
        for step, periods in ((1, HOUR), (60, DAY)):
            last = now // step
            first = last - periods + 1
            async with pools.report_turn(bounded=False) as analyst:
                timeline = await trio.to_thread.run_sync(
                    analyst.timeline,
                    name,
                    first * step * 1_000_000,
                    (last + 1) * step * 1_000_000,
                    step,
                    abandon_on_cancel=True,
                )
            out.append(rebuilt(timeline, first, last, step, stats.active, stats.size))
        return out[0], out[1]

    return backfill
