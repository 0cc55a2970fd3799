"""Latency under a fixed offered load: a constant request rate, not as fast as possible.

Each system is offered ACTIVATE of random users (100,000) at 5,000 and 20,000 per
second for 30 s (1 s with ``--quick``); latency counts from when each request was
due, so a stall shows in the percentiles instead of slowing the sender
(coordinated omission). tokenpool (``async``, on PostgreSQL and on the default
SQLite store) and Redis + Lua get the open-loop RESP generator, which also reports
its own lateness (how long after its due time each request was queued: if that
grows, the generator is the bottleneck, not the server); PostgreSQL only gets
pgbench ``--rate``, which counts from the scheduled start the same way. For
tokenpool, the server's own pauses over 5 ms during the run (``INFO pauses``:
collections, and how late its loop's heartbeat woke) are counted too.
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from functools import partial
from typing import Any

from tokenpool._resp import encode_command as encode

from ._measure import Figure
from ._openloop import open_loop
from ._systems import RespSystem, pg_only, redis_lua, tokenpool_resp

USERS = 100_000
RATES = (5_000, 20_000)


def _request(template: tuple[str, ...], rng: random.Random) -> bytes:
    user = str(rng.randrange(USERS))
    return encode(*(user if arg == "__rand_int__" else arg for arg in template))


def run(quick: bool) -> list[Figure]:
    reps = 3
    seconds = 1.0 if quick else 30.0
    if not quick:
        reps = 1  # a 30 s run holds ~600k samples: its percentiles are already stable
    samples: dict[tuple[str, int], list[Any]] = {}
    pauses: dict[tuple[str, int], list[dict[str, int]]] = {}
    with ExitStack() as stack:
        resp = [
            stack.enter_context(tokenpool_resp("tokenpool async", 10_000)),
            stack.enter_context(tokenpool_resp("tokenpool sqlite", 10_000, store="sqlite")),
            stack.enter_context(redis_lua(10_000)),
        ]
        _, pg = stack.enter_context(pg_only(10_000))
        for _ in range(reps):
            for rate in RATES:
                for system in resp:
                    system.settle()
                    before = _long_pauses(system)
                    result = open_loop(
                        system.port, partial(_request, system.activate), rate=rate, seconds=seconds
                    )
                    samples.setdefault((system.name, rate), []).append(result)
                    if before is not None:
                        after = _long_pauses(system)
                        assert after is not None
                        pauses.setdefault((system.name, rate), []).append(
                            {cause: after[cause] - before[cause] for cause in after}
                        )
                samples.setdefault((pg.name, rate), []).append(
                    pg.run(clients=50, users=USERS, seconds=seconds, rate=rate)
                )
    figures: list[Figure] = []
    for (name, rate), runs in samples.items():
        for attr, title, unit in (
            ("rps", "served/s", "requests/s"),
            ("refused", "refused or unanswered", "requests"),
            ("p50", "p50", "ms"),
            ("p99", "p99", "ms"),
            ("p999", "p99.9", "ms"),
            ("late_p99", "the generator's own lateness p99", "ms"),
        ):
            if not hasattr(runs[0], attr):  # pgbench reports no lateness of its own
                continue
            figures.append(
                Figure(
                    f"{name}: {rate:,} activations/s offered: {title}",
                    unit,
                    tuple(getattr(r, attr) for r in runs),
                    {"section": "openloop", "system": name, "rate": rate, "metric": attr},
                )
            )
    for (name, rate), counts in pauses.items():
        for cause in ("gc", "loop"):
            figures.append(
                Figure(
                    f"{name}: {rate:,} activations/s offered: {cause} pauses over 5 ms",
                    "pauses",
                    tuple(c[cause] for c in counts),
                    {"section": "openloop", "system": name, "rate": rate, "metric": cause},
                )
            )
    return figures


def _long_pauses(system: RespSystem) -> dict[str, int] | None:
    """Per cause, how many pauses over 5 ms the server has counted (None: not tokenpool)."""
    if not system.name.startswith("tokenpool"):
        return None
    fields = system.info("pauses")
    counts = {}
    for cause in ("gc", "loop"):
        buckets = dict(part.split("=") for part in fields[f"{cause}_pause_histogram_ms"].split(","))
        counts[cause] = int(buckets["inf"]) - int(buckets["le5"])
    return counts
