"""HTTP workers: ``tokenpool serve --http-workers 2`` (and 0) against the stronger seed
peer, FastAPI on uvicorn with 2 workers and a PostgreSQL transaction per activation
(``seed_uvicorn.py``), in one run, all on PostgreSQL.

``POST /api/tokens/activate``, 50 connections (wrk), random users among 100,000, a
pool of 10,000; runs interleaved; the ratio to the seed peer is taken run by run
(issue 19's goal: 3x its requests/s, p99 at most 20 ms, no non-2xx).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.chaos.server import free_port

from ._measure import Figure
from ._peers import pg_pool
from ._services import pg_schema, store_url, tokenpool_server, wait_for_port
from .http import CONNECTIONS, SIZE, Systems, interleaved, wrk_figures

SEED = "seed on uvicorn: 2 workers, psycopg_pool, one PostgreSQL transaction per request"


@contextmanager
def _tokenpool(store: str, workers: int) -> Iterator[int]:
    port = free_port()
    with tokenpool_server(
        "--http-port",
        str(port),
        "--dsn",
        store,
        "--size",
        str(SIZE),
        "--http-workers",
        str(workers),
    ):
        wait_for_port(port, 30.0)
        yield port


@contextmanager
def _seed() -> Iterator[int]:
    with pg_schema("seeduv") as schema:
        pg_pool(schema, SIZE)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.seed_uvicorn", "--port", str(port), "--schema", schema],
            cwd=Path(__file__).resolve().parent.parent,  # the checkout, where ``bench`` is
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, 30.0)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def run(quick: bool) -> list[Figure]:
    seconds = 3.0 if quick else 10.0
    rounds = 1 if quick else 3
    with pg_schema("httpworkers") as schema:
        url = store_url(schema)
        systems: Systems = {
            SEED: _seed,
            "tokenpool --http-workers 2 (postgresql)": lambda: _tokenpool(url, 2),
            "tokenpool --http-workers 0 (postgresql)": lambda: _tokenpool(url, 0),
        }
        results = interleaved(systems, rounds, seconds)
    figures = wrk_figures(results, "httpworkers")
    for name, runs in results.items():
        if name != SEED:
            ratios = tuple(
                mine["rps"] / seed["rps"] if seed["rps"] else float("nan")
                for mine, seed in zip(runs, results[SEED], strict=True)
            )
            figures.append(
                Figure(
                    f"HTTP activate, {name} / the uvicorn seed",
                    "x",
                    ratios,
                    {
                        "section": "httpworkers",
                        "system": name,
                        "connections": CONNECTIONS,
                        "metric": "ratio_to_seed",
                    },
                )
            )
    return figures
