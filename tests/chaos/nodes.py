"""The cluster run: three ``tokenpool serve`` nodes on one PostgreSQL, clients on every
node, and the faults of issue 20 one after another.

Clients: ``RedisCluster`` threads (each seeded at another node), one thread of the
client library (``tokenpool.connect``, seeded at one node) and ``redis-cli -c`` once a
second, all leasing in 30 pools. Faults: SIGKILL of the first node, SIGSTOP of the
second for ``pause`` seconds then SIGCONT, a restart of the first (same node id and
port), ``CLUSTER DRAIN`` of the third. After each fault a probe times how long until
every pool is served again (``TP.LEASE`` answered by its owner: an answer that vouches).

Checked: per pool, the stored leases of each token never overlap, across owners (no
two holders); per pool, fences grow with the grant times; in ``sync`` every
acknowledged lease is stored (``async``: the ones lost are counted, the window of a
killed or paused owner); every pool served again within 5 s of each fault; the slots
spread evenly again after the restart.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis
import trio
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

import tokenpool
from tokenpool._cluster.slots import SLOTS, key_slot

from .checker import Anomaly
from .runs import Summary, _Memory, _overlaps, _summary, store
from .server import Process, free_port, start, stored_leases

POOLS = 30
SERVED_WITHIN = 5.0


class _Node:
    def __init__(self, name: str, url: str, durability: str) -> None:
        self.name = name
        self.url = url
        self.port = free_port()
        self.durability = durability
        self.process: Process | None = None

    def start(self) -> None:
        self.process = start(
            *("--dsn", self.url, "--node-id", self.name),
            *("--advertise", f"127.0.0.1:{self.port}", "--durability", self.durability),
            port=self.port,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def info(self) -> dict[str, str]:
        with _probe(self.port) as r:
            raw = r.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _until(check: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until ``check()`` held (errors count as not yet), or None past ``seconds``."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        try:
            if check():
                return time.monotonic() - began
        except (redis.RedisError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    return None


def _all_served(nodes: list[_Node], pools: list[str]) -> bool:
    """Every pool answers ``TP.LEASE`` on the node CLUSTER SLOTS names (a live node's)."""
    ranges = None
    for node in nodes:  # the first that answers with a valid lease (not a paused one)
        try:
            if node.running() and node.info()["tokenpool_lease_valid"] == "1":
                with _probe(node.port) as r:
                    ranges = r.execute_command("CLUSTER", "SLOTS")
                break
        except (redis.RedisError, OSError):
            continue
    if ranges is None:
        return False
    for pool in pools:
        slot = key_slot(pool)
        port = next((int(e[2][1]) for e in ranges if e[0] <= slot <= e[1]), 0)
        if not port:
            return False  # a slot between two owners
        with _probe(port) as r:
            r.execute_command("TP.LEASE", pool, "probe")
    return True


def _probe(port: int) -> redis.Redis:
    """A probe's connection: one try, 1 s at most (a paused node must not hold it)."""
    return redis.Redis(
        port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )


def _balanced(nodes: list[_Node]) -> bool:
    share = SLOTS // len(nodes)
    infos = [n.info() for n in nodes]
    return all(
        i["cluster_state"] == "ok" and share <= int(i["tokenpool_slots_served"]) <= share + 1
        for i in infos
    )


def cluster_run(
    clients: int, operations: int, *, dsn: str | None, durability: str, pause: float = 10.0
) -> Summary:
    if dsn is None or not dsn.startswith("postgres"):
        return _summary(
            f"cluster ({durability})",
            [Anomaly("setup", "the cluster run needs --dsn postgresql://...")],
            operations=0,
            clients=0,
            faults="-",
            rss=0.0,
        )
    with store(dsn) as url:
        return _run(url, clients, operations, durability, pause)


def _run(url: str, clients: int, operations: int, durability: str, pause: float) -> Summary:
    nodes = [_Node(f"n{i}", url, durability) for i in (1, 2, 3)]
    pools = [f"load{i}" for i in range(POOLS)]
    acknowledged: list[tuple[str, str]] = []
    stop = threading.Event()
    anomalies: list[Anomaly] = []
    facts: dict[str, Any] = {}
    memories: list[_Memory] = []
    for node in nodes:
        node.start()
        assert node.process is not None
        memories.append(_Memory(node.process.pid))
    try:
        if _until(lambda: _balanced(nodes), 60) is None:
            anomalies.append(Anomaly("setup", "the slots did not spread over three nodes"))
        seed: Any = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port, socket_timeout=10)
        for pool in pools:
            seed.execute_command("POOL", "CREATE", pool, "SIZE", 4, "TTL", 600)
        seed.close()

        def lease(rng: random.Random, pool_user: Callable[[], tuple[str, str]], rc: Any) -> None:
            pool, user = pool_user()
            try:
                reply = rc.execute_command("TP.ACTIVATE", pool, user)
            except (redis.RedisError, RedisClusterException, OSError):
                time.sleep(0.05)  # outcome unknown: not acknowledged
                return
            fields = {
                _text(k): _text(v)
                for k, v in (
                    reply.items()
                    if isinstance(reply, dict)
                    else zip(reply[::2], reply[1::2], strict=True)
                )
            }
            acknowledged.append((pool, fields["id"]))
            if rng.random() < 0.3:
                with contextlib.suppress(redis.RedisError, RedisClusterException, OSError):
                    rc.execute_command("TP.RELEASE", pool, fields["token_id"], user)

        def resp_client(i: int) -> None:
            rng = random.Random(i)
            rc = redis.RedisCluster(
                host="127.0.0.1", port=nodes[i % 3].port, socket_timeout=1, socket_connect_timeout=1
            )
            try:
                while not stop.is_set() and len(acknowledged) < operations:
                    lease(rng, lambda: (rng.choice(pools), f"u{rng.randrange(24)}"), rc)
            finally:
                rc.close()

        def library_client() -> None:
            async def go() -> None:
                rng = random.Random(99)
                url = f"tokenpool://127.0.0.1:{nodes[1].port}"
                async with tokenpool.connect(url, timeout=3) as client:
                    while not stop.is_set() and len(acknowledged) < operations:
                        pool = rng.choice(pools)
                        try:
                            got = await client.pool(pool).activate(f"lib{rng.randrange(8)}")
                        except tokenpool.TokenPoolError:
                            await trio.sleep(0.05)
                            continue
                        acknowledged.append((pool, got.id))

            trio.run(go)

        def cli_client() -> None:
            rng = random.Random(7)
            while not stop.is_set() and shutil.which("redis-cli"):
                pool = rng.choice(pools)
                port = rng.choice([n for n in nodes if n.running()]).port
                try:
                    out = subprocess.run(
                        ["redis-cli", "-c", "-p", str(port), "TP.ACTIVATE", pool, "cli"],
                        capture_output=True,
                        text=True,
                        timeout=10,
                    ).stdout.split()
                except subprocess.TimeoutExpired:  # a paused node: outcome unknown
                    continue
                if len(out) > 1 and out[0] == "id":
                    acknowledged.append((pool, out[1]))
                stop.wait(1.0)

        threads = [
            threading.Thread(target=resp_client, args=(i,), daemon=True)
            for i in range(max(1, clients - 2))
        ]
        threads += [
            threading.Thread(target=library_client, daemon=True),
            threading.Thread(target=cli_client, daemon=True),
        ]
        for t in threads:
            t.start()
        first, paused, drained = nodes
        time.sleep(2)
        assert first.process is not None
        first.process.kill()
        facts["killed_at"] = time.time()
        facts["kill"] = _until(lambda: _all_served(nodes, pools), 30)
        assert paused.process is not None
        os.kill(paused.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        facts["pause"] = _until(lambda: _all_served([drained], pools), 30)
        time.sleep(max(0.0, pause - (time.monotonic() - stopped)))
        os.kill(paused.process.pid, signal.SIGCONT)
        first.start()
        assert first.process is not None
        memories.append(_Memory(first.process.pid))
        facts["rebalanced"] = _until(lambda: _balanced(nodes), 60)
        with redis.Redis(port=drained.port, socket_timeout=30) as r:
            r.execute_command("CLUSTER", "DRAIN")
        facts["drain"] = _until(lambda: _all_served(nodes, pools), 30)
        time.sleep(1)
    finally:
        stop.set()
        for node in nodes:
            if node.running():
                assert node.process is not None
                os.kill(node.process.pid, signal.SIGCONT)
                node.process.stop()
    rss = max(m.stop() for m in memories)
    for fault in ("kill", "pause", "drain"):
        took = facts.get(fault)
        if took is None or took > SERVED_WITHIN:
            anomalies.append(Anomaly("not served", f"after the {fault}: {took} s"))
    if facts.get("rebalanced") is None:
        anomalies.append(Anomaly("unbalanced", "the slots did not spread after the restart"))
    stored = {pool: stored_leases(url, pool) for pool in pools}
    ids = {(pool, s.id) for pool, leases in stored.items() for s in leases}
    lost = [a for a in acknowledged if a not in ids]
    if durability == "sync":
        anomalies += [Anomaly("lost change", f"{p}: lease {i}") for p, i in lost]
    for pool, leases in stored.items():
        anomalies += _overlaps(leases)
        ordered = sorted(leases, key=lambda s: (s.started_at, s.fence or 0))
        fences = [s.fence or 0 for s in ordered]
        if fences != sorted(set(fences)):
            anomalies.append(Anomaly("fence order", f"{pool}: fences do not grow with time"))
    faults = (
        f"3 nodes, {POOLS} pools; n1 SIGKILLed: all pools served again in {_s(facts, 'kill')};"
        f" n2 SIGSTOPped {pause:g} s: served in {_s(facts, 'pause')}; n1 restarted: slots"
        f" even again in {_s(facts, 'rebalanced')}; n3 drained: served in"
        f" {_s(facts, 'drain')}; {len(acknowledged):,} acknowledged"
        + (f", {len(lost)} of them not stored (async window)" if durability == "async" else "")
    )
    summary = _summary(
        f"cluster ({durability})",
        anomalies,
        operations=len(acknowledged),
        clients=len(threads),
        faults=faults,
        rss=rss,
    )
    summary.detail += _takeover(nodes[1:], facts.get("killed_at", 0.0))
    return summary


def _takeover(nodes: list[_Node], killed_at: float) -> list[str]:
    """When the survivors took the killed node's slots and served their pools (their
    log), counted from the kill."""
    lines = []
    for node in nodes:
        assert node.process is not None
        for event in node.process.log:
            if event.get("event") not in ("cluster_slots_taken", "cluster_slots_served"):
                continue
            at = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            after = at.timestamp() - killed_at
            if 0 < after < 15:
                lines.append(
                    f"{node.name} {event['event']} +{after:.2f} s: {event.get('slots')} slots"
                    + (
                        f", {event['pools']} pools in {event['seconds']} s"
                        if "pools" in event
                        else ""
                    )
                )
    return lines


def _s(facts: dict[str, Any], key: str) -> str:
    value = facts.get(key)
    return "never" if value is None else f"{value:.1f} s"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
