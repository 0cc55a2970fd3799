"""Requests that name their pool: the same meaning on any connection, keys where
cluster-aware clients look for them, and the command layer called as plain functions."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import attrs
import pytest
import redis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenpool
from tests.test_server import as_dict, client, in_thread, running
from tokenpool import _commands as c
from tokenpool._commands import Commands, CommandSettings
from tokenpool._errors import TokenPoolError
from tokenpool._model import Page, Stats


async def test_a_retried_wait_lands_in_the_pool_it_named_with_redis_py_defaults() -> None:
    """The issue's scenario: redis-py's own retry on a socket timeout re-sends the
    activation on a fresh connection; it must wait in, and be granted by, the pool
    it named, not the server's default pool."""
    async with running(size=2) as (_server, port):

        def scenario() -> None:
            admin = client(port)
            admin.execute_command(
                "POOL", "CREATE", "wt", "SIZE", "1", "TTL", "60", "WHEN-FULL", "wait"
            )
            held = as_dict(admin.execute_command("TP.ACTIVATE", "wt", "holder"))
            # redis-py's defaults but a shorter socket timeout (5 s in the issue): its
            # default Retry re-sends on TimeoutError over a new connection.
            alice = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)

            def free_later() -> None:
                time.sleep(1.5)  # after at least one timeout and retry
                admin.execute_command("TP.RELEASE", "wt", held["token_id"])

            threading.Thread(target=free_later).start()
            started = time.monotonic()
            lease = as_dict(alice.execute_command("TP.ACTIVATE", "wt", "alice", "WAIT", "10"))
            assert time.monotonic() - started >= 1.0  # it did time out and retry
            assert lease["token_id"] == held["token_id"]  # wt's only token
            token = as_dict(admin.execute_command("TP.TOKEN", "wt", lease["token_id"]))
            assert token["current_user_id"] == "alice"
            assert admin.execute_command("LEASE", "alice") is None  # nothing in default
            # sent again (a retry after a lost reply): the same lease, in the same pool
            again = as_dict(alice.execute_command("TP.ACTIVATE", "wt", "alice", "WAIT", "10"))
            assert again["id"] == lease["id"]

        await in_thread(scenario)


async def test_cluster_aware_clients_find_the_pool_as_the_key() -> None:
    """redis-py's CommandsParser (what RedisCluster routes with) reads COMMAND's key
    positions, and COMMAND GETKEYS for POOL's movable key."""
    from redis._parsers import CommandsParser

    async with running(size=2) as (_server, port):

        def scenario() -> None:
            r = redis.Redis(port=port)
            parser = CommandsParser(r)
            assert ["gpu"] == parser.get_keys(r, "TP.ACTIVATE", "gpu", "alice", "WAIT", "1")
            assert ["gpu"] == parser.get_keys(r, "TP.HISTORY", "gpu", "t", "LIMIT", "5")
            assert ["gpu"] == parser.get_keys(r, "POOL", "CREATE", "gpu", "SIZE", "1", "TTL", "1")
            conn = r.connection_pool.get_connection()
            conn.send_command("COMMAND", "DOCS", "tp.activate")  # raw: no reply callback
            docs = conn.read_response()
            r.connection_pool.release(conn)
            if isinstance(docs, list):  # RESP2: pairs in an array
                docs = {docs[0]: dict(zip(docs[1][::2], docs[1][1::2], strict=True))}
            first = docs[b"tp.activate"][b"arguments"][0]
            if isinstance(first, list):
                first = dict(zip(first[::2], first[1::2], strict=True))
            assert (b"pool", b"key") == (first[b"name"], first[b"type"])
            assert r.command()["tp.activate"]["first_key_pos"] == 1

        await in_thread(scenario)


