"""Usage analytics read from a store's history, in SQL for PostgreSQL and SQLite.

The rules every report keeps:
- It reads one pool's leases that ENDED in ``[since, until)``, through the index
  ``history_by_end (pool_id, ended_at)``: a lease counts in the range it ended in.
- Its answer is bounded: at most ``limit`` rows (1 to 1,000), paged by an offset
  cursor; the summary is one row, its hold-time percentiles read from a histogram of
  ``BUCKETS_PER_E`` buckets per factor of e (each within 3.2% of the exact figure)
  that the database builds, so no report ships rows to be sorted here.
- Every statement has a deadline (``REPORT_TIMEOUT``): PostgreSQL's
  ``statement_timeout``, SQLite's progress handler. Past it the report is refused
  (``UnavailableError``, saying to narrow the range), never left running.
- It runs on a connection of its own (never the store process's, never the history
  reader's), from a worker thread: a slow report holds no other read.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, TypeVar

from .._errors import InvalidArgumentError, UnavailableError
from .._model import Reason, iso, to_datetime
from . import StoreError, redact

REPORTS = ("summary", "users", "tokens", "hours")
"""The reports, in the order the dashboard shows them."""
SORTS = {
    "users": ("leases", "hold", "evicted"),
    "tokens": ("leases", "hold", "evicted"),
    "hours": ("time", "leases"),
    "summary": ("leases",),
}
"""Each report's orders (the first is its default): the most leases, the longest total
hold, the most evicted first; hours in time order or the busiest first."""
REPORT_TIMEOUT = 10.0
"""Seconds one report's statement may run."""
LIMIT_MAX = 1_000
BUCKETS_PER_E = 16
REASONS = tuple(r.value for r in Reason)
TIMELINE_KINDS = ("grants", *REASONS)

T = TypeVar("T")


class Table(NamedTuple):
    """A report: its columns, its rows (plain values: str, int, float, None) and the
    cursor of the next page (``None`` on the last)."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    next_cursor: int | None


class Analyst(Protocol):
    """Reports over a store's history. Every method blocks (run it in a thread)."""

    def report(
        self, pool: str, kind: str, sort: str, since_us: int, until_us: int, limit: int, offset: int
    ) -> Table:
        """One page of a report. Raises ``UnavailableError`` past its deadline and
        ``StoreError`` when the store cannot be read."""

    def timeline(self, pool: str, since_us: int, until_us: int, step: int) -> dict[int, list[int]]:
        """Per period of ``step`` seconds (Unix seconds // step) in the range: leases
        granted, and ended by each reason (``TIMELINE_KINDS`` order)."""

    def close(self) -> None: ...


class _Dialect(NamedTuple):
    mark: str  # the parameter placeholder
    ended: str
    started: str
    hold: str  # seconds, a float
    bucket: str  # the hold time's histogram bucket, an integer
    reason: str
    token_key: str  # what the history groups a token by
    hour: str  # the Unix hour the lease ended in
    assigned: str
    period_end: str  # (Unix seconds of the end) // step, step as a parameter
    period_start: str
    period_assigned: str


_PG = _Dialect(
    mark="%s",
    ended="ended_at",
    started="started_at",
    # date_part is double precision; extract() is numeric since PostgreSQL 14, and
    # numeric ln() over a month of rows took 5 times as long
    hold="date_part('epoch', ended_at - started_at)",
    bucket=f"floor(ln(greatest(date_part('epoch', ended_at - started_at) * 1e6, 1))"
    f" * {BUCKETS_PER_E})::int",
    reason="expiration_reason::text",
    token_key="token_id",
    hour="floor(date_part('epoch', ended_at) / 3600)::bigint",
    assigned="assigned_at",
    period_end="floor(date_part('epoch', ended_at) / %s)::bigint",
    period_start="floor(date_part('epoch', started_at) / %s)::bigint",
    period_assigned="floor(date_part('epoch', assigned_at) / %s)::bigint",
)
_SQLITE = _Dialect(
    mark="?",
    ended="ended_us",
    started="started_us",
    hold="(ended_us - started_us) / 1e6",
    bucket=f"CAST(ln(max(ended_us - started_us, 1)) * {BUCKETS_PER_E} AS INTEGER)",
    reason="expiration_reason",
    token_key="token_no",
    hour="(ended_us / 3600000000)",
    assigned="assigned_us",
    period_end="(ended_us / 1000000 / ?)",
    period_start="(started_us / 1000000 / ?)",
    period_assigned="(assigned_us / 1000000 / ?)",
)


