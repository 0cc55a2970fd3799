"""Event streams in a cluster, with real processes on one PostgreSQL schema: a pool's
``watch()`` follows it to its new owner when the owner is killed, paused or drained,
and says ``gap`` where the new owner cannot replay; a raw ``SUBSCRIBE`` is routed as
Redis 7 routes ``SSUBSCRIBE``; ``CLUSTER UNDRAIN``; ``ASKING``."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import trio
from redis.exceptions import ClusterCrossSlotError, MovedError, RedisClusterException

import tokenpool
from tests.chaos.server import start
from tests.dbutil import query
from tests.test_cluster import Node, balanced, cluster, eventually, fields, owner, text
from tokenpool import Event
from tokenpool._cluster.slots import SLOTS, key_slot


async def stored(pool_url: str, lease_id: str) -> None:
    """Wait until the lease's grant is in PostgreSQL (the nodes write behind: a grant
    made just before a kill may be in the documented window)."""
    with trio.fail_after(20):
        while not await trio.to_thread.run_sync(
            query, pool_url, "SELECT 1 FROM token_assignments WHERE lease_id = ?", lease_id
        ):
            await trio.sleep(0.05)


def placed(nodes: list[Node], pool: str, size: int = 2) -> tuple[Node, Node]:
    """``pool`` created on its owner: the owner, and a node that does not own it."""
    home = owner(nodes, pool)
    with home.client() as r:
        r.execute_command("POOL", "CREATE", pool, "SIZE", size, "TTL", 600)
    return home, next(n for n in nodes if n is not home)


def follow(
    pg_url: str,
    nodes: list[Node],
    pool: str,
    move: Callable[[Node], Awaitable[None]],
    *,
    timeout: float,
) -> tuple[list[Event], float]:
    """A watcher on a node that does not own ``pool``: ``a`` granted by the owner, then
    ``move(owner)``, then ``b`` granted (by whichever node serves the pool then). The
    events the watcher received up to ``b``'s grant, and the seconds from the move to it."""
    home, seed = placed(nodes, pool)

    async def main() -> tuple[list[Event], float]:
        async with (
            tokenpool.connect(f"tokenpool://127.0.0.1:{seed.port}", timeout=timeout) as client,
            client.pool(pool).watch() as events,
        ):
            seen: list[Event] = []
            a = await client.pool(pool).activate("a")
            with trio.fail_after(10):
                seen.append(await events.__anext__())
            await stored(pg_url, a.id)
            await move(home)
            moved = time.monotonic()
            with trio.fail_after(30):
                while True:  # waits out the move (a call to a paused node times out)
                    try:
                        await client.pool(pool).activate("b")
                        break
                    except tokenpool.UnreachableError:
                        pass
            with trio.fail_after(30):
                async for event in events:
                    seen.append(event)
                    if event.user_id == "b":
                        break
            assert 1 <= events.reconnects
            return seen, time.monotonic() - moved

    return trio.run(main)


def assert_followed(seen: list[Event]) -> None:
    """``a`` from the old owner, one ``gap`` (the new owner's revisions start at its
    epoch << 40: it cannot replay the old owner's events), then ``b`` from the new owner."""
    assert ["granted", "gap", "granted"] == [e.kind for e in seen], seen
    a, gap, b = seen
    assert ("a", "b") == (a.user_id, b.user_id)
    assert gap.revision >> 40 > a.revision >> 40  # a new owner epoch
    assert a.revision < gap.revision < b.revision


def test_a_watch_follows_its_pool_to_the_new_owner_after_a_kill(pg_url: str) -> None:
    """SIGKILL of the owner: the watcher's connection breaks; it subscribes again, is
    sent to the new owner once it serves the pool, says ``gap`` and goes on."""
    with cluster(pg_url) as nodes:

        async def kill(home: Node) -> None:
            assert home.process is not None
            home.process.kill()

        seen, _took = follow(pg_url, nodes, "gpu", kill, timeout=10)
        assert_followed(seen)


def test_a_watch_follows_its_pool_away_from_a_paused_owner(pg_url: str) -> None:
    """SIGSTOP of the owner: its connection stays open but silent; the watcher's PING goes
    unanswered, so within its ``timeout`` it subscribes again at the new owner."""
    with cluster(pg_url) as nodes:
        paused: list[int] = []

        async def pause(home: Node) -> None:
            os.kill(home.pid, signal.SIGSTOP)
            paused.append(home.pid)

        try:
            seen, took = follow(pg_url, nodes, "seats", pause, timeout=3)
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        assert_followed(seen)
        assert took < 15, f"followed after {took:.1f} s"