@pytest.mark.skipif(
    subprocess.run(["which", "redis-cli"], capture_output=True).returncode, reason="redis-cli"
)
async def test_redis_cli_reads_command_docs_and_names_pools() -> None:
    async with running(size=2) as (_server, port):

        def scenario() -> None:
            out = subprocess.run(
                ["redis-cli", "-p", str(port), "TP.ACTIVATE", "default", "bob"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert "bob" in out.stdout, out.stderr

        await in_thread(scenario)


# -- the command layer as plain function calls ----------------------------------------

USERS = st.one_of(
    st.sampled_from(["alice", "bob", "holder", "", "a b", "é" * 70]), st.text(max_size=6)
)
IDS = st.one_of(
    st.sampled_from(
        ["$TOKEN", "$LEASE", "$FREE", "not-a-uuid", "00000000-0000-4000-8000-000000000000"]
    ),
    st.text(max_size=6),
)
POOLS = st.sampled_from(["default", "other", "nope", "a/b", ""])
NUMBERS = st.one_of(
    st.integers(-3, 20_000), st.floats(allow_nan=True, allow_infinity=True), st.none()
)

requests = st.one_of(
    st.builds(c.Activate, POOLS, USERS, st.one_of(st.none(), st.floats(0, 0.01))),
    st.builds(c.Release, POOLS, IDS, st.one_of(st.none(), USERS)),
    st.builds(c.Renew, POOLS, IDS, IDS),
    st.builds(c.Validate, POOLS, IDS, IDS),
    st.builds(c.LeaseOf, POOLS, USERS),
    st.builds(c.Clear, POOLS),
    st.builds(c.Token, POOLS, IDS),
    st.builds(c.Tokens, POOLS, st.one_of(st.none(), st.integers(0, 10)), st.integers(1, 50)),
    st.builds(c.Scan, POOLS, st.integers(0, 10), st.integers(1, 50)),
    st.builds(
        c.History, POOLS, IDS, st.integers(-1, 20), st.one_of(st.none(), st.integers(-1, 10**12))
    ),
    st.builds(c.UserHistory, POOLS, USERS, st.integers(-1, 20), st.none()),
    st.builds(c.GetStats, POOLS),
    st.builds(c.GetPool, POOLS),
    st.just(c.ListPools()),
)
DOCUMENTED = {
    "INVALID",
    "UNKNOWN",
    "NOTHOLDER",
    "NOTACTIVE",
    "FULL",
    "UNAVAILABLE",
    "NOPERM",
    "BUSY",
}
RESULTS = (
    c.Granted,
    c.Released,
    c.Cleared,
    c.TokenInfo,
    c.TokenList,
    c.TokenIds,
    c.PoolInfo,
    Page,
    Stats,
    bool,
    list,
    type(None),
)


async def _run_requests(batch: list[Any]) -> None:
    async with tokenpool.open_pools(
        declared={
            "default": tokenpool.PoolSettings(size=3, ttl=60),
            "other": tokenpool.PoolSettings(size=1, ttl=60, when_full="wait"),
        }
    ) as pools:
        commands = Commands(pools, CommandSettings())
        me = commands.client("127.0.0.1:1", "test")
        lease = await pools.get("default").activate("holder")
        free = next(t.id for t in await pools.get("default").tokens() if t.id != lease.token_id)
        live = {"$TOKEN": lease.token_id, "$LEASE": lease.id, "$FREE": free}
        for request in batch:
            for slot in type(request).__slots__:
                value = getattr(request, slot)
                if isinstance(value, str) and value in live:
                    setattr(request, slot, live[value])
            before = {n: pools.get(n).statistics().stats for n in pools.names()}
            try:
                with trio.fail_after(5):
                    result = await commands.execute(request, me)
            except TokenPoolError as error:
                assert error.code in DOCUMENTED, (request, error)
                after = {n: pools.get(n).statistics().stats for n in pools.names()}
                strip = {n: attrs.evolve(s, refusals=0, waiting=0) for n, s in before.items()}
                assert strip == {
                    n: attrs.evolve(s, refusals=0, waiting=0) for n, s in after.items()
                }, request
            else:
                assert isinstance(result, RESULTS), (request, result)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(requests, min_size=1, max_size=12))
def test_every_request_gets_a_documented_result_and_a_refusal_changes_nothing(
    batch: list[Any],
) -> None:
    trio.run(_run_requests, batch)


async def test_admin_and_rate_limits_are_steps_every_transport_takes() -> None:
    async with tokenpool.open_pools(declared={"default": tokenpool.PoolSettings(size=2)}) as pools:
        commands = Commands(pools, CommandSettings(admin_password="root", user_rate_limit=1))
        me = commands.client("10.0.0.1:5", "test")
        with pytest.raises(tokenpool.NoPermError):
            await commands.execute(c.Clear("default"), me)
        await commands.execute(c.Activate("default", "u"), me)
        with pytest.raises(c.BusyError) as refused:
            await commands.execute(c.Activate("default", "u"), me)
        assert refused.value.retry_after > 0
        assert commands.gate.rate_limited["test"] == 1
        with pytest.raises(c.WrongPassError):
            await commands.gate.authenticate(me, "admin", "wrong")
        assert commands.gate.auth_failures == {"test": 1}
        await commands.gate.authenticate(me, None, "root")  # a bearer: whichever user it opens
        assert me.user == "admin"
        assert 0 == (await commands.execute(c.Clear("default"), me)).ended - 1