class _Queries:
    """The SQL of each report in one dialect, and how its rows become a ``Table``."""

    def __init__(self, d: _Dialect) -> None:
        self.d = d
        m = d.mark
        self.where = (
            f"pool_id = (SELECT id FROM pools WHERE name = {m})"
            f" AND {d.ended} >= {m} AND {d.ended} < {m}"
        )
        by_reason = ", ".join(
            f"sum(CASE WHEN {d.reason} = '{r}' THEN 1 ELSE 0 END)" for r in REASONS
        )
        self.by_reason = by_reason

    def summary(self) -> str:
        d = self.d
        return (
            f"SELECT {d.reason}, {d.bucket}, count(*), sum({d.hold}), max({d.hold})"
            f" FROM token_usage_history WHERE {self.where} GROUP BY 1, 2"
        )

    def grouped(self, key: str, order: str) -> str:
        d = self.d
        m = d.mark
        return (
            f"SELECT {key} AS k, count(*) AS leases, sum({d.hold}) AS hold, max({d.hold}),"
            f" {self.by_reason} FROM token_usage_history WHERE {self.where}"
            f" GROUP BY k ORDER BY {order} LIMIT {m} OFFSET {m}"
        )

    def timeline(self) -> list[str]:
        d = self.d
        m = d.mark
        pool = f"pool_id = (SELECT id FROM pools WHERE name = {m})"
        return [
            f"SELECT {d.period_end}, {d.reason}, count(*) FROM token_usage_history"
            f" WHERE {self.where} GROUP BY 1, 2",
            f"SELECT {d.period_start}, 'grants', count(*) FROM token_usage_history"
            f" WHERE {self.where} AND {d.started} >= {m} GROUP BY 1",
            f"SELECT {d.period_assigned}, 'grants', count(*) FROM token_assignments"
            f" WHERE {pool} AND lease_id IS NOT NULL AND {d.assigned} >= {m}"
            f" AND {d.assigned} < {m} GROUP BY 1",
        ]


_ORDERS = {
    "leases": "leases DESC, k",
    "hold": "hold DESC, k",
    # the per-reason sums follow k, leases, hold and max: columns 5 on, in REASONS order
    "evicted": f"{5 + REASONS.index('evicted')} DESC, k",
    "time": "k",
}


def _order(sort: str) -> str:
    return _ORDERS[sort]


def check_report(kind: str, sort: str | None) -> str:
    """The report's sort order (its default when ``None``); ``InvalidArgumentError``
    naming the reports, or the orders, when either is unknown."""
    if kind not in SORTS:
        raise InvalidArgumentError(f"report must be one of {', '.join(REPORTS)}, not {kind!r}")
    if sort is None:
        return SORTS[kind][0]
    if sort not in SORTS[kind]:
        raise InvalidArgumentError(
            f"the {kind} report sorts by {', '.join(SORTS[kind])}, not {sort[:40]!r}"
        )
    return sort


def _percentile(buckets: list[tuple[int, int]], total: int, q: float, top: float) -> float:
    """The ``q`` quantile (seconds) from sorted (bucket, count): the bucket's middle."""
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket, count in buckets:
        seen += count
        if seen >= rank:
            return min(top, math.exp((bucket + 0.5) / BUCKETS_PER_E) / 1e6)
    return top


SUMMARY_COLUMNS = (
    "leases",
    "hold_mean_s",
    "hold_p50_s",
    "hold_p90_s",
    "hold_max_s",
    *REASONS,
    *(f"{r}_share" for r in REASONS),
)
GROUP_COLUMNS = ("leases", "hold_total_s", "hold_mean_s", "hold_max_s", *REASONS)


def summarize(rows: list[tuple[Any, ...]]) -> Table:
    """The summary from (reason, bucket, count, hold sum, hold max) rows."""
    total = sum(int(r[2]) for r in rows)
    if not total:
        return Table(SUMMARY_COLUMNS, [(0, None, None, None, None, *[0] * 2 * len(REASONS))], None)
    buckets: dict[int, int] = {}
    reasons = dict.fromkeys(REASONS, 0)
    hold_sum = 0.0
    top = 0.0
    for reason, bucket, count, held, longest in rows:
        buckets[int(bucket)] = buckets.get(int(bucket), 0) + int(count)
        reasons[str(reason)] += int(count)
        hold_sum += float(held)
        top = max(top, float(longest))
    ordered = sorted(buckets.items())
    row = (
        total,
        round(hold_sum / total, 6),
        round(_percentile(ordered, total, 0.5, top), 6),
        round(_percentile(ordered, total, 0.9, top), 6),
        round(top, 6),
        *reasons.values(),
        *(round(n / total, 4) for n in reasons.values()),
    )
    return Table(SUMMARY_COLUMNS, [row], None)


def _grouped_row(key: Any, row: tuple[Any, ...]) -> tuple[Any, ...]:
    _k, leases, held, longest, *per_reason = row
    leases = int(leases)
    held = float(held or 0.0)
    return (
        key,
        leases,
        round(held, 6),
        round(held / leases, 6) if leases else None,
        round(float(longest or 0.0), 6),
        *(int(n or 0) for n in per_reason),
    )


