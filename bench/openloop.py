"""Latency under a fixed offered load: a constant request rate, not as fast as possible.

Each system is offered ACTIVATE of random users (100,000) at 5,000 and 20,000 per
second for 30 s (5 s with ``--quick``); latency counts from when each request was
due, so a stall shows in the percentiles instead of slowing the sender
(coordinated omission). tokenpool (``async``, PostgreSQL store) and Redis + Lua get
the open-loop RESP generator; PostgreSQL only gets pgbench ``--rate``, which
counts from the scheduled start the same way.
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from functools import partial
from typing import Any

from tokenpool._resp import encode_command as encode

from ._measure import Figure
from ._openloop import open_loop
from ._systems import pg_only, redis_lua, tokenpool_resp

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
    with ExitStack() as stack:
        resp = [
            stack.enter_context(tokenpool_resp("tokenpool async", 10_000)),
            stack.enter_context(redis_lua(10_000)),
        ]
        _, pg = stack.enter_context(pg_only(10_000))
        for _ in range(reps):
            for rate in RATES:
                for system in resp:
                    system.settle()
                    result = open_loop(
                        system.port, partial(_request, system.activate), rate=rate, seconds=seconds
                    )
                    samples.setdefault((system.name, rate), []).append(result)
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
        ):
            figures.append(
                Figure(
                    f"{name}: {rate:,} activations/s offered: {title}",
                    unit,
                    tuple(getattr(r, attr) for r in runs),
                    {"section": "openloop", "system": name, "rate": rate, "metric": attr},
                )
            )
    return figures
