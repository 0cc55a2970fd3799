"""This code against an earlier revision (``BENCH_BASE``, default the last commit before
the command-layer redesign), in one run: the server's own CPU time per request.

Throughput on a shared 2-core machine drifts by ±20% between identical runs, so the
figure that carries the meaning is the server process's CPU (utime + stime from
``/proc``) spent per request, around a fixed amount of work, in interleaved rounds
(base, this, base, this...), medians. Loads: RESP PING and ACTIVATE (100,000 users, a
pool of 10,000: nearly every activation evicts) at pipeline 16 and 1 (redis-benchmark,
50 clients), and HTTP ``POST /api/tokens/activate`` (wrk, 50 connections). Memory store:
the write-behind is not what changed.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.chaos.server import free_port

from ._drivers import redis_benchmark
from ._measure import Figure
from ._services import tokenpool_server, wait_for_port
from .http import wrk

BASE = os.environ.get("BENCH_BASE", "38a0ad3")
ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _checkout(rev: str, into: str) -> str:
    """``rev``'s tree (the package only: what the server runs) in ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "tokenpool"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def _loads(quick: bool) -> dict[str, tuple[Callable[[int, int], tuple[int, float]], str]]:
    """name -> (run(resp_port, http_port) -> (requests done, requests/s), protocol)."""
    scale = 0.25 if quick else 1.0

    def resp(
        command: list[str], pipeline: int, requests: int
    ) -> Callable[[int, int], tuple[int, float]]:
        def run(port: int, _http: int) -> tuple[int, float]:
            done = redis_benchmark(
                port,
                command,
                clients=50,
                pipeline=pipeline,
                requests=int(requests * scale),
                keyspace=100_000,
            )
            return done.requests, done.rps

        return run

    def http(_port: int, http_port: int) -> tuple[int, float]:
        seconds = 2.0 if quick else 5.0
        got = wrk(http_port, seconds)
        return int(got["rps"] * seconds), got["rps"]

    return {
        "PING, pipeline 16": (resp(["PING"], 16, 400_000), "resp"),
        "ACTIVATE, pipeline 16": (resp(["ACTIVATE", "u__rand_int__"], 16, 200_000), "resp"),
        "PING, pipeline 1": (resp(["PING"], 1, 60_000), "resp"),
        "ACTIVATE, pipeline 1": (resp(["ACTIVATE", "u__rand_int__"], 1, 40_000), "resp"),
        "HTTP activate": (http, "http"),
    }


def run(quick: bool) -> list[Figure]:
    rounds = 1 if quick else 3
    loads = _loads(quick)
    per_request: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenpool-base-") as tmp:
        trees = {"base": _checkout(BASE, tmp), "this": str(ROOT)}
        for _ in range(rounds):
            for version, tree in trees.items():
                http_port = free_port()
                args = ("--dsn", "memory", "--size", "10000", "--http-port", str(http_port))
                # HTTP in the server's process in both versions (this one's default
                # is worker processes; the variable is ignored by versions before it)
                in_process = {"TOKENPOOL_HTTP_WORKERS": "0"}
                with tokenpool_server(*args, cwd=tree, env=in_process) as server:
                    wait_for_port(http_port, 20.0)
                    for name, (load, _kind) in loads.items():
                        before = cpu_seconds(server.pid)
                        done, rps = load(server.port, http_port)
                        spent = cpu_seconds(server.pid) - before
                        per_request.setdefault((name, version), []).append(
                            spent / max(done, 1) * 1e6
                        )
                        rates.setdefault((name, version), []).append(rps)
    return by_version("server CPU per request", "us", "cpu", per_request) + by_version(
        "requests/s", "req/s", "rps", rates
    )


def by_version(
    title: str, unit: str, metric: str, runs: dict[tuple[str, str], list[float]]
) -> list[Figure]:
    """A figure per (load, version) of ``runs``, named ``<title>: <load> (<version>)``."""
    return [
        Figure(
            f"{title}: {name} ({version})",
            unit,
            tuple(values),
            {"load": name, "version": BASE if version == "base" else "this", "metric": metric},
        )
        for (name, version), values in runs.items()
    ]
