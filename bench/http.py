"""HTTP: ``POST /api/tokens/activate`` at 50 connections, measured with wrk.

tokenpool (its HTTP API, default SQLite store and PostgreSQL store, async) beside
the seed's own stack shape: the same endpoint doing one PostgreSQL transaction
per request (``seed_http.py``). Random users among 100,000, a pool of 10,000;
runs interleaved, ratios taken run by run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from tests.chaos.server import free_port

from ._measure import Figure
from ._peers import pg_pool
from ._services import pg_schema, store_url, tokenpool_server, wait_for_port

USERS = 100_000
SIZE = 10_000
CONNECTIONS = 50

SCRIPT = f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local user = math.random(1, {USERS})
  return wrk.format(nil, "/api/tokens/activate", nil, '{{"user_id": "u' .. user .. '"}}')
end
"""


def wrk(port: int, seconds: float) -> dict[str, float]:
    """Requests/s, p99 (ms) and the non-2xx count of one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(SCRIPT)
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{CONNECTIONS}",
                f"-d{seconds:g}s",
                "--latency",
                "-s",
                f.name,
                f"http://127.0.0.1:{port}/api/tokens/activate",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": rps, "p99_ms": p99_ms, "non_2xx": float(bad.group(1)) if bad else 0.0}


@contextmanager
def _tokenpool(store: str) -> Iterator[int]:
    port = free_port()
    args = ("--http-port", str(port), "--dsn", store, "--size", str(SIZE))
    with tokenpool_server(*args, "--http-workers", "0"):  # in-process: --only httpworkers
        wait_for_port(port, 20.0)
        yield port


@contextmanager
def _seed() -> Iterator[int]:
    with pg_schema("seedhttp") as schema:
        pg_pool(schema, SIZE)
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.seed_http",
                "--port",
                str(port),
                "--schema",
                schema,
            ],
            cwd=Path(__file__).resolve().parent.parent,  # the checkout, where ``bench`` is
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, 20.0)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=30)


Systems = dict[str, Callable[[], AbstractContextManager[int]]]
"""Each system: a context giving the HTTP port of a fresh server."""


def interleaved(systems: Systems, rounds: int, seconds: float) -> dict[str, list[dict[str, float]]]:
    """wrk against each system in turn, ``rounds`` times (a fresh server each run, warmed
    up for a second): each system's runs, in order."""
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(rounds):
        for name, make in systems.items():
            with make() as port:
                wrk(port, 1.0)  # warm up: connections, caches, the first batches
                results.setdefault(name, []).append(wrk(port, seconds))
    return results


def wrk_figures(results: dict[str, list[dict[str, float]]], section: str) -> list[Figure]:
    """Requests a second, p99 and non-2xx of each system's runs."""
    figures: list[Figure] = []
    for name, runs in results.items():
        params = {"section": section, "system": name, "connections": CONNECTIONS}
        for key, title, unit, metric in (
            ("rps", f"HTTP activate, {CONNECTIONS} connections", "requests/s", "rps"),
            ("p99_ms", "HTTP activate p99", "ms", "p99"),
            ("non_2xx", "HTTP activate non-2xx", "responses", "non_2xx"),
        ):
            figures.append(
                Figure(
                    f"{title}: {name}",
                    unit,
                    tuple(r[key] for r in runs),
                    {**params, "metric": metric},
                )
            )
    return figures


def run(quick: bool) -> list[Figure]:
    seconds = 3.0 if quick else 10.0
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        systems: Systems = {
            "tokenpool http (sqlite)": lambda: _tokenpool(f"sqlite:///{tmp}/bench.db"),
            "seed shape: one PostgreSQL transaction per request": _seed,
        }
        with pg_schema("httpbench") as schema:
            systems["tokenpool http (postgresql)"] = lambda: _tokenpool(store_url(schema))
            results = interleaved(systems, rounds, seconds)
    return wrk_figures(results, "http")
