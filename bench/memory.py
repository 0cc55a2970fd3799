"""Resident memory: per token (a pool of 1,000,000 against one of 100) and per idle
connection (10,000 connections that each sent one PING), for tokenpool and, in the
same run, for redis-server holding the Redis + Lua pool.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from tests.chaos.server import rss_bytes

from ._measure import Figure
from ._systems import RespSystem, redis_lua, tokenpool_resp

BIG = 1_000_000
SMALL = 100
CONNECTIONS = 10_000

Starter = Callable[[int], AbstractContextManager[RespSystem]]


def _settled_rss(pid: int) -> int:
    time.sleep(0.3)
    return rss_bytes(pid)


def _tree_rss(pid: int) -> int:
    """A process's resident memory with its children's (the store process)."""
    total = rss_bytes(pid)
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        for child in f.read().split():
            total += rss_bytes(int(child))
    return total


def _stable_tree_rss(pid: int) -> int:
    """The tree's memory once it stops moving (the store process writes a million
    tokens' rows after the server has them): steady over 2 s, or at 120 s."""
    deadline = time.monotonic() + 120
    last = _tree_rss(pid)
    while time.monotonic() < deadline:
        time.sleep(2)
        now = _tree_rss(pid)
        if abs(now - last) < 1 << 20:
            return now
        last = now
    return last


def _per_token(start: Starter, measure: Callable[[int], int] = _settled_rss) -> float:
    with start(SMALL) as small:
        base = measure(small.pid)
    with start(BIG) as big:
        full = measure(big.pid)
    return (full - base) / (BIG - SMALL)


def _per_connection(system: RespSystem, count: int) -> float:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    before = _settled_rss(system.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", system.port))
            sock.sendall(b"PING\r\n")
            socks.append(sock)
        for sock in socks:
            if not sock.recv(64).startswith(b"+PONG"):
                raise RuntimeError(f"{system.name} did not answer PING on every connection")
        after = _settled_rss(system.pid)
    finally:
        for sock in socks:
            sock.close()
    return (after - before) / count


def run(quick: bool) -> list[Figure]:
    # Resident memory hardly varies between runs (the spread is in the report): one
    # run each in quick mode.
    reps = 1 if quick else 3
    count = 2_000 if quick else CONNECTIONS
    starters: dict[str, Starter] = {
        "tokenpool (memory)": lambda size: tokenpool_resp("tokenpool (memory)", size, "memory"),
        "redis+lua": redis_lua,
    }
    figures: list[Figure] = []
    sqlite = "tokenpool (sqlite), with its store process"
    figures.append(
        Figure(
            f"{sqlite}: resident memory per token (pool of {BIG:,})",
            "bytes",
            tuple(
                _per_token(lambda size: tokenpool_resp(sqlite, size, "sqlite"), _stable_tree_rss)
                for _ in range(reps)
            ),
            {"section": "memory", "system": sqlite, "metric": "token"},
        )
    )
    for name, start in starters.items():
        figures.append(
            Figure(
                f"{name}: resident memory per token (pool of {BIG:,})",
                "bytes",
                tuple(_per_token(start) for _ in range(reps)),
                {"section": "memory", "system": name, "metric": "token"},
            )
        )
        runs = []
        for _ in range(reps):  # a fresh server each time: freed memory is kept for reuse
            with start(SMALL) as system:
                runs.append(_per_connection(system, count))
        figures.append(
            Figure(
                f"{name}: resident memory per idle connection ({count:,} connections)",
                "bytes",
                tuple(runs),
                {"section": "memory", "system": name, "metric": "connection"},
            )
        )
    return figures
