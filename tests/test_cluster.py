"""Cluster mode with real processes: three ``tokenpool serve`` nodes on one PostgreSQL
schema, reached by redis-py's ``RedisCluster`` and ``redis-cli -c``; an owner killed
(SIGKILL) or paused past its lease (SIGSTOP), a node drained."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import pytest
import redis
import trio
from redis.cluster import LoadBalancingStrategy
from redis.exceptions import ClusterDownError, MovedError, RedisClusterException, TryAgainError

import tokenpool
from tests.chaos.cluster import Cluster
from tests.chaos.runs import _overlaps
from tests.chaos.server import Process, free_port, start, stored_leases
from tests.dbutil import query
from tokenpool._cli import main
from tokenpool._cluster.slots import SLOTS, key_slot

VALIDITY = 2.0
RENEW = 0.5
T = TypeVar("T")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def fields(reply: Any) -> dict[str, str]:
    return {text(k): text(v) for k, v in reply.items()}


def eventually(check: Callable[[], T], seconds: float = 20.0, what: str = "") -> T:
    """``check()``'s first truthy result, retried (errors included) for ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


class Node:
    def __init__(self, name: str, url: str, *args: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = url
        self.args = args
        self.process: Process | None = None

    def start(self) -> None:
        self.process = start(
            *("--dsn", self.url, "--node-id", self.name),
            *("--advertise", f"127.0.0.1:{self.port}"),
            *("--cluster-validity", str(VALIDITY), "--cluster-renew", str(RENEW)),
            *("--size", "4", "--ttl", "3600", *self.args),
            port=self.port,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def info(self) -> dict[str, str]:
        with self.client() as r:
            raw = text(r.execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)


@contextmanager
def cluster(url: str, count: int = 3, *args: str) -> Iterator[list[Node]]:
    """``count`` nodes on one schema (``args``: more options for each), once the slots
    are spread evenly over them."""
    nodes = [Node(f"n{i}", url, *args) for i in range(1, count + 1)]
    with ExitStack() as stack:
        for node in nodes:
            node.start()
            stack.callback(_stop, node)
        eventually(lambda: balanced(nodes), 30, "slots spread evenly over the nodes")
        yield nodes


def _stop(node: Node) -> None:
    process = node.process
    if process is not None and process.proc.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
        try:
            process.stop()
        except subprocess.TimeoutExpired:
            process.kill()


def balanced(nodes: list[Node]) -> bool:
    share = SLOTS // len(nodes)
    infos = [n.info() for n in nodes]
    return all(
        i["cluster_state"] == "ok"
        and share <= int(i["tokenpool_slots_served"]) <= share + 1
        and i["cluster_known_nodes"] == str(len(nodes))
        for i in infos
    )


def owner(nodes: list[Node], pool: str, ask: list[Node] | None = None) -> Node:
    """The node owning ``pool`` now, from the first running node's (of ``ask``) CLUSTER
    SLOTS."""
    slot = key_slot(pool)
    for asked in ask or nodes:
        if asked.process is None or asked.process.proc.poll() is not None:
            continue
        with asked.client() as r:
            for first, last, (_host, port, *_rest) in r.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    return next(n for n in nodes if n.port == int(port))
    raise AssertionError(f"no node owns slot {slot}")


def test_three_nodes_route_every_pool_to_its_owner(pg_url: str) -> None:
    """30 pools created and leased through RedisCluster land on every node (by slot);
    redis-cli -c follows MOVED from any node; a node asked for a pool it does not
    own answers MOVED <slot> <owner's address>."""
    with cluster(pg_url) as nodes:
        rc = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port, socket_timeout=10)
        try:
            pools = [f"pool{i}" for i in range(30)]
            for pool in pools:
                assert rc.execute_command("POOL", "CREATE", pool, "SIZE", 2, "TTL", 600)
            leases = {p: fields(rc.execute_command("TP.ACTIVATE", p, "alice")) for p in pools}
            for pool in pools:
                assert "1" == text(
                    rc.execute_command(
                        "TP.VALIDATE", pool, leases[pool]["token_id"], leases[pool]["id"]
                    )
                )
        finally:
            rc.close()
        # A client reading from replicas sends READONLY on each connection: accepted (there
        # are none, so its reads go to the owners).
        replicas = redis.RedisCluster(
            host="127.0.0.1",
            port=nodes[1].port,
            socket_timeout=10,
            load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN_REPLICAS,
        )
        try:
            assert all(
                "1" == text(replicas.execute_command("TP.VALIDATE", p, t["token_id"], t["id"]))
                for p, t in leases.items()
            )
        finally:
            replicas.close()
        served = {
            n.name: [text(p) for p in n.client().execute_command("POOL", "LIST")] for n in nodes
        }
        assert sorted([*pools, "default"]) == sorted(p for names in served.values() for p in names)
        assert all(served.values())  # every node serves some of them
        for pool in pools:
            assert pool in served[owner(nodes, pool).name]

        async def through_the_client_library() -> dict[str, str]:
            async with tokenpool.connect(f"tokenpool://127.0.0.1:{nodes[2].port}") as client:
                return {p: (await client.pool(p).activate("alice")).id for p in pools}

        assert {p: leases[p]["id"] for p in pools} == trio.run(through_the_client_library)
        with nodes[1].client() as r:
            info = r.info("cluster")
            assert 1 == info["cluster_enabled"] and "ok" == info["cluster_state"]
            assert {"n1", "n2", "n3"} == {
                k.removeprefix("member_") for k in info if k.startswith("member_")
            }
            assert SLOTS == sum(int(info[f"member_n{i}"]["slots"]) for i in (1, 2, 3))
            assert "cluster" == r.info("server")["redis_mode"]
            assert "n2" == text(r.execute_command("CLUSTER", "MYID"))
            lines = text(r.execute_command("CLUSTER", "NODES")).splitlines()
            assert 3 == len(lines)
            mine = next(line.split() for line in lines if "myself" in line)
            assert ["n2", f"127.0.0.1:{nodes[1].port}@{nodes[1].port + 10000}"] == mine[:2]
            assert "myself,master" == mine[2] and "connected" == mine[7]
            shards = r.execute_command("CLUSTER", "SHARDS")
            assert 3 == len(shards)
            bounds = [shard.get("slots", shard.get(b"slots")) for shard in shards]
            assert SLOTS == sum(
                sum(b - a + 1 for a, b in zip(s[::2], s[1::2], strict=True)) for s in bounds
            )
        pool = pools[0]
        home = owner(nodes, pool)
        other = next(n for n in nodes if n is not home)
        with other.client() as r, pytest.raises(MovedError) as moved:
            r.execute_command("TP.LEASE", pool, "alice")
        assert f"{key_slot(pool)} 127.0.0.1:{home.port}" == str(moved.value)
        if shutil.which("redis-cli"):
            out = subprocess.run(
                ["redis-cli", "-c", "-p", str(other.port), "TP.LEASE", pool, "alice"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            assert leases[pool]["id"] in out


def test_a_killed_owner_is_taken_over_within_5_s_with_its_leases(pg_url: str) -> None:
    """SIGKILL of the pool's owner: another node serves the pool within 5 s, with the
    lease the old owner granted (recovered from PostgreSQL), and fences go on above it."""
    with cluster(pg_url) as nodes:
        pool = "gpu"
        home = owner(nodes, pool)
        with home.client() as r:
            r.execute_command("POOL", "CREATE", pool, "SIZE", 2, "TTL", 600)
            alice = fields(r.execute_command("TP.ACTIVATE", pool, "alice"))
        seed = next(n for n in nodes if n is not home)

        took = 0.0

        async def across_the_failover() -> tuple[str | None, str | None]:
            nonlocal took
            async with (
                tokenpool.connect(f"tokenpool://127.0.0.1:{seed.port}", timeout=10) as client,
                client.pool(pool).hold("carol", renew_every=0.3) as held,
            ):
                carol = held.lease
                # The nodes write behind (async): a lease granted just before the kill may
                # be in the documented window. Kill only once carol's grant is stored.
                with trio.fail_after(20):
                    while not await trio.to_thread.run_sync(
                        query,
                        pg_url,
                        "SELECT 1 FROM token_assignments WHERE lease_id = ?",
                        carol.id,
                    ):
                        await trio.sleep(0.05)
                before = await client.pool(pool).lease_of("alice")  # routed to the owner
                assert home.process is not None
                home.process.kill()
                killed = time.monotonic()
                after = await client.pool(pool).lease_of("alice")  # waits out the failover
                took = time.monotonic() - killed
                renewed = held.renewals
                await trio.sleep(1.0)
                # hold() kept carol's lease across the failover: renewed by the new owner,
                # which recovered it (the same lease, the same fence)
                assert not held.lost and held.renewals > renewed
                assert (carol.id, carol.fence) == (held.lease.id, held.fence)
                return (before and before.id), (after and after.id)

        assert (alice["id"], alice["id"]) == trio.run(across_the_failover)
        assert took < 5.0, f"served again after {took:.2f} s"
        survivors = [n for n in nodes if n is not home]

        def served_again() -> dict[str, str] | None:
            heir = owner(nodes, pool, ask=survivors)
            if heir is home:
                return None
            with heir.client() as r:
                return fields(r.execute_command("TP.LEASE", pool, "alice"))

        lease = eventually(served_again, 10, "the pool served by a surviving node")
        assert alice["id"] == lease["id"]
        assert alice["fence"] == lease["fence"]
        with owner(nodes, pool, ask=survivors).client() as r:
            bob = fields(r.execute_command("TP.ACTIVATE", pool, "bob"))
        assert int(bob["fence"]) > int(alice["fence"])
        assert [] == _overlaps(stored_leases(pg_url, pool))


def test_a_paused_owner_grants_nothing_and_rejoins_as_a_standby(pg_url: str) -> None:
    """SIGSTOP of the owner past its lease: another node takes the pool over and grants;
    after SIGCONT the paused node neither grants nor vouches for the pool, and soon
    answers MOVED to the new owner; fences strictly increase across the owners."""
    with cluster(pg_url) as nodes:
        pool = "seats"
        home = owner(nodes, pool)
        with home.client() as r:
            r.execute_command("POOL", "CREATE", pool, "SIZE", 1, "TTL", 600)
            alice = fields(r.execute_command("TP.ACTIVATE", pool, "alice"))
            more = [n for n in (f"more{i}" for i in range(200)) if owner(nodes, n) is home]
            for name in more[:10]:  # more pools on the paused node: all lost at once
                r.execute_command("POOL", "CREATE", name, "SIZE", 1, "TTL", 600)
                r.execute_command("TP.ACTIVATE", name, "alice")
        survivors = [n for n in nodes if n is not home]
        paused = home.client()
        paused.ping()  # connected before the pause
        os.kill(home.pid, signal.SIGSTOP)
        try:
            heir = eventually(
                lambda: (n := owner(nodes, pool, ask=survivors)) is not home and n,
                10,
                "the pool taken over",
            )
            with heir.client() as r:
                bob = eventually(
                    lambda: fields(r.execute_command("TP.ACTIVATE", pool, "bob")),
                    10,
                    "bob granted by the new owner",
                )
            time.sleep(VALIDITY)  # well past the paused node's lease
        finally:
            os.kill(home.pid, signal.SIGCONT)
        assert alice["token_id"] == bob["token_id"]  # the only token: evicted to bob
        assert int(bob["fence"]) > int(alice["fence"])
        for ask in (
            ("TP.ACTIVATE", pool, "carol"),
            ("TP.VALIDATE", pool, alice["token_id"], alice["id"]),
            ("TP.LEASE", pool, "alice"),
        ):
            with pytest.raises((MovedError, ClusterDownError, TryAgainError)):
                paused.execute_command(*ask)

        def moved() -> bool:
            try:
                paused.execute_command("TP.ACTIVATE", pool, "carol")
            except MovedError as error:
                return str(error) == f"{key_slot(pool)} 127.0.0.1:{heir.port}"
            except (ClusterDownError, TryAgainError):
                return False
            pytest.fail("the paused node granted a lease")

        eventually(moved, 5, "MOVED to the new owner")
        paused.close()
        stored = stored_leases(pg_url, pool)
        assert [] == _overlaps(stored)  # per token, no two holders across the owners
        assert {alice["id"], bob["id"]} <= {lease.id for lease in stored}
        assert "live" == home.info()["tokenpool_node_state"]


def test_drain_gives_every_slot_to_the_other_nodes(pg_url: str) -> None:
    """CLUSTER DRAIN: the node gives all its slots up (pools written, then released),
    the others take them, and the drained node's pools are served elsewhere."""
    with cluster(pg_url) as nodes:
        pool = "licences"
        home = owner(nodes, pool)
        with home.client() as r:
            r.execute_command("POOL", "CREATE", pool, "SIZE", 2, "TTL", 600)
            alice = fields(r.execute_command("TP.ACTIVATE", pool, "alice"))
            assert b"OK" == r.execute_command("CLUSTER", "DRAIN")
        others = [n for n in nodes if n is not home]
        eventually(
            lambda: (
                home.info()["tokenpool_slots_owned"] == "0"
                and all(i["cluster_state"] == "ok" for i in (n.info() for n in others))
                and sum(int(n.info()["tokenpool_slots_served"]) for n in others) == SLOTS
            ),
            15,
            "the drained node's slots served by the others",
        )
        with owner(nodes, pool, ask=others).client() as r:
            assert alice["id"] == fields(r.execute_command("TP.LEASE", pool, "alice"))["id"]


def test_sigterm_hands_the_slots_over_and_exits_0(pg_url: str) -> None:
    """A node stopped normally (SIGTERM) drains (its pools written, then released),
    leaves the cluster and exits 0; the others serve its pools at once, with no wait
    for its lease to run out."""
    with cluster(pg_url, 2) as nodes:
        pool = "printers"
        home = owner(nodes, pool)
        other = next(n for n in nodes if n is not home)
        with home.client() as r:
            r.execute_command("POOL", "CREATE", pool, "SIZE", 2, "TTL", 600)
            alice = fields(r.execute_command("TP.ACTIVATE", pool, "alice"))
        assert home.process is not None
        stopped = time.monotonic()
        assert 0 == home.process.stop()
        assert any(e.get("event") == "cluster_left" for e in home.process.log)
        with other.client() as r:
            lease = eventually(
                lambda: fields(r.execute_command("TP.LEASE", pool, "alice")), 10, "served"
            )
        assert alice["id"] == lease["id"]
        assert time.monotonic() - stopped < VALIDITY + 2 * RENEW
        assert str(SLOTS) == other.info()["tokenpool_slots_served"]


def test_a_cluster_that_loses_its_database_stops_then_serves_again(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    """PostgreSQL stopped: past the validity no node serves (no lease can be shown, so
    none grants or vouches); started again: the nodes join again as new incarnations,
    take the slots over and serve the pools recovered from the store."""
    with cluster(cluster_url, 2, "--write-timeout", "1") as nodes:
        pool = "badges"
        home = owner(nodes, pool)
        with home.client() as r:
            r.execute_command("POOL", "CREATE", pool, "SIZE", 2, "TTL", 600)
            alice = fields(r.execute_command("TP.ACTIVATE", pool, "alice"))
        pg_cluster.stop("immediate")
        try:
            time.sleep(VALIDITY + 0.5)
            for node in nodes:
                with node.client() as r:
                    for ask in (("TP.LEASE", pool, "alice"), ("TP.ACTIVATE", pool, "bob")):
                        with pytest.raises(redis.ResponseError):
                            r.execute_command(*ask)
        finally:
            pg_cluster.start()

        def served() -> dict[str, str] | None:
            with owner(nodes, pool).client() as r:
                return fields(r.execute_command("TP.LEASE", pool, "alice"))

        assert alice["id"] == eventually(served, 30, "served again")["id"]


def test_cluster_commands_say_cluster_mode_is_off_without_a_node_id(tmp_path: Any) -> None:
    server = start("--dsn", "memory")
    try:
        with redis.Redis(port=server.port) as r:
            for sub in ("INFO", "SLOTS", "NODES", "MYID"):
                with pytest.raises(redis.ResponseError, match="cluster support disabled"):
                    r.execute_command("CLUSTER", sub)
            for command in ("READONLY", "READWRITE"):
                with pytest.raises(redis.ResponseError, match="cluster support disabled"):
                    r.execute_command(command)
            assert r.execute_command("TP.ACTIVATE", "default", "alice")
            assert {"cluster_enabled": 0} == r.info("cluster")
            assert "standalone" == r.info("server")["redis_mode"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--dsn", "memory", "--node-id", "n1"], "needs a PostgreSQL --dsn"),
        (
            ["--dsn", "postgresql://x@127.0.0.1/db", "--node-id", "n1", "--cluster-renew", "2"],
            "at most a third",
        ),
        (["--dsn", "memory", "--advertise", "h:1"], "needs --node-id"),
        (["--dsn", "postgresql://x@h/db", "--node-id", "a b"], "node-id"),
        (
            ["--dsn", "postgresql://x@h/db", "--node-id", "n", "--cluster-validity", "0.5"],
            "cluster-validity",
        ),
    ],
)
def test_cluster_settings_are_checked(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert 2 == main(["serve", *args], environ={})
    assert says in capsys.readouterr().err


def test_under_load_through_a_kill_a_pause_a_restart_and_a_drain(pg_url: str) -> None:
    """Clients on every node (RedisCluster, sync durability) lease in 30 pools while one
    node is SIGKILLed, another paused past its lease, the first restarted and a third
    drained: every acknowledged lease is in the store, no token ever had two holders
    (per pool, stored leases never overlap, across owners), fences grow with time per
    pool, and the slots are spread evenly again after the restart."""
    pools = [f"load{i}" for i in range(30)]
    acknowledged: list[tuple[str, str]] = []
    stop = threading.Event()

    def load(seed: int, port: int) -> None:
        rng = random.Random(seed)
        rc = redis.RedisCluster(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            while not stop.is_set():
                pool = rng.choice(pools)
                try:
                    lease = rc.execute_command("TP.ACTIVATE", pool, f"u{rng.randrange(12)}")
                except (redis.RedisError, RedisClusterException, OSError):
                    time.sleep(0.05)  # a failover: the outcome is unknown, not acknowledged
                    continue
                acknowledged.append((pool, fields(lease)["id"]))
        finally:
            rc.close()

    with cluster(pg_url, 3, "--durability", "sync") as nodes:
        first, paused, drained = nodes
        rc = redis.RedisCluster(host="127.0.0.1", port=first.port, socket_timeout=10)
        for pool in pools:
            rc.execute_command("POOL", "CREATE", pool, "SIZE", 3, "TTL", 600)
        rc.close()
        clients = [
            threading.Thread(target=load, args=(i, nodes[i % 3].port), daemon=True)
            for i in range(4)
        ]
        for client in clients:
            client.start()
        try:
            time.sleep(2)
            assert first.process is not None
            first.process.kill()
            time.sleep(3)
            os.kill(paused.pid, signal.SIGSTOP)
            time.sleep(2 * VALIDITY + 1)
            os.kill(paused.pid, signal.SIGCONT)
            first.start()  # the same node id and port, as a supervisor restarts it
            eventually(lambda: balanced(nodes), 30, "slots spread evenly after the restart")
            restarted = len(acknowledged)
            with drained.client() as r:
                assert b"OK" == r.execute_command("CLUSTER", "DRAIN")
            eventually(
                lambda: sum(int(n.info()["tokenpool_slots_served"]) for n in nodes[:2]) == SLOTS,
                15,
                "the drained node's slots served by the others",
            )
            time.sleep(1)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=30)
    assert len(acknowledged) > restarted + 20  # served after the restart and the drain
    stored = {pool: stored_leases(pg_url, pool) for pool in pools}
    ids = {(pool, lease.id) for pool, leases in stored.items() for lease in leases}
    assert [] == [a for a in acknowledged if a not in ids]  # sync: nothing acknowledged lost
    for pool, leases in stored.items():
        assert [] == _overlaps(leases), pool
        by_start = sorted(leases, key=lambda lease: (lease.started_at, lease.fence))
        fences = [lease.fence for lease in by_start]
        assert fences == sorted(set(fences)), pool  # strictly increasing with time


def test_a_node_taking_more_pools_than_a_lease_lasts_keeps_its_lease(pg_url: str) -> None:
    """A node that recovers more pools than it can within one lease (a lone survivor
    takes every pool) renews its lease as it goes, serving each step of slots as soon as
    its pools are open: it never loses its lease to its own recovery. Before, the lease
    lapsed during recovery, every slot was lost, the node joined again and took them
    all again, for good (an outside probe: 3,000 pools, 3 nodes, none ever served)."""
    pools = 1_500
    node = Node("solo", pg_url, "--cluster-validity", "1", "--cluster-renew", "0.3")
    node.start()
    try:
        eventually(lambda: node.info()["tokenpool_slots_served"] == str(SLOTS), 30, "slots")
        with node.client() as r:
            pipe = r.pipeline(transaction=False)
            for i in range(pools):
                pipe.execute_command("POOL", "CREATE", f"m{i}", "SIZE", 2, "TTL", 600)
            pipe.execute()
        assert node.process is not None and 0 == node.process.stop()
        node.start()  # a cold start: every slot, every pool recovered here
        assert node.process is not None

        def all_served() -> bool:
            info = node.info()
            with node.client() as r:
                served = len(r.execute_command("POOL", "LIST"))
            return info["tokenpool_slots_served"] == str(SLOTS) and served == pools + 1

        eventually(all_served, 120, "every pool served again")
        events = [e["event"] for e in node.process.log]
        recovered = [e for e in node.process.log if e.get("event") == "cluster_slots_served"]
        took = sum(float(e["seconds"]) for e in recovered)
        assert "cluster_lease_lost" not in events, (took, events.count("cluster_lease_lost"))
        assert "cluster_lease_ran_out" not in events
        # It took longer than a lease: the renewals in the middle are what kept it.
        assert took > 1.0, f"recovery took {took:.2f} s: too short to test the lease"
    finally:
        _stop(node)