class _SqlAnalyst:
    """What both stores share: the reports over ``_run(sql, args)``."""

    def __init__(self, dialect: _Dialect, timeout: float) -> None:
        self.q = _Queries(dialect)
        self.timeout = timeout

    def _run(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
        raise NotImplementedError

    def _time(self, us: int) -> Any:
        raise NotImplementedError

    def _token_ids(self, keys: list[Any]) -> dict[Any, str]:
        return {k: str(k) for k in keys}

    def report(
        self, pool: str, kind: str, sort: str, since_us: int, until_us: int, limit: int, offset: int
    ) -> Table:
        sort = check_report(kind, sort)
        span = (pool, self._time(since_us), self._time(until_us))
        if kind == "summary":
            (rows,) = self._run([(self.q.summary(), span)])
            return summarize(rows)
        d = self.q.d
        key = {"users": "user_id", "tokens": d.token_key, "hours": d.hour}[kind]
        sql = self.q.grouped(key, _order(sort))
        (rows,) = self._run([(sql, (*span, limit + 1, offset))])
        following = offset + limit if len(rows) > limit else None
        rows = rows[:limit]
        if kind == "tokens":
            names = self._token_ids([r[0] for r in rows])
            out = [_grouped_row(names.get(r[0], str(r[0])), r) for r in rows]
            first = "token_id"
        elif kind == "hours":
            out = [_grouped_row(iso(int(r[0]) * 3_600_000_000), r) for r in rows]
            first = "hour"
        else:
            out = [_grouped_row(r[0], r) for r in rows]
            first = "user_id"
        return Table((first, *GROUP_COLUMNS), out, following)

    def timeline(self, pool: str, since_us: int, until_us: int, step: int) -> dict[int, list[int]]:
        since, until = self._time(since_us), self._time(until_us)
        ends, starts, active = self.q.timeline()
        results = self._run(
            [
                (ends, (step, pool, since, until)),
                (starts, (step, pool, since, until, since)),
                (active, (step, pool, since, until)),
            ]
        )
        out: dict[int, list[int]] = {}
        for rows in results:
            for period, kind, count in rows:
                figures = out.setdefault(int(period), [0] * len(TIMELINE_KINDS))
                figures[TIMELINE_KINDS.index(str(kind))] += int(count)
        return out


def _too_long(timeout: float) -> UnavailableError:
    return UnavailableError(
        f"the report took longer than {timeout:g} s and was stopped: ask for a shorter range"
    )


class PostgresAnalyst(_SqlAnalyst):
    """Reports on PostgreSQL, on a connection of their own, one statement at a time."""

    def __init__(self, url: str, *, timeout: float = REPORT_TIMEOUT) -> None:
        super().__init__(_PG, timeout)
        self._url = url
        self.url = redact(url)
        self._conn: Any = None
        self._lock = threading.Lock()

    def _time(self, us: int) -> Any:
        return to_datetime(us)

    def _run(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
        import psycopg

        from .postgres import connect

        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = connect(self._url, "analytics", self.timeout)
                conn = self._conn
                out = []
                with conn.transaction():
                    conn.execute(f"SET LOCAL statement_timeout = {int(self.timeout * 1000)}")
                    for sql, args in statements:
                        out.append(conn.execute(sql, args).fetchall())
                return out
            except psycopg.errors.QueryCanceled:
                raise _too_long(self.timeout) from None
            except psycopg.Error as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise StoreError(f"report from {self.url} failed: {first}") from error

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None


class SqliteAnalyst(_SqlAnalyst):
    """Reports on a SQLite file: a read-only connection on a thread of its own (as the
    history reader's), stopped by a progress handler past its deadline."""

    def __init__(self, url: str, *, timeout: float = REPORT_TIMEOUT) -> None:
        from .sqlite import sqlite_path

        super().__init__(_SQLITE, timeout)
        self.path = sqlite_path(url)
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenpool-analytics")

    def _on_thread(self, fn: Callable[[], T]) -> T:
        return self._thread.submit(fn).result()

    def _time(self, us: int) -> Any:
        return us

    def _run(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
        def run() -> list[list[tuple[Any, ...]]]:
            if self._conn is None:
                self._conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, timeout=self.timeout
                )
            conn = self._conn
            deadline = time.monotonic() + self.timeout
            conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            try:
                return [conn.execute(sql, args).fetchall() for sql, args in statements]
            finally:
                conn.set_progress_handler(None, 0)

        try:
            return self._on_thread(run)
        except sqlite3.OperationalError as error:
            if "interrupt" in str(error):
                raise _too_long(self.timeout) from None
            raise StoreError(f"report from {self.path} failed: {error}") from error
        except sqlite3.Error as error:
            raise StoreError(f"report from {self.path} failed: {error}") from error

    def _token_ids(self, keys: list[Any]) -> dict[Any, str]:
        if not keys:
            return {}
        marks = ", ".join("?" * len(keys))

        def run() -> dict[Any, str]:
            assert self._conn is not None
            rows = self._conn.execute(f"SELECT no, id FROM tokens WHERE no IN ({marks})", keys)
            return {no: ident for no, ident in rows}

        return self._on_thread(run)

    def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._on_thread(run)
        self._thread.shutdown()


def open_analyst(url: str, *, timeout: float = REPORT_TIMEOUT) -> Analyst:
    """The analyst for a store URL (PostgreSQL or SQLite)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresAnalyst(url, timeout=timeout)
    return SqliteAnalyst(url, timeout=timeout)
