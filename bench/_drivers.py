"""The load drivers, each a tool nobody here wrote: redis-benchmark for anything that
speaks RESP, pgbench for PostgreSQL. Each run is sized to last about ``seconds``
(a short probe first measures the rate), and returns throughput and latency
percentiles in one shape, so systems driven by different tools line up.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

import attrs


@attrs.frozen
class Run:
    """One closed-loop run: requests per second and latency percentiles in ms."""

    rps: float
    p50: float
    p99: float
    p999: float
    requests: int
    seconds: float
    refused: int = 0  # error replies among ``requests``: not counted in ``rps``


class RefusedError(RuntimeError):
    """The server answered an error, and redis-benchmark stops at the first one."""


_PERCENTILE = re.compile(r"^\s*([\d.]+)% <= ([\d.]+) milliseconds", re.M)
_THROUGHPUT = re.compile(r"throughput summary: ([\d.]+) requests per second")
_ELAPSED = re.compile(r"(\d+) requests completed in ([\d.]+) seconds")


def _at_or_above(points: list[tuple[float, float]], q: float) -> float:
    """redis-benchmark prints HdrHistogram's percentile ticks: take the first at or past q."""
    for pct, ms in points:
        if pct >= q:
            return ms
    return points[-1][1]


def redis_benchmark(
    port: int,
    command: list[str],
    *,
    clients: int,
    pipeline: int,
    requests: int,
    keyspace: int,
) -> Run:
    """One redis-benchmark run (``__rand_int__`` in ``command`` ranges over ``keyspace``)."""
    done = subprocess.run(
        [
            *("redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients)),
            *("-n", str(requests), "-P", str(pipeline), "-r", str(keyspace), *command),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        if "Error from server" in done.stdout + done.stderr:
            raise RefusedError(done.stdout.rsplit("\r", 1)[-1].strip()[-300:])
        raise RuntimeError(f"redis-benchmark failed: {done.stderr[-1000:]}")
    out = done.stdout
    # Progress lines end in \r; the report follows the last one.
    report = out.rsplit("\r", 1)[-1]
    points = [(float(p), float(ms)) for p, ms in _PERCENTILE.findall(report)]
    throughput = _THROUGHPUT.search(report)
    elapsed = _ELAPSED.search(report)
    if not points or throughput is None or elapsed is None:
        raise RuntimeError(f"redis-benchmark printed no result: {out[-2000:]}")
    return Run(
        rps=float(throughput.group(1)),
        p50=_at_or_above(points, 50.0),
        p99=_at_or_above(points, 99.0),
        p999=_at_or_above(points, 99.9),
        requests=int(elapsed.group(1)),
        seconds=float(elapsed.group(2)),
    )


def sized_redis_benchmark(
    port: int,
    command: list[str],
    *,
    clients: int,
    pipeline: int,
    keyspace: int,
    seconds: float,
) -> Run:
    """A probe run, then a run of as many requests as the probe's rate does in ``seconds``."""
    floor = clients * pipeline * 4
    probe = redis_benchmark(
        port,
        command,
        clients=clients,
        pipeline=pipeline,
        requests=max(floor, 2000),
        keyspace=keyspace,
    )
    requests = max(floor, int(probe.rps * seconds))
    return redis_benchmark(
        port, command, clients=clients, pipeline=pipeline, requests=requests, keyspace=keyspace
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def pgbench(
    dsn: str,
    script: str,
    *,
    clients: int,
    seconds: float,
    variables: dict[str, str],
    options: str = "",
    rate: float | None = None,
) -> Run:
    """One pgbench run of ``script`` (prepared statements); latencies from its per-transaction log.

    With ``rate``, pgbench schedules transactions at that constant rate (open loop) and
    the latency is counted from each transaction's scheduled start, lag included.
    """
    with tempfile.TemporaryDirectory(prefix="tokenpool-pgbench-") as tmp:
        path = os.path.join(tmp, "script.sql")
        with open(path, "w") as f:
            f.write(script)
        argv = ["pgbench", "-n", "-M", "prepared", "-f", path, "-c", str(clients)]
        argv += ["-j", str(min(clients, 2)), "-T", str(max(1, round(seconds)))]
        argv += ["-l", "--log-prefix", os.path.join(tmp, "log")]
        for name, value in variables.items():
            argv += ["-D", f"{name}={value}"]
        if rate is not None:
            argv += ["-R", str(rate)]
        argv.append(dsn.split("?")[0])  # a connection string, as pgbench's dbname
        env = {**os.environ, "PGOPTIONS": options}
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=600, check=False, env=env, cwd=tmp
        )
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed: {done.stderr[-2000:]}")
        latencies: list[float] = []
        first = last = None
        for name in glob.glob(os.path.join(tmp, "log*")):
            with open(name) as f:
                for line in f:
                    fields = line.split()
                    # client, transaction no, latency us, script, epoch s, us[, schedule lag us]
                    us = float(fields[2])
                    if len(fields) > 6:
                        us += float(fields[6])
                    latencies.append(us / 1000)
                    at = float(fields[4]) + float(fields[5]) / 1e6
                    first = at if first is None else min(first, at)
                    last = at if last is None else max(last, at)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    if tps is None or not latencies:
        raise RuntimeError(f"pgbench printed no result: {done.stdout[-2000:]}")
    latencies.sort()
    return Run(
        rps=float(tps.group(1)),
        p50=_percentile(latencies, 50),
        p99=_percentile(latencies, 99),
        p999=_percentile(latencies, 99.9),
        requests=len(latencies),
        seconds=(last - first) if first is not None and last is not None else seconds,
    )


def missing(*tools: str) -> list[str]:
    """The tools of ``tools`` that are not on PATH."""
    return [tool for tool in tools if shutil.which(tool) is None]
