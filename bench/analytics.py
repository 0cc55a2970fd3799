"""Usage analytics on a big history: how long each report takes, and what its index
costs the write path.

``python -m bench.analytics [ROWS] [postgresql] [sqlite]`` (ROWS default 10,000,000):

1. fills the history of pool ``bench`` (1,000 tokens, 10,000 users) with ROWS ended
   leases spread evenly over the last 30 days, in the database itself (one
   ``INSERT ... SELECT`` over a generated series: minutes, not hours, for 10 million);
2. times each report (summary, users, tokens, hours: the first page, 100 rows) over
   the last day, week and 30 days: the first run (cold) and the best of three;
3. times the write path with and without the index ``history_by_end``: 100,000
   activations of a full ``evict`` pool (each ends a lease: a history row), from the
   first activation until the store has committed the last, in changes a second.

PostgreSQL is ``TOKENPOOL_BENCH_DSN`` (default the local server), in a schema of its
own, dropped after; SQLite a temporary file. Prints a Markdown table for the README.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial

import psycopg
import trio

from tokenpool import UnavailableError, open_pool
from tokenpool._store.analytics import REPORTS, open_analyst

DSN = os.environ.get("TOKENPOOL_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DAY = 86_400
RANGES = {"day": DAY, "week": 7 * DAY, "30 days": 30 * DAY}
TOKENS = 1_000
USERS = 10_000
WRITES = 100_000

# Deterministic "random" columns from the row number i (Knuth's multiplicative hash).
_PG_FILL = """
INSERT INTO token_usage_history
SELECT p.id, p.revision + i, md5(i::text)::uuid, t.ids[1 + (i * 2654435761 % {tokens})],
       p.revision + i,
       to_timestamp({start} + i * {spacing}) - ((1 + i * 40503 % 3600) * interval '1 second'),
       to_timestamp({start} + i * {spacing}),
       (ARRAY['expired', 'evicted', 'released', 'cleared'])[1 + i * 7 % 4]::expiration_reason,
       'user-' || (i * 2654435761 % {users})
FROM generate_series(1::bigint, {rows}) AS i,
     (SELECT id, revision FROM pools WHERE name = 'bench') AS p,
     (SELECT array_agg(id ORDER BY id) AS ids FROM tokens
      WHERE pool_id = (SELECT id FROM pools WHERE name = 'bench')) AS t
"""
_SQLITE_FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
INSERT INTO token_usage_history
SELECT p.id, p.revision + i, lower(hex(randomblob(16))), t.first + (i * 2654435761 % {tokens}),
       p.revision + i,
       CAST(({start} + i * {spacing}) * 1000000 AS INTEGER) - (1 + i * 40503 % 3600) * 1000000,
       CAST(({start} + i * {spacing}) * 1000000 AS INTEGER),
       CASE i * 7 % 4 WHEN 0 THEN 'expired' WHEN 1 THEN 'evicted' WHEN 2 THEN 'released'
            ELSE 'cleared' END,
       'user-' || (i * 2654435761 % {users})
FROM n, (SELECT id, revision FROM pools WHERE name = 'bench') AS p,
     (SELECT min(no) AS first FROM tokens
      WHERE pool_id = (SELECT id FROM pools WHERE name = 'bench')) AS t
"""


async def _create(url: str) -> None:
    async with open_pool(size=TOKENS, ttl=3600, store=url, name="bench"):
        pass


def _fill(kind: str, url: str, target: str, rows: int) -> float:
    now = time.time()
    spacing = 30 * DAY / rows
    values = {"rows": rows, "start": now - 30 * DAY, "spacing": spacing}
    values |= {"tokens": TOKENS, "users": USERS}
    started = time.perf_counter()
    if kind == "sqlite":
        lite = sqlite3.connect(target)
        with lite:
            lite.execute(_SQLITE_FILL.format(**values))
            lite.execute(
                "UPDATE pools SET revision = (SELECT max(revision) FROM token_usage_history),"
                " clock_us = (SELECT max(ended_us) FROM token_usage_history)"
            )
        lite.execute("ANALYZE")
        lite.close()
    else:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{target}"')
            conn.execute(_PG_FILL.format(**values).encode())
            conn.execute(
                "UPDATE pools SET revision = (SELECT max(revision) FROM token_usage_history),"
                " clock_us = (SELECT extract(epoch FROM max(ended_at)) * 1e6"
                " FROM token_usage_history)"
            )
            conn.execute("VACUUM ANALYZE token_usage_history")
    return time.perf_counter() - started


