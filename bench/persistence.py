"""Write-behind to PostgreSQL: throughput and lag under offered load, sync latency, recovery.

Needs a PostgreSQL server: ``TOKENPOOL_BENCH_DSN`` (default: the local one,
``postgresql://postgres@127.0.0.1:5432/test``). Each figure uses a schema of
its own, dropped afterwards.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import psycopg
import trio

from tokenpool import open_pool

from ._measure import Figure, repeat

DSN = os.environ.get("TOKENPOOL_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_users = itertools.count()


@contextmanager
def _schema() -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{DSN}?schema={name}"
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100)[q - 1]


async def _offered_load(url: str, rate: int, seconds: float) -> dict[str, float]:
    """Activations at a constant ``rate`` (open loop: 1 ms ticks, whatever the replies do)."""
    async with open_pool(size=1000, ttl=3600, store=url) as pool:
        start = trio.current_time()
        sent = 0
        while (now := trio.current_time()) - start < seconds:
            due = int((now - start) * rate) - sent
            if due > 0:
                await pool.activate_many([f"u{next(_users)}" for _ in range(due)])
                sent += due
            await trio.sleep_until(now + 0.001)
        elapsed = trio.current_time() - start
        await pool.flush()
        writer = pool.statistics().writer
        assert writer is not None
    return {
        "changes_per_s": writer.changes_written / elapsed,
        "lag_p50_ms": _pct(list(writer.lags), 50) * 1000,
        "lag_p99_ms": _pct(list(writer.lags), 99) * 1000,
        "batch_median": writer.batch_p50,
    }


async def _sync_latency(url: str, callers: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    async with open_pool(size=1000, ttl=3600, store=url, durability="sync") as pool:

        async def caller() -> None:
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                t = time.perf_counter()
                await pool.activate(f"s{next(_users)}")
                latencies.append(time.perf_counter() - t)

        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller)
    return latencies


def _populate(url: str, tokens: int, history: int) -> None:
    """A pool of ``tokens`` with ``history`` usage rows, written straight in SQL."""

    async def create() -> None:
        async with open_pool(size=tokens, ttl=3600, store=url):
            pass

    trio.run(create)
    schema = url.rsplit("schema=", 1)[1]
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute(
            "INSERT INTO token_usage_history (pool_id, revision, lease_id, token_id, fence,"
            " started_at, ended_at, expiration_reason, user_id)"
            " SELECT 1, g, gen_random_uuid(), t.id, g, now() - interval '1 day',"
            " now() - interval '1 day' + g * interval '1 ms', 'expired', 'user-' || (g %% 50000)"
            " FROM generate_series(1, %s) g"
            " JOIN (SELECT id, row_number() OVER () - 1 AS n FROM tokens) t"
            " ON t.n = g %% %s",
            (history, tokens),
        )
        conn.execute("ANALYZE")


def _recovery_seconds(url: str, tokens: int) -> float:
    async def reopen() -> float:
        start = time.perf_counter()
        async with open_pool(size=tokens, ttl=3600, store=url):
            return time.perf_counter() - start

    return trio.run(reopen)


def run(quick: bool) -> list[Figure]:
    seconds = 1.0 if quick else 5.0
    runs = 3 if quick else 5
    figures: list[Figure] = []
    for rate in (10_000,) if quick else (1_000, 10_000):
        samples = []
        for _ in range(runs):
            with _schema() as url:
                samples.append(trio.run(_offered_load, url, rate, seconds))
        for key, unit in (
            ("changes_per_s", "changes/s written"),
            ("lag_p50_ms", "ms write lag p50"),
            ("lag_p99_ms", "ms write lag p99"),
            ("batch_median", "changes per batch (median)"),
        ):
            figures.append(
                Figure(
                    f"write-behind at {rate:,} activations/s: {unit}",
                    unit,
                    tuple(s[key] for s in samples),
                    {"rate": rate, "path": "persistence"},
                )
            )
    for callers in (1, 100):
        p50, p99 = [], []
        for _ in range(runs):
            with _schema() as url:
                lat = trio.run(_sync_latency, url, callers, seconds / 2)
            p50.append(_pct(lat, 50) * 1000)
            p99.append(_pct(lat, 99) * 1000)
        params = {"callers": callers, "path": "sync"}
        figures.append(Figure(f"sync activate, {callers} callers: p50", "ms", tuple(p50), params))
        figures.append(Figure(f"sync activate, {callers} callers: p99", "ms", tuple(p99), params))
    tokens = 100_000
    for history in () if quick else (100_000, 1_000_000):  # populating takes a while
        with _schema() as url:
            _populate(url, tokens, history)
            figures.append(
                repeat(
                    f"recovery of {tokens:,} tokens with {history:,} history rows",
                    "s",
                    runs,
                    partial(_recovery_seconds, url, tokens),
                    tokens=tokens,
                    history=history,
                    path="recovery",
                )
            )
    return figures
