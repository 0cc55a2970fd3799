"""The RESP server under redis-benchmark, with redis-server's PING as the machine's ceiling.

Needs ``redis-benchmark`` (Debian: redis-tools) and, for the ceiling,
``redis-server`` (Debian: redis-server); ``make bench`` installs them when
it can, and this module says exactly what is missing when they are not there.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ._measure import Figure

CLIENTS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def tokenpool_server(*args: str) -> Iterator[int]:
    """``python -m tokenpool serve`` on a free port, stopped with SIGTERM afterwards."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenpool",
            "serve",
            "--port",
            "0",
            "--log-format",
            "json",
            "--max-clients",
            "20000",
            *args,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        event = json.loads(line)
        if event.get("event") == "listening":
            port = int(event["ports"][0])
            break
    if not port:
        proc.kill()
        raise RuntimeError(f"tokenpool serve did not start: {proc.communicate()}")
    # Keep reading its log so a full pipe never stalls it.
    drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        drain.wait(timeout=5)


@contextmanager
def redis_server() -> Iterator[int]:
    """A redis-server of our own on a free port (or the machine's on 6379 if none can start)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield 6379
        return
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def redis_benchmark(
    port: int,
    command: list[str],
    *,
    clients: int,
    pipeline: int,
    requests: int,
    keyspace: int = 100_000,
) -> dict[str, float]:
    """One redis-benchmark run: requests/s and latency percentiles (ms)."""
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-c",
            str(clients),
            "-n",
            str(requests),
            "-P",
            str(pipeline),
            "-r",
            str(keyspace),
            "--csv",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no result: {out.stdout} {out.stderr}")
    row = rows[-1]
    return {
        "rps": float(row["rps"]),
        "p50_ms": float(row["p50_latency_ms"]),
        "p99_ms": float(row["p99_latency_ms"]),
    }


def missing_tools() -> list[str]:
    return [tool for tool in ("redis-benchmark",) if shutil.which(tool) is None]


def run(quick: bool) -> list[Figure]:
    missing = missing_tools()
    if missing:
        print(
            f"server benchmarks skipped: {', '.join(missing)} not found"
            " (Debian/Ubuntu: apt-get install redis-tools redis-server)",
            file=sys.stderr,
        )
        return []
    runs = 3 if quick else 5
    scale = 1 if quick else 3
    figures: list[Figure] = []
    samples: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    with (
        tokenpool_server("--dsn", "memory", "--size", "100", "--ttl", "3600") as tp,
        redis_server() as rs,
    ):
        for _ in range(runs):  # interleaved, so drift hits every system alike
            for pipeline in (1, 16):
                n = (20_000 if pipeline == 1 else 200_000) * scale
                for system, port, command in (
                    ("redis-server", rs, ["PING"]),
                    ("tokenpool", tp, ["PING"]),
                    ("tokenpool", tp, ["ACTIVATE", "__rand_int__"]),
                ):
                    key = (system, command[0], pipeline)
                    samples.setdefault(key, []).append(
                        redis_benchmark(
                            port, command, clients=CLIENTS, pipeline=pipeline, requests=n
                        )
                    )
    for (system, name, pipeline), rows in samples.items():
        params = {
            "system": system,
            "command": name,
            "pipeline": pipeline,
            "clients": CLIENTS,
            "path": "resp",
        }
        label = f"{system} {name}, {CLIENTS} clients, pipeline {pipeline}"
        figures.append(
            Figure(f"{label}: requests/s", "requests/s", tuple(r["rps"] for r in rows), params)
        )
        figures.append(Figure(f"{label}: p50", "ms", tuple(r["p50_ms"] for r in rows), params))
        figures.append(Figure(f"{label}: p99", "ms", tuple(r["p99_ms"] for r in rows), params))
    for pipeline in (1, 16):
        ping = samples[("tokenpool", "PING", pipeline)]
        act = samples[("tokenpool", "ACTIVATE", pipeline)]
        ratios = tuple(a["rps"] / p["rps"] for a, p in zip(act, ping, strict=True))
        figures.append(
            Figure(
                f"tokenpool ACTIVATE / its own PING, pipeline {pipeline}",
                "ratio (same run)",
                ratios,
                {"pipeline": pipeline, "path": "ratio"},
            )
        )
    return figures
