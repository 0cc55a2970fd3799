"""Instructions the server executes per request, this code against ``BENCH_BASE``.

The 2-core VMs this project is measured on drift by ±20% in throughput and CPU time
between identical runs, too much to see a change of 5%. Valgrind's callgrind counts
the instructions the server process executes, which do not depend on the machine's
other load: the same work gives the same count to within about 1%. The server runs
under callgrind with counting off while it starts and while redis-benchmark fills the
pool; counting is switched on (``callgrind_control -i on``) for a fixed number of
requests only, then off. Loads as in ``revisions``: PING and ACTIVATE at pipeline 16
and 1, 50 clients, 100,000 users, a pool of 10,000 (nearly every activation evicts), the
memory store. Needs valgrind (``make bench-tools``).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from ._drivers import redis_benchmark
from ._measure import Figure
from ._services import tokenpool_server
from .revisions import BASE, ROOT, _checkout, by_version

_LOADS = {  # name: (command, pipeline, requests counted)
    "PING, pipeline 16": (["PING"], 16, 100_000),
    "ACTIVATE, pipeline 16": (["ACTIVATE", "u__rand_int__"], 16, 40_000),
    "PING, pipeline 1": (["PING"], 1, 20_000),
    "ACTIVATE, pipeline 1": (["ACTIVATE", "u__rand_int__"], 1, 20_000),
}


def _count(tree: str, command: list[str], pipeline: int, requests: int, out: Path) -> float:
    """Instructions per request of ``requests`` of ``command`` on a warmed server."""
    wrap = (
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    )
    args = ("--dsn", "memory", "--size", "10000")
    with tokenpool_server(*args, cwd=tree, wrap=wrap) as server:
        redis_benchmark(
            server.port, command, clients=50, pipeline=16, requests=20_000, keyspace=100_000
        )
        subprocess.run(
            ["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True
        )
        redis_benchmark(
            server.port, command, clients=50, pipeline=pipeline, requests=requests, keyspace=100_000
        )
        subprocess.run(
            ["callgrind_control", "-i", "off", str(server.pid)], check=True, capture_output=True
        )
    found = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no totals in {out}")
    return int(found.group(1)) / requests


def run(quick: bool) -> list[Figure]:
    rounds = 1 if quick else 2
    counts: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenpool-instructions-") as tmp:
        trees = {"base": _checkout(BASE, tmp), "this": str(ROOT)}
        for round_ in range(rounds):
            for version, tree in trees.items():
                for name, (command, pipeline, requests) in _LOADS.items():
                    out = Path(tmp) / f"callgrind.{version}.{round_}.{len(counts)}"
                    n = requests // 4 if quick else requests
                    counts.setdefault((name, version), []).append(
                        _count(tree, command, pipeline, n, out)
                    )
    return by_version("server instructions per request", "instructions", "ir", counts)
