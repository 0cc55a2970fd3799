"""The embedded pool: the pure state (the ceiling), the actor, and the batch path."""

from __future__ import annotations

import gc
import itertools
import time
from functools import partial

import trio
import trio.lowlevel

from tokenpool import open_pool
from tokenpool._model import SLOT
from tokenpool._settings import PoolSettings
from tokenpool._state import PoolState

from ._measure import Figure, repeat


def _pure_round_trips(state: PoolState, seconds: float) -> float:
    """activate + release on the state itself, no actor: the ceiling."""
    now = time.time_ns() // 1000
    users = [f"user-{i}" for i in range(1000)]
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for user in users:
            lease = state.activate(user, now)
            state.release(state.token_text(lease[SLOT]), user, now)
            now += 1
        state.changes = []
        done += len(users)
    return done / (time.perf_counter() - start)


def _pure_activations(state: PoolState, seconds: float) -> float:
    """activate of users never seen before (every call grants; a full pool evicts)."""
    now = time.time_ns() // 1000
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for user in [f"fresh-{next(_fresh)}" for _ in range(1000)]:
            state.activate(user, now)
        state.changes = []
        done += 1000
    return done / (time.perf_counter() - start)


_fresh = itertools.count()


async def _actor_rate(pool_size: int, tasks: int, seconds: float, mode: str) -> float:
    """Operations per second through the actor from ``tasks`` concurrent tasks."""
    count = 0
    async with open_pool(size=pool_size, ttl=3600) as pool:

        async def worker(n: int, deadline: float) -> None:
            nonlocal count
            users = [f"user-{n}-{i}" for i in range(64)]
            i = 0
            while trio.current_time() < deadline:
                user = users[i % 64]
                i += 1
                if mode == "round-trip":
                    lease = await pool.activate(user)
                    await pool.release(lease.token_id, user)
                elif mode == "activate":
                    await pool.activate(f"fresh-{next(_fresh)}")
                else:  # batch
                    await pool.activate_many([f"fresh-{next(_fresh)}" for _ in range(1000)])
                    count += 999
                count += 1

        await trio.lowlevel.checkpoint()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for n in range(tasks):
                nursery.start_soon(worker, n, start + seconds)
        elapsed = trio.current_time() - start
    return count / elapsed


def run(quick: bool) -> list[Figure]:
    seconds = 0.3 if quick else 1.0
    runs = 3 if quick else 5
    figures: list[Figure] = []
    # Quick mode: size 100 only (the scaling section covers a million tokens).
    for size in (100,) if quick else (100, 10_000, 1_000_000):
        label = f"size {size:,}"
        if not quick:  # quick mode: the goals' figures only
            state = PoolState(PoolSettings(size=size, ttl=3600))
            state.resize(size, time.time_ns() // 1000)
            gc.freeze()
            figures += [
                repeat(
                    f"state activate+release, {label}",
                    "round trips/s",
                    runs,
                    partial(_pure_round_trips, state, seconds),
                    size=size,
                    path="state",
                ),
                repeat(
                    f"state activate (new user), {label}",
                    "activations/s",
                    runs,
                    partial(_pure_activations, state, seconds),
                    size=size,
                    path="state",
                ),
            ]
            del state
            gc.unfreeze()
        for tasks in () if quick else (1, 10, 100):
            figures.append(
                repeat(
                    f"actor activate+release, {tasks} tasks, {label}",
                    "round trips/s",
                    runs,
                    partial(trio.run, _actor_rate, size, tasks, seconds, "round-trip"),
                    size=size,
                    tasks=tasks,
                    path="actor",
                    mode="round-trip",
                )
            )
        figures += [
            repeat(
                f"actor activate (new user), 100 tasks, {label}",
                "activations/s",
                runs,
                partial(trio.run, _actor_rate, size, 100, seconds, "activate"),
                size=size,
                tasks=100,
                path="actor",
                mode="activate",
            ),
            repeat(
                f"activate_many of 1,000 users, 1 task, {label}",
                "activations/s",
                runs,
                partial(trio.run, _actor_rate, size, 1, seconds, "batch"),
                size=size,
                tasks=1,
                path="batch",
            ),
        ]
    return figures
