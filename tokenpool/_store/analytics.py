"""Usage analytics read from a store's history, in SQL for PostgreSQL and SQLite.

The rules every report keeps:
- It reads one pool's leases that ENDED in ``[since, until)``: a lease counts in the
  range it ended in.
- It reads the summary tables (``usage_hours``: per hour, reason and hold-time bucket;
  ``usage_users``, ``usage_tokens``: per day) for the whole hours (days) inside the
  range, and the history itself for the rest: the partial hours (days) at the edges
  (through the index ``history_by_end (pool_id, ended_at)``) and the rows not rolled
  up yet (above the pool's ``usage_rollup.revision``, through the primary key). The
  parts never overlap, so a report is the same rolled up or not (a test holds it).
- The summary tables are kept by this connection (``roll``: a pool's new rows,
  ``ROLL_CHUNK`` a transaction, the watermark moved in the same transaction, the
  pool's row locked), never by the write path: a write costs what it did, plus the
  one index.
- Its answer is bounded: at most ``limit`` rows (1 to 1,000), paged by an offset
  cursor; the summary is one row, its hold-time percentiles read from a histogram of
  ``BUCKETS_PER_E`` buckets per factor of e (each within 3.2% of the exact figure),
  so no report ships rows to be sorted here.
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

    def roll(self, pool: str, budget: float = 5.0) -> int:
        """Roll the pool's history rows not rolled up yet into the summary tables (for up to
        ``budget`` seconds); how many. Reports are right without it, only slower."""

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
    token_rollup: str  # its column in usage_tokens
    hour: str  # the Unix hour the lease ended in
    day: str  # the Unix day
    greatest: str
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
    token_rollup="token_id",
    hour="floor(date_part('epoch', ended_at) / 3600)::bigint",
    day="floor(date_part('epoch', ended_at) / 86400)::bigint",
    greatest="greatest",
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
    token_rollup="token_no",
    hour="(ended_us / 3600000000)",
    day="(ended_us / 86400000000)",
    greatest="max",
    assigned="assigned_us",
    period_end="(ended_us / 1000000 / ?)",
    period_start="(started_us / 1000000 / ?)",
    period_assigned="(assigned_us / 1000000 / ?)",
)

HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000
ROLL_CHUNK = 200_000
"""History rows one roll-up transaction takes on PostgreSQL (a pool's oldest not rolled
up yet): about a second."""
ROLL_CHUNK_SQLITE = 20_000
"""The same on SQLite, smaller: SQLite has one writer, and the store process's commits
wait while a roll-up transaction holds it (about 0.2 s for 20,000 rows)."""

Execute = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


class _Queries:
    """The SQL of each report and of the roll-up in one dialect.

    A report over ``[since, until)`` reads the summary tables for the whole hours (days,
    for users and tokens) inside the range, and the history itself for the rest: the
    partial hours at its edges, and the rows not rolled up yet (revision above the
    pool's ``usage_rollup.revision``). The three parts never overlap."""

    def __init__(self, d: _Dialect) -> None:
        self.d = d
        m = d.mark
        counts = ", ".join(
            f"CASE WHEN {d.reason} = '{r}' THEN 1 ELSE 0 END AS {r}" for r in REASONS
        )
        self.raw_row = f"1 AS leases, {d.hold} AS hold, {d.hold} AS hmax, {counts}"
        # the edges (rolled up, outside the whole units), then what is not rolled up
        self.raw_where = [
            f"pool_id = {m} AND {d.ended} >= {m} AND {d.ended} < {m} AND revision <= {m}",
            f"pool_id = {m} AND {d.ended} >= {m} AND {d.ended} < {m} AND revision <= {m}",
            f"pool_id = {m} AND revision > {m} AND {d.ended} >= {m} AND {d.ended} < {m}",
        ]

    def raw(self, select: str) -> str:
        return " UNION ALL ".join(
            f"SELECT {select} FROM token_usage_history WHERE {w}" for w in self.raw_where
        )

    def summary(self) -> str:
        d, m = self.d, self.d.mark
        return (
            "SELECT reason, bucket, sum(leases), sum(hold), max(hmax) FROM ("
            "SELECT reason, bucket, leases, hold_sum AS hold, hold_max AS hmax FROM usage_hours"
            f" WHERE pool_id = {m} AND hour >= {m} AND hour < {m} UNION ALL "
            + self.raw(f"{d.reason}, {d.bucket}, 1, {d.hold}, {d.hold}")
            + ") AS u GROUP BY reason, bucket"
        )

    def grouped(self, kind: str, order: str) -> str:
        d, m = self.d, self.d.mark
        sums = ", ".join(f"sum({r})" for r in REASONS)
        if kind == "hours":
            counts = ", ".join(
                f"CASE WHEN reason = '{r}' THEN leases ELSE 0 END AS {r}" for r in REASONS
            )
            rolled = (
                f"SELECT hour AS k, leases, hold_sum AS hold, hold_max AS hmax, {counts}"
                f" FROM usage_hours WHERE pool_id = {m} AND hour >= {m} AND hour < {m}"
            )
            key = d.hour
        else:
            table, column = ("usage_users", "user_id")
            key = "user_id"
            if kind == "tokens":
                table, column, key = "usage_tokens", d.token_rollup, d.token_key
            rolled = (
                f"SELECT {column} AS k, leases, hold_sum AS hold, hold_max AS hmax,"
                f" {', '.join(REASONS)} FROM {table}"
                f" WHERE pool_id = {m} AND day >= {m} AND day < {m}"
            )
        return (
            f"SELECT k, sum(leases) AS leases, sum(hold) AS hold, max(hmax), {sums} FROM ("
            f"{rolled} UNION ALL {self.raw(f'{key} AS k, {self.raw_row}')}"
            f") AS u GROUP BY k ORDER BY {order} LIMIT {m} OFFSET {m}"
        )

    def roll(self) -> list[str]:
        """Add a pool's history rows ``(wm, top]`` to the summary tables (idempotent with
        the watermark they move in the same transaction)."""
        d, m = self.d, self.d.mark
        rows = (
            f"FROM token_usage_history WHERE pool_id = {m} AND revision > {m} AND revision <= {m}"
        )
        g = d.greatest
        per_reason = ", ".join(
            f"sum(CASE WHEN {d.reason} = '{r}' THEN 1 ELSE 0 END)" for r in REASONS
        )
        added = ", ".join(f"{r} = {{t}}.{r} + excluded.{r}" for r in REASONS)
        common = (
            "leases = {t}.leases + excluded.leases, hold_sum = {t}.hold_sum + excluded.hold_sum,"
            f" hold_max = {g}({{t}}.hold_max, excluded.hold_max)"
        )
        return [
            "INSERT INTO usage_hours (pool_id, hour, reason, bucket, leases, hold_sum, hold_max)"
            f" SELECT pool_id, {d.hour}, {d.reason}, {d.bucket}, count(*), sum({d.hold}),"
            f" max({d.hold}) {rows} GROUP BY 1, 2, 3, 4"
            " ON CONFLICT (pool_id, hour, reason, bucket) DO UPDATE SET "
            + common.format(t="usage_hours"),
            f"INSERT INTO usage_users (pool_id, day, user_id, leases, hold_sum, hold_max,"
            f" {', '.join(REASONS)}) SELECT pool_id, {d.day}, user_id, count(*),"
            f" sum({d.hold}), max({d.hold}), {per_reason} {rows} GROUP BY 1, 2, 3"
            " ON CONFLICT (pool_id, day, user_id) DO UPDATE SET "
            + common.format(t="usage_users")
            + ", "
            + added.format(t="usage_users"),
            f"INSERT INTO usage_tokens (pool_id, day, {d.token_rollup}, leases, hold_sum,"
            f" hold_max, {', '.join(REASONS)}) SELECT pool_id, {d.day}, {d.token_key},"
            f" count(*), sum({d.hold}), max({d.hold}), {per_reason} {rows} GROUP BY 1, 2, 3"
            f" ON CONFLICT (pool_id, day, {d.token_rollup}) DO UPDATE SET "
            + common.format(t="usage_tokens")
            + ", "
            + added.format(t="usage_tokens"),
        ]

    def timeline(self) -> list[str]:
        d = self.d
        m = d.mark
        pool = f"pool_id = (SELECT id FROM pools WHERE name = {m})"
        where = f"{pool} AND {d.ended} >= {m} AND {d.ended} < {m}"
        return [
            f"SELECT {d.period_end}, {d.reason}, count(*) FROM token_usage_history"
            f" WHERE {where} GROUP BY 1, 2",
            f"SELECT {d.period_start}, 'grants', count(*) FROM token_usage_history"
            f" WHERE {where} AND {d.started} >= {m} GROUP BY 1",
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


def _units(since_us: int, until_us: int, unit_us: int) -> tuple[int, int, int, int]:
    """The whole units (hours, days) inside ``[since, until)`` as ``[u0, u1)``, and where
    the history's edges end and begin again (``e0``, ``e1``; both ``until`` when no
    whole unit fits)."""
    u0 = -(-since_us // unit_us)
    u1 = until_us // unit_us
    if u0 >= u1:
        return 0, 0, until_us, until_us
    return u0, u1, u0 * unit_us, u1 * unit_us


class _SqlAnalyst:
    """What both stores share: the reports and the roll-up over ``_session(fn)``, which
    runs ``fn(execute)`` in one transaction with the deadline."""

    def __init__(self, dialect: _Dialect, timeout: float) -> None:
        self.q = _Queries(dialect)
        self.timeout = timeout

    def _session(self, fn: Callable[[Execute], T], write: bool = False) -> T:
        raise NotImplementedError

    @property
    def chunk(self) -> int:
        return ROLL_CHUNK

    def _time(self, us: int) -> Any:
        raise NotImplementedError

    def _token_ids(self, execute: Execute, keys: list[Any]) -> dict[Any, str]:
        return {k: str(k) for k in keys}

    def _pool_id(self, execute: Execute, pool: str) -> tuple[int, int] | None:
        m = self.q.d.mark
        rows = execute(f"SELECT id FROM pools WHERE name = {m}", (pool,))
        if not rows:
            return None
        pool_id = int(rows[0][0])
        rolled = execute(f"SELECT revision FROM usage_rollup WHERE pool_id = {m}", (pool_id,))
        return pool_id, int(rolled[0][0]) if rolled else 0

    def _raw_args(
        self, pool_id: int, rolled: int, since: int, until: int, e0: int, e1: int
    ) -> tuple[Any, ...]:
        t = self._time
        return (
            *(pool_id, t(since), t(e0), rolled),
            *(pool_id, t(e1), t(until), rolled),
            *(pool_id, rolled, t(since), t(until)),
        )

    def report(
        self, pool: str, kind: str, sort: str, since_us: int, until_us: int, limit: int, offset: int
    ) -> Table:
        sort = check_report(kind, sort)

        def run(execute: Execute) -> Table:
            found = self._pool_id(execute, pool)
            unit = DAY_US if kind in ("users", "tokens") else HOUR_US
            u0, u1, e0, e1 = _units(since_us, until_us, unit)
            if found is None:
                found = (-1, 0)
            pool_id, rolled = found
            raw = self._raw_args(pool_id, rolled, since_us, until_us, e0, e1)
            if kind == "summary":
                return summarize(execute(self.q.summary(), (pool_id, u0, u1, *raw)))
            sql = self.q.grouped(kind, _order(sort))
            rows = execute(sql, (pool_id, u0, u1, *raw, limit + 1, offset))
            following = offset + limit if len(rows) > limit else None
            rows = rows[:limit]
            if kind == "tokens":
                names = self._token_ids(execute, [r[0] for r in rows])
                out = [_grouped_row(names.get(r[0], str(r[0])), r) for r in rows]
                return Table(("token_id", *GROUP_COLUMNS), out, following)
            if kind == "hours":
                out = [_grouped_row(iso(int(r[0]) * HOUR_US), r) for r in rows]
                return Table(("hour", *GROUP_COLUMNS), out, following)
            out = [_grouped_row(r[0], r) for r in rows]
            return Table(("user_id", *GROUP_COLUMNS), out, following)

        return self._session(run)

    def roll(self, pool: str, budget: float = 5.0) -> int:
        """Roll the pool's new history rows up into the summary tables, ``chunk`` a
        transaction, for up to ``budget`` seconds; how many rows."""
        deadline = time.monotonic() + budget
        total = 0
        while time.monotonic() < deadline:
            rolled = self._session(lambda execute: self._roll_chunk(execute, pool), write=True)
            total += rolled
            if rolled < self.chunk:
                break
        return total

    def _roll_chunk(self, execute: Execute, pool: str) -> int:
        m = self.q.d.mark
        rows = execute(f"SELECT id FROM pools WHERE name = {m}", (pool,))
        if not rows:
            return 0
        pool_id = int(rows[0][0])
        execute(
            f"INSERT INTO usage_rollup (pool_id, revision) VALUES ({m}, 0)"
            " ON CONFLICT (pool_id) DO NOTHING",
            (pool_id,),
        )
        lock = " FOR UPDATE" if m == "%s" else ""  # two servers never roll one pool at once
        (wm,) = execute(f"SELECT revision FROM usage_rollup WHERE pool_id = {m}{lock}", (pool_id,))[
            0
        ]
        newer = f"FROM token_usage_history WHERE pool_id = {m} AND revision > {m}"
        edge = execute(
            f"SELECT revision {newer} ORDER BY revision LIMIT 1 OFFSET {m}",
            (pool_id, wm, self.chunk - 1),
        )
        if edge:
            top, count = int(edge[0][0]), self.chunk
        else:
            (top, count) = execute(f"SELECT max(revision), count(*) {newer}", (pool_id, wm))[0]
            if not count:
                return 0
        for statement in self.q.roll():
            execute(statement, (pool_id, wm, top))
        execute(f"UPDATE usage_rollup SET revision = {m} WHERE pool_id = {m}", (top, pool_id))
        return int(count)

    def timeline(self, pool: str, since_us: int, until_us: int, step: int) -> dict[int, list[int]]:
        since, until = self._time(since_us), self._time(until_us)
        ends, starts, active = self.q.timeline()

        def run(execute: Execute) -> list[list[tuple[Any, ...]]]:
            return [
                execute(ends, (step, pool, since, until)),
                execute(starts, (step, pool, since, until, since)),
                execute(active, (step, pool, since, until)),
            ]

        out: dict[int, list[int]] = {}
        for rows in self._session(run):
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

    def _session(self, fn: Callable[[Execute], T], write: bool = False) -> T:
        import psycopg

        from .postgres import connect

        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = connect(self._url, "analytics", self.timeout)
                conn = self._conn

                def execute(sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
                    cursor = conn.execute(sql.encode(), args)
                    return cursor.fetchall() if cursor.description else []

                with conn.transaction():
                    if not write:  # one snapshot: the watermark, the sums and the rows agree
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    conn.execute(f"SET LOCAL statement_timeout = {int(self.timeout * 1000)}")
                    return fn(execute)
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

    def _time(self, us: int) -> Any:
        return us

    def _session(self, fn: Callable[[Execute], T], write: bool = False) -> T:
        def run() -> T:
            if self._conn is None:  # read-write: it keeps the summary tables
                self._conn = sqlite3.connect(
                    self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
                )
            conn = self._conn
            deadline = time.monotonic() + self.timeout
            conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)

            def execute(sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
                return conn.execute(sql, args).fetchall()

            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    out = fn(execute)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return out
            finally:
                conn.set_progress_handler(None, 0)

        try:
            return self._thread.submit(run).result()
        except sqlite3.OperationalError as error:
            if "interrupt" in str(error):
                raise _too_long(self.timeout) from None
            raise StoreError(f"report from {self.path} failed: {error}") from error
        except sqlite3.Error as error:
            raise StoreError(f"report from {self.path} failed: {error}") from error

    @property
    def chunk(self) -> int:
        return ROLL_CHUNK_SQLITE

    def _token_ids(self, execute: Execute, keys: list[Any]) -> dict[Any, str]:
        if not keys:
            return {}
        marks = ", ".join("?" * len(keys))
        rows = execute(f"SELECT no, id FROM tokens WHERE no IN ({marks})", tuple(keys))
        return {no: ident for no, ident in rows}

    def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._thread.submit(run).result()
        self._thread.shutdown()


def open_analyst(url: str, *, timeout: float = REPORT_TIMEOUT) -> Analyst:
    """The analyst for a store URL (PostgreSQL or SQLite)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresAnalyst(url, timeout=timeout)
    return SqliteAnalyst(url, timeout=timeout)
