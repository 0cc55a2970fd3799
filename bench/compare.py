"""tokenpool against the systems a user would pick instead, side by side in one run.

Activations of random users at 1, 50 and 500 clients, pipeline 1 and 16, over a
user space of 1,000 (nearly every activation finds the user's lease: a hit) and
100,000 (nearly every activation evicts), on pools of 10,000 tokens:

- tokenpool over RESP, ``async`` and ``sync`` durability, PostgreSQL as its store;
- Redis + a Lua script, on a redis-server of our own: without persistence, with the
  append-only file fsynced every second (the async promise) and at every write (sync);
- PostgreSQL only, through pgbench, at ``synchronous_commit`` on and off (pipeline 1;
  at most ``max_connections`` clients, so not 500);
- tokenpool's and redis-server's own ``PING``, the ceilings of each server.

Repetitions are interleaved (every configuration once, then again), so a slow
moment of the machine hits every system alike; ratios are taken run by run.
"""

from __future__ import annotations

from contextlib import ExitStack

from ._drivers import Run
from ._measure import Figure, run_figures
from ._services import redis_server
from ._systems import RespSystem, pg_max_clients, pg_only, redis_lua, tokenpool_resp

SIZE = 10_000


def run(quick: bool) -> list[Figure]:
    reps = 3
    seconds = 0.5 if quick else 2.0
    clients_set = (50,) if quick else (1, 50, 500)
    users_set = (100_000,) if quick else (1_000, 100_000)
    pg_cap = pg_max_clients()
    samples: dict[tuple[str, str, int, int, int], list[Run]] = {}

    def record(key: tuple[str, str, int, int, int], result: Run) -> None:
        samples.setdefault(key, []).append(result)

    with ExitStack() as stack:
        resp = [
            stack.enter_context(tokenpool_resp("tokenpool async", SIZE, durability="async")),
            stack.enter_context(tokenpool_resp("tokenpool sync", SIZE, durability="sync")),
            stack.enter_context(redis_lua(SIZE)),
            stack.enter_context(redis_lua(SIZE, "everysec")),
            stack.enter_context(redis_lua(SIZE, "always")),
        ]
        pg = stack.enter_context(pg_only(SIZE))
        server = stack.enter_context(redis_server())
        pings = [
            RespSystem("redis-server", server.port, server.pid, ("PING",)),
            RespSystem("tokenpool", resp[0].port, resp[0].pid, ("PING",)),
        ]
        for _ in range(reps):
            for pipeline in (1, 16):
                for system in pings:
                    record(
                        (system.name, "PING", 50, pipeline, 0),
                        system.run(clients=50, pipeline=pipeline, users=1, seconds=seconds),
                    )
            for users in users_set:
                for clients in clients_set:
                    for pipeline in (1, 16):
                        for system in resp:
                            record(
                                (system.name, "ACTIVATE", clients, pipeline, users),
                                system.run(
                                    clients=clients,
                                    pipeline=pipeline,
                                    users=users,
                                    seconds=seconds,
                                ),
                            )
                    if clients <= pg_cap:
                        for pg_system in pg:
                            record(
                                (pg_system.name, "ACTIVATE", clients, 1, users),
                                pg_system.run(clients=clients, users=users, seconds=seconds),
                            )
    figures: list[Figure] = []
    for (name, command, clients, pipeline, users), runs in samples.items():
        what = "PING" if command == "PING" else f"ACTIVATE, {users:,} users"
        figures += run_figures(
            f"{name}: {what}, {clients} clients, pipeline {pipeline}",
            runs,
            section="compare",
            system=name,
            command=command,
            clients=clients,
            pipeline=pipeline,
            users=users,
            size=SIZE,
        )
    return figures
