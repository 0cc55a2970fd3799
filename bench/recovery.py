"""Recovery of many small pools: seconds from ``open_pools(store)`` until it yields.

``python -m bench.recovery [POOLS] [sqlite|postgresql ...]`` creates POOLS pools of
size 2 (default 3,000), one lease in each, in a fresh SQLite file and a fresh
PostgreSQL schema (``TOKENPOOL_BENCH_DSN``, default the local server), closes them,
then times one restart of each store until every pool is served.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid

import psycopg
import trio

from tokenpool import PoolSettings, open_pools

DSN = os.environ.get("TOKENPOOL_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _fill(url: str, pools: int) -> float:
    declared = {f"p{i}": PoolSettings.make(size=2, ttl=600) for i in range(pools)}
    started = time.perf_counter()
    async with open_pools(url, declared=declared, restore=False) as served:
        for name in declared:
            await served.get(name).activate("alice")
        for name in declared:
            await served.get(name).flush()
    return time.perf_counter() - started


async def _restart(url: str, pools: int) -> float:
    started = time.perf_counter()
    async with open_pools(url) as served:
        seconds = time.perf_counter() - started
        assert len(served.names()) == pools, len(served.names())
    return seconds


def main(argv: list[str]) -> int:
    pools = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 3000
    kinds = [a for a in argv[1:] if not a.isdigit()] or ["sqlite", "postgresql"]
    for kind in kinds:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with tempfile.TemporaryDirectory() as directory:
            if kind == "sqlite":
                url = f"sqlite:///{directory}/recovery.db"
            else:
                url = f"{DSN}?schema={schema}"
            try:
                filled = trio.run(_fill, url, pools)
                seconds = trio.run(_restart, url, pools)
            finally:
                if kind != "sqlite":
                    with psycopg.connect(DSN, autocommit=True) as conn:
                        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        print(
            f"{kind}: {pools} pools of 2 (one lease each) recovered in {seconds:.2f} s"
            f" (created in {filled:.2f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
