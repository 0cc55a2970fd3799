"""``python -m tests.chaos [RUN ...] [--clients N] [--operations N] [--dsn URL]``.

Runs the reliability runs against real ``tokenpool serve`` processes and prints a
summary table (operations, clients, faults injected, anomalies found,
acknowledged changes lost, double holders, peak memory). Exits 1 if any run
found an anomaly. ``make chaos`` runs the long versions.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable

import attrs

from . import http_hostile, lifecycle, nodes, runs
from .history import Workload

RUNS: dict[str, Callable[[argparse.Namespace], runs.Summary]] = {
    "history": lambda a: runs.history_run(_workload(a), dsn=a.dsn, durability="async")[0],
    "history-sync": lambda a: runs.history_run(_workload(a), dsn=a.dsn, durability="sync")[0],
    "crash-sync": lambda a: runs.crash_run(_workload(a), dsn=a.dsn, durability="sync"),
    "crash-async": lambda a: runs.crash_run(_workload(a), dsn=a.dsn, durability="async"),
    "sigterm": lambda a: runs.crash_run(
        _workload(a), dsn=a.dsn, durability="async", terminate=True
    ),
    "sigint": lambda a: runs.crash_run(
        _workload(a),
        dsn=a.dsn,
        durability="async",
        terminate=True,
        pid_signal=signal.SIGINT,
        name="sigint (async)",
    ),
    "sigterm-group": lambda a: runs.crash_run(
        _workload(a),
        dsn=a.dsn,
        durability="async",
        group_signal=signal.SIGTERM,
        name="sigterm to the group (async)",
    ),
    "sigint-group": lambda a: runs.crash_run(
        _workload(a),
        dsn=a.dsn,
        durability="async",
        group_signal=signal.SIGINT,
        name="sigint to the group (async)",
    ),
    "store-killed": lambda a: lifecycle.store_killed_run(a.clients, a.operations, dsn=a.dsn),
    "store-paused": lambda a: lifecycle.store_paused_run(a.clients, a.operations, dsn=a.dsn),
    "shutdown-waiters": lambda a: lifecycle.shutdown_waiters_run(
        a.clients, a.operations, dsn=a.dsn
    ),
    "ownership": lambda a: lifecycle.ownership_run(dsn=a.dsn),
    "outage-async": lambda a: runs.outage_run(_workload(a), durability="async"),
    "outage-sync": lambda a: runs.outage_run(_workload(a), durability="sync"),
    # The long run (200,000 operations): 3,000 pools and a CLEAR of 50,000 leases.
    "hostile": lambda a: runs.hostile_run(
        pools=max(300, min(3_000, a.operations // 60)),
        clear=max(5_000, min(50_000, a.operations // 4)),
    ),
    "clock": lambda a: runs.clock_run(_workload(a), dsn=a.dsn),
    # issue 19's HTTP attacks at the sizes it measured them (in-process HTTP, workers)
    "http-attacks": lambda a: http_hostile.attacks_run(dsn=a.dsn)[0],
    "http-attacks-workers": lambda a: http_hostile.attacks_run(dsn=a.dsn, workers=2)[0],
    "cluster-sync": lambda a: nodes.cluster_run(
        a.clients, a.operations, dsn=a.dsn, durability="sync"
    ),
    "cluster-async": lambda a: nodes.cluster_run(
        a.clients, a.operations, dsn=a.dsn, durability="async"
    ),
}


def _workload(args: argparse.Namespace) -> Workload:
    return Workload(clients=args.clients, operations=args.operations, seed=args.seed)


def table(rows: list[runs.Summary]) -> str:
    lines = [
        "| run | operations | clients | faults injected | anomalies | acknowledged lost"
        " | double holders | max memory | worst PING |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ping = "-" if r.worst_ping_ms is None else f"{r.worst_ping_ms:.0f} ms"
        if r.p99_ping_ms is not None:
            ping += f" (p99 {r.p99_ping_ms:.0f} ms)"
        lines.append(
            f"| {r.run} | {r.operations:,} | {r.clients} | {r.faults} | {r.anomalies}"
            f" | {r.lost_acknowledged} | {r.double_holders} | {r.max_rss_mb:.0f} MB | {ping} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("runs", nargs="*", default=list(RUNS), help=f"of {', '.join(RUNS)}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--dsn", default=None, help="PostgreSQL URL (default: a throwaway SQLite file)"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for name in args.runs:
        if name not in RUNS:
            parser.error(f"unknown run {name!r}; known: {', '.join(RUNS)}")
        print(f"running {name} ...", flush=True)
        rows.append(RUNS[name](args))
        for line in rows[-1].detail:
            print(f"  {line}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([attrs.asdict(r) for r in rows], f, indent=2)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
