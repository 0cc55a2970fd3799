"""What each store carries: history rows a second through tokenpool's own store code.

The same measurement as the throughput issue's table: 200,000 ended leases (END
records with their grants, on the default pool of 100 tokens, 100,000 users as in
the load tests) written in batches of 5,000, by the store classes the
store process runs (SQLite ``executemany`` over plain tuples with integer keys;
PostgreSQL binary ``COPY`` into a staging table), timed from Python, one
transaction per batch. ``--quick``: 50,000 rows.
"""

from __future__ import annotations

import tempfile
import time
from uuid import uuid4

from tokenpool._model import END, GRANT
from tokenpool._store import Batch, SlotTokens, open_store

from ._measure import Figure
from ._services import pg_schema, store_url

BATCH = 5_000
SIZE = 100  # the default pool: every activation evicts, so each writes a history row
USERS = 100_000  # as in the load tests
TTL_US = 120_000_000


def _rows_per_second(url: str, rows: int) -> float:
    store = open_store(url, write_timeout=30.0, durability="async")
    try:
        settings = {
            "size": SIZE,
            "ttl": 120.0,
            "when_full": "evict",
            "min_hold": 0.0,
            "max_lifetime": None,
        }
        snapshot = store.open_pool("rows", settings, True)
        pool_id = snapshot.pool_id
        tokens = SlotTokens(token for token, _ in snapshot.tokens)
        if not len(tokens):  # a new pool: its tokens come as ADD records, as the server sends
            tokens = SlotTokens(str(uuid4()) for _ in range(SIZE))
            add = Batch()
            add.tokens_added = [(slot, tokens[slot], 1) for slot in range(len(tokens))]
            add.records = 1
            add.revision = 1
            store.write(pool_id, add, tokens, False)
        revision = 10
        now = 1_000_000_000_000
        started = time.perf_counter()
        for first in range(0, rows, BATCH):
            batch = Batch()
            records: list[tuple[object, ...]] = []
            for i in range(first, first + BATCH):
                slot = i % SIZE
                revision += 1
                lease = f"00000000-0000-4000-8000-{i:012d}"
                records.append(
                    (GRANT, lease, slot, f"user-{i % USERS}", revision, now, now + TTL_US, revision)
                )
                revision += 1
                records.append(
                    (
                        END,
                        lease,
                        slot,
                        f"user-{i % USERS}",
                        revision - 1,
                        now,
                        now + 1,
                        revision,
                        "evicted",
                    )
                )
                now += 10
            batch.add(records, {"activations": first + BATCH}, now)
            store.write(pool_id, batch, tokens, False)
        return rows / (time.perf_counter() - started)
    finally:
        store.close()


def run(quick: bool) -> list[Figure]:
    rows = 50_000 if quick else 200_000
    runs = 1 if quick else 3
    sqlite_runs: list[float] = []
    pg_runs: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            sqlite_runs.append(_rows_per_second(f"sqlite:///{tmp}/rows.db", rows))
        with pg_schema("rows") as schema:
            pg_runs.append(_rows_per_second(store_url(schema), rows))
    return [
        Figure(
            "SQLite store: history rows/s (batches of 5,000, with their grants)",
            "rows/s",
            tuple(sqlite_runs),
            {"section": "stores", "store": "sqlite", "metric": "rows"},
        ),
        Figure(
            "PostgreSQL store: history rows/s (batches of 5,000, with their grants)",
            "rows/s",
            tuple(pg_runs),
            {"section": "stores", "store": "postgresql", "metric": "rows"},
        ),
    ]