def _time_reports(url: str) -> list[tuple[str, str, float, float, int]]:
    analyst = open_analyst(url, timeout=600)
    out = []
    try:
        now_us = time.time_ns() // 1000
        for report in REPORTS:
            for name, seconds in RANGES.items():
                since = now_us - seconds * 1_000_000
                sort = "time" if report == "hours" else "leases"
                runs = []
                rows = 0
                for _ in range(3):
                    started = time.perf_counter()
                    table = analyst.report("bench", report, sort, since, now_us, 100, 0)
                    runs.append(time.perf_counter() - started)
                    rows = len(table.rows)
                out.append((report, name, runs[0], min(runs), rows))
    finally:
        analyst.close()
    return out


def _roll(url: str) -> float:
    analyst = open_analyst(url, timeout=600)
    started = time.perf_counter()
    try:
        while analyst.roll("bench", budget=60.0):
            pass
    finally:
        analyst.close()
    return time.perf_counter() - started


async def _writes(url: str, drop_index: Callable[[], None]) -> float:
    """Changes a second the store commits for WRITES evicting activations."""
    async with open_pool(size=TOKENS, ttl=3600, store=url, name=f"w{uuid.uuid4().hex[:6]}") as pool:
        await pool.activate_many([f"fill-{i}" for i in range(TOKENS)])
        await pool.flush()
        drop_index()
        started = time.perf_counter()
        for start in range(0, WRITES, 1_000):
            users = [f"u{start + i}" for i in range(1_000)]
            while True:
                try:
                    await pool.activate_many(users)
                    break
                except UnavailableError:  # the backlog is full: the store sets the pace
                    await trio.sleep(0.01)
        await pool.flush()
        return 2 * WRITES / (time.perf_counter() - started)  # a grant and an end each


def _drop_index(kind: str, target: str) -> None:
    if kind == "sqlite":
        with sqlite3.connect(target) as lite:
            lite.execute("DROP INDEX IF EXISTS history_by_end")
    else:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{target}"'.encode())
            conn.execute("DROP INDEX IF EXISTS history_by_end")


def main(argv: list[str]) -> int:
    rows = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 10_000_000
    kinds = [a for a in argv[1:] if not a.isdigit()] or ["postgresql", "sqlite"]
    print(f"# usage analytics, {rows:,} history rows over 30 days\n")
    print(
        "| store | report | range | history only: first (s) | best of 3 (s) |"
        " with the summary tables: first (s) | best of 3 (s) | rows |"
    )
    print("|---|---|---|---|---|---|---|---|")
    writes: list[str] = []
    rolls: list[str] = []
    for kind in kinds:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with tempfile.TemporaryDirectory() as directory:
            path = f"{directory}/analytics.db"
            url = f"sqlite:///{path}" if kind == "sqlite" else f"{DSN}?schema={schema}"
            target = path if kind == "sqlite" else schema
            try:
                trio.run(_create, url)
                filled = _fill(kind, url, target, rows)
                print(f"<!-- {kind}: filled {rows:,} rows in {filled:.1f} s -->", file=sys.stderr)
                raw = _time_reports(url)
                rolling = _roll(url)
                print(
                    f"<!-- {kind}: rolled {rows:,} rows up in {rolling:.1f} s -->", file=sys.stderr
                )
                rolled = _time_reports(url)
                for (report, name, first, best, count), (_r, _n, first2, best2, _c) in zip(
                    raw, rolled, strict=True
                ):
                    print(
                        f"| {kind} | {report} | {name} | {first:.3f} | {best:.3f} |"
                        f" {first2:.3f} | {best2:.3f} | {count} |"
                    )
                rolls.append(f"| {kind} | {filled:.1f} | {rolling:.1f} |")

                with_index = trio.run(_writes, url, lambda: None)
                without = trio.run(_writes, url, partial(_drop_index, kind, target))
                writes.append(
                    f"| {kind} | {with_index:,.0f} | {without:,.0f} |"
                    f" {100 * (without - with_index) / without:+.1f}% |"
                )
            finally:
                if kind != "sqlite":
                    with psycopg.connect(DSN, autocommit=True) as conn:
                        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print("\n# filling the history and rolling it up (once; then a minute's rows a minute)\n")
    print("| store | fill (s) | roll-up (s) |")
    print("|---|---|---|")
    for line in rolls:
        print(line)
    print(f"\n# the write path: {WRITES:,} evicting activations, changes committed a second\n")
    print("| store | with history_by_end | without | the index costs |")
    print("|---|---|---|---|")
    for line in writes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