def test_a_watch_follows_its_pool_through_a_drain_at_once(pg_url: str) -> None:
    """CLUSTER DRAIN: the drained node stays up and answers PING, so only its
    ``unsubscribe`` push (the slot left it) sends the watcher to the new owner: with a
    ``timeout`` of 60 s it follows in a few seconds all the same."""
    with cluster(pg_url) as nodes:

        async def drain(home: Node) -> None:
            def run() -> None:
                with home.client() as r:
                    assert b"OK" == r.execute_command("CLUSTER", "DRAIN")

            await trio.to_thread.run_sync(run)

        seen, took = follow(pg_url, nodes, "licences", drain, timeout=60)
        assert_followed(seen)
        assert took < 10, f"followed after {took:.1f} s"


def test_subscribe_is_routed_as_sharded_pub_sub(pg_url: str) -> None:
    """In cluster mode SUBSCRIBE events:<pool> answers MOVED on a node that does not own
    the pool, CROSSSLOT for pools of several slots; on the owner it subscribes, and when
    the slot leaves the node (a drain) the channel is unsubscribed by a push."""
    with cluster(pg_url, 2) as nodes:
        pool = "printers"
        home, other = placed(nodes, pool)
        with other.client() as r, pytest.raises(MovedError) as moved:
            r.execute_command("SUBSCRIBE", f"events:{pool}")
        assert f"{key_slot(pool)} 127.0.0.1:{home.port}" == str(moved.value)
        apart = next(f"p{i}" for i in range(100) if key_slot(f"p{i}") != key_slot(pool))
        with home.client() as r, pytest.raises(ClusterCrossSlotError):
            r.execute_command("SUBSCRIBE", f"events:{pool}", f"events:{apart}")
        with home.client() as r:
            sub = r.pubsub()
            sub.subscribe(f"events:{pool}")
            assert "subscribe" == eventually(lambda: sub.get_message(timeout=1), 5)["type"]
            r.execute_command("TP.ACTIVATE", pool, "alice")
            message = eventually(lambda: sub.get_message(timeout=1), 5)
            assert "granted" in text(message["data"])
            with home.client() as admin:
                assert b"OK" == admin.execute_command("CLUSTER", "DRAIN")
            gone = eventually(lambda: sub.get_message(timeout=1), 10, "the unsubscribe push")
            assert ("unsubscribe", f"events:{pool}") == (gone["type"], text(gone["channel"]))
            sub.close()


def test_redis_py_cluster_follows_a_pool_s_shard_channel_through_a_drain(pg_url: str) -> None:
    """SSUBSCRIBE events:{<pool>} (the hash tag puts the channel in the pool's slot):
    redis-py's RedisCluster subscribes at the pool's owner and reads ``smessage``s; the
    drained owner pushes ``sunsubscribe``, and once redis-py refreshes its slot map (the
    next command's MOVED) it subscribes at the new owner, which delivers the next event.
    A raw SSUBSCRIBE at a node that does not own the pool answers MOVED."""
    with cluster(pg_url, 2) as nodes:
        pool = "plotters"
        channel = f"events:{{{pool}}}"
        home, other = placed(nodes, pool, size=4)
        assert key_slot(channel) == key_slot(pool)
        with other.client() as r, pytest.raises(MovedError):
            r.execute_command("SSUBSCRIBE", channel)
        rc = redis.RedisCluster(host="127.0.0.1", port=other.port, socket_timeout=10)
        sub = rc.pubsub()
        try:
            sub.ssubscribe(channel)

            def next_of(kind: str) -> dict[str, object]:
                def found() -> dict[str, object] | None:
                    message = sub.get_sharded_message(timeout=0.5)
                    return message if message and message["type"] == kind else None

                return eventually(found, 20, kind)

            next_of("ssubscribe")
            rc.execute_command("TP.ACTIVATE", pool, "alice")
            assert "alice" in text(next_of("smessage")["data"])
            with home.client() as r:
                assert b"OK" == r.execute_command("CLUSTER", "DRAIN")
            next_of("sunsubscribe")
            deadline = time.monotonic() + 20
            while True:  # redis-py refreshes its slot map (MOVED, CLUSTERDOWN) as it goes
                try:
                    rc.execute_command("TP.ACTIVATE", pool, "bob")
                    break
                except (redis.RedisError, RedisClusterException):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            # At the new owner (before bob's grant, or after). redis-py moves the channel
            # when its slot map changes; a pass that ran while the slot was between owners
            # (released by the drained node, not yet taken) is deferred to the next change
            # of the map ("retry happens on the next slots-cache change notification",
            # redis/cluster.py), which a settled cluster never sends: seen once in a loaded
            # full run. The application's remedy, subscribing again, must then work.
            try:
                next_of("ssubscribe")
            except AssertionError:
                sub.ssubscribe(channel)
                next_of("ssubscribe")
            rc.execute_command("TP.ACTIVATE", pool, "carol")
            users = []
            while "carol" not in users:
                message = next_of("smessage")
                assert channel == text(message["channel"])
                users.append(json.loads(text(message["data"]))["user_id"])
            assert users in (["carol"], ["bob", "carol"])
        finally:
            sub.close()
            rc.close()


