"""Usage analytics: a report over a pool's history in the store (summary, users,
tokens, hours), by time range, a page at a time (``_store/analytics.py`` holds the SQL).

Not an actor op: a report reads the store only, on a connection of its own, from a
worker thread, so a long one holds neither the pool nor other reads.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import trio

from .._errors import InvalidArgumentError, NotKeptError, TokenPoolError
from .._log import get_logger
from .._series import PoolSeries, json_window
from .._settings import check_name
from .._store.analytics import LIMIT_MAX, Table, check_report
from ._base import ITEM_COST, Request

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._pool import Pools
    from .connection import Client

log = get_logger("tokenpool.analytics")

DAY_US = 86_400_000_000
LAST_SECOND = 253_402_300_799
"""9999-12-31T23:59:59Z: the latest time a report's range may name (Unix seconds)."""
_UNIX = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")


def parse_unix_seconds(text: str, what: str) -> int:
    """Unix seconds as ASCII digits with at most six decimals, as microseconds; anything
    else (signs, exponents, ``1_000``, other scripts' digits, nan) is refused in words."""
    shown = text if len(text) <= 30 else text[:30] + "..."
    if _UNIX.fullmatch(text) is None or not text.isascii():
        raise InvalidArgumentError(
            f"{what} must be Unix seconds (ASCII digits, at most six decimals), not {shown!r}"
        )
    whole, _, fraction = text.partition(".")
    return int(whole) * 1_000_000 + int((fraction + "000000")[:6])


def check_moment(us: int, what: str) -> int:
    """A time a report's range may name: 1970 to 9999."""
    if not 0 <= us < (LAST_SECOND + 1) * 1_000_000:  # (9999-12-31T23:59:59.999999 too)
        raise InvalidArgumentError(
            f"{what} must be a time from 1970-01-01 to 9999-12-31 (Unix seconds 0 to {LAST_SECOND})"
        )
    return us


MAX_OFFSET = 1_000_000
"""The furthest page a cursor reaches (an offset into the report's rows)."""
WINDOWS = ("hour", "day")


class Report(Request):
    """One page of the ``kind`` report of ``pool`` over the leases that ended in
    ``[since, until)`` (microseconds since the Unix epoch; by default the last day),
    ordered by ``sort`` (the report's default when ``None``). ``cursor`` is the
    ``next_cursor`` of the previous page. Raises ``InvalidArgumentError`` for an
    unknown report, order or an empty range; ``NotKeptError`` on a server without a
    store; ``UnavailableError`` past the report's deadline."""

    __slots__ = ("cursor", "kind", "limit", "pool", "since", "sort", "until")
    name = "analytics"

    def __init__(
        self,
        pool: str,
        kind: str,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        cursor: int = 0,
        sort: str | None = None,
    ) -> None:
        self.pool = check_name(pool)
        self.sort = check_report(kind, sort)
        self.kind = kind
        if not 1 <= limit <= LIMIT_MAX:
            raise InvalidArgumentError(f"limit must be 1 to {LIMIT_MAX}, not {limit}")
        if not 0 <= cursor <= MAX_OFFSET:
            raise InvalidArgumentError(f"cursor must be 0 to {MAX_OFFSET}, not {cursor}")
        self.until = check_moment(until if until is not None else time.time_ns() // 1000, "until")
        self.since = check_moment(
            since if since is not None else max(0, self.until - DAY_US), "since"
        )
        if self.since >= self.until:
            raise InvalidArgumentError("since must be before until")
        self.limit = limit
        self.cursor = cursor

    @property
    def cost(self) -> int:  # type: ignore[override]
        return ITEM_COST * self.limit

    async def run(self, pools: Pools, client: Client) -> Table:
        pools.get(self.pool)  # UnknownPoolError for a pool not served here
        async with pools.report_turn() as analyst:
            return await trio.to_thread.run_sync(
                analyst.report,
                self.pool,
                self.kind,
                self.sort,
                self.since,
                self.until,
                self.limit,
                self.cursor,
                abandon_on_cancel=True,
            )


class Series(Request):
    """The pool's sampled figures over the last ``hour`` (one a second) or ``day`` (one a
    minute), as the API's JSON object. Raises ``NotKeptError`` where nothing samples
    them (a server without HTTP, a pool past the sampled ones)."""

    __slots__ = ("pool", "window")
    name = "series"
    cost = ITEM_COST * 60

    def __init__(self, pool: str, window: str = "hour") -> None:
        self.pool = check_name(pool)
        if window not in WINDOWS:
            raise InvalidArgumentError(f"the window must be hour or day, not {window[:20]!r}")
        self.window = window

    async def run(self, pools: Pools, client: Client) -> dict[str, object]:
        pools.get(self.pool)  # UnknownPoolError for a pool not served here
        book = pools.series
        if book is None:
            raise NotKeptError("this server samples no series (its HTTP side is off)")
        try:
            kept = book.of(self.pool)
        except NotKeptError:
            if self.pool not in pools.names()[: book.limit]:
                raise
            kept = PoolSeries()  # served, not sampled yet (the server just started): all gaps
        return json_window(self.pool, kept.window(self.window, int(time.time())))


ROLL_EVERY = 60.0
"""Seconds between two roll-ups of the served pools' new history into the summary tables."""
ROLL_BUDGET = 5.0
"""Seconds one pool's roll-up may take in one round (a long history is rolled up over
several rounds; reports are right meanwhile, reading the rest from the history)."""


async def keep_rolled_up(pools: Callable[[], Pools | None]) -> None:
    """Roll the history of every served pool up into the summary tables, soon after start
    and then every ``ROLL_EVERY`` seconds, in a worker thread, until cancelled."""
    await trio.sleep(5.0)
    while True:
        served = pools()
        if served is not None and served.store is not None:
            for name in served.names():
                try:
                    async with served.report_turn(bounded=False) as analyst:
                        await trio.to_thread.run_sync(
                            analyst.roll, name, ROLL_BUDGET, abandon_on_cancel=True
                        )
                except TokenPoolError as error:
                    log.warning("analytics_rollup_failed", pool=name, error=str(error))
        await trio.sleep(ROLL_EVERY)
