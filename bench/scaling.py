"""How throughput holds as the pool and the number of connections grow.

- Pool size 100, 10,000 and 1,000,000 tokens: ACTIVATE at 50 clients, pipeline 16,
  100,000 users, tokenpool (in memory, to isolate the pool's data structures from
  the store) and Redis + Lua. tokenpool's operations are O(1)/O(log n), so its rate
  should stay flat. At size 100 nearly every activation evicts; at 1,000,000 none
  does in a run this short (the pool never fills), which is the cheaper path.
- Connections 1, 10, 100 and 1,000: ACTIVATE at pipeline 1 on pools of 10,000, the
  same two systems (and PostgreSQL only up to its ``max_connections``).
"""

from __future__ import annotations

from contextlib import ExitStack

from ._drivers import Run
from ._measure import Figure, run_figures
from ._systems import pg_max_clients, pg_only, redis_lua, tokenpool_resp

USERS = 100_000


def run(quick: bool) -> list[Figure]:
    reps = 3
    seconds = 0.5 if quick else 2.0
    samples: dict[tuple[str, str, int, int, int], list[Run]] = {}
    for size in (100, 1_000_000) if quick else (100, 10_000, 1_000_000):
        with ExitStack() as stack:
            systems = [
                stack.enter_context(tokenpool_resp("tokenpool (memory)", size, store="memory")),
                stack.enter_context(redis_lua(size)),
            ]
            for _ in range(reps):
                for system in systems:
                    samples.setdefault((system.name, "size", size, 50, 16), []).append(
                        system.run(clients=50, pipeline=16, users=USERS, seconds=seconds)
                    )
    connections = (1, 1000) if quick else (1, 10, 100, 1000)
    pg_cap = pg_max_clients()
    with ExitStack() as stack:
        systems = [
            stack.enter_context(tokenpool_resp("tokenpool (memory)", 10_000, store="memory")),
            stack.enter_context(redis_lua(10_000)),
        ]
        if not quick:
            systems.insert(1, stack.enter_context(tokenpool_resp("tokenpool async", 10_000)))
        pg, _ = stack.enter_context(pg_only(10_000))
        for _ in range(reps):
            for clients in connections:
                for system in systems:
                    samples.setdefault((system.name, "clients", 10_000, clients, 1), []).append(
                        system.run(clients=clients, pipeline=1, users=USERS, seconds=seconds)
                    )
                if clients <= pg_cap:
                    samples.setdefault((pg.name, "clients", 10_000, clients, 1), []).append(
                        pg.run(clients=clients, users=USERS, seconds=seconds)
                    )
    figures: list[Figure] = []
    for (name, axis, size, clients, pipeline), runs in samples.items():
        figures += run_figures(
            f"{name}: ACTIVATE, size {size:,}, {clients} clients, pipeline {pipeline}",
            runs,
            section="scaling",
            axis=axis,
            system=name,
            size=size,
            clients=clients,
            pipeline=pipeline,
            users=USERS,
        )
    return figures