def test_undrain_takes_a_share_of_the_slots_again(pg_url: str) -> None:
    """CLUSTER UNDRAIN after CLUSTER DRAIN: the node takes its share again, without a
    restart, and serves pools of its slots."""
    with cluster(pg_url, 2) as nodes:
        drained, other = nodes
        with drained.client() as r:
            assert b"OK" == r.execute_command("CLUSTER", "DRAIN")
        eventually(
            lambda: other.info()["tokenpool_slots_served"] == str(SLOTS),
            15,
            "every slot served by the other node",
        )
        assert "draining" == drained.info()["tokenpool_node_state"]
        time.sleep(1.0)  # a few rounds: a drained node takes nothing
        assert "0" == drained.info()["tokenpool_slots_owned"]
        with drained.client() as r:
            assert b"OK" == r.execute_command("CLUSTER", "UNDRAIN")
        assert "live" == drained.info()["tokenpool_node_state"]
        eventually(lambda: balanced(nodes), 30, "the slots spread evenly again")
        pool = next(f"p{i}" for i in range(100) if owner(nodes, f"p{i}") is drained)
        with drained.client() as r:
            r.execute_command("POOL", "CREATE", pool, "SIZE", 1, "TTL", 600)
            assert "alice" == fields(r.execute_command("TP.ACTIVATE", pool, "alice"))["user_id"]
        with drained.client() as r:  # again: already undrained, nothing to do
            assert b"OK" == r.execute_command("CLUSTER", "UNDRAIN")


def test_asking_is_answered_ok_and_routes_nothing(pg_url: str) -> None:
    """ASKING answers +OK as Redis does (so a client that sends it never breaks); slots
    here are never half-moved, so the next command is routed as any: MOVED off the
    owner, served on it. Without cluster mode ASKING says cluster support is off."""
    with cluster(pg_url, 2) as nodes:
        pool = "badges"
        home, other = placed(nodes, pool)
        with home.client() as r:
            assert r.execute_command("ASKING") is True  # redis-py reads +OK as True
            assert fields(r.execute_command("TP.ACTIVATE", pool, "alice"))
        with other.client() as r:
            assert r.execute_command("ASKING") is True  # redis-py reads +OK as True
            with pytest.raises(MovedError):
                r.execute_command("TP.LEASE", pool, "alice")
            pipe = r.pipeline(transaction=True)  # inside MULTI too, as Redis
            pipe.execute_command("ASKING")
            pipe.execute_command("PING")
            assert [True, True] == pipe.execute()
    server = start("--dsn", "memory")
    try:
        with (
            redis.Redis(port=server.port) as r,
            pytest.raises(redis.ResponseError, match="cluster support disabled"),
        ):
            r.execute_command("ASKING")
    finally:
        server.stop()


def test_a_watch_says_gap_when_a_memory_server_restarts_without_its_history() -> None:
    """Not a cluster: a memory-only server restarted on its port starts its revisions
    again, below the watcher's last one. The watcher, resuming, says ``gap`` (it used to
    wait for revisions past its last, skipping what came before), then goes on. (Had the
    new server passed the watcher's revision before the resume, revisions alone could
    not tell: a memory store has no owner epoch.)"""
    first = start("--dsn", "memory", "--size", "4", "--ttl", "60")
    port = first.port
    servers = [first]
    seen: list[Event] = []

    async def until(check: Callable[[], bool]) -> None:
        with trio.fail_after(15):
            while not check():
                await trio.sleep(0.05)

    async def main() -> None:
        async with (
            tokenpool.connect(f"tokenpool://127.0.0.1:{port}", timeout=10) as client,
            client.pool().watch() as events,
            trio.open_nursery() as nursery,
        ):

            async def read() -> None:
                async for event in events:
                    seen.append(event)

            nursery.start_soon(read)
            await client.pool().activate("a")
            await client.pool().activate("b")
            await until(lambda: len(seen) == 2)
            await trio.to_thread.run_sync(first.stop)
            servers.append(await trio.to_thread.run_sync(start_on, port))
            await until(lambda: len(seen) == 3)
            await client.pool().activate("c")
            await until(lambda: len(seen) == 4)
            nursery.cancel_scope.cancel()

    def start_on(port: int) -> Any:
        return start("--dsn", "memory", "--size", "4", "--ttl", "60", port=port)

    try:
        trio.run(main)
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()
    assert ["a", "b", None, "c"] == [e.user_id for e in seen]
    assert ["granted", "granted", "gap", "granted"] == [e.kind for e in seen]
    assert seen[2].revision < seen[3].revision
