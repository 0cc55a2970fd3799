"""Hash slots against Redis itself: a real cluster-enabled redis-server's ``CLUSTER
KEYSLOT`` (and redis-py's ``key_slot``, which cluster clients route by) over arbitrary
names, hash tags included."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot as redis_py_key_slot

from tests.chaos.server import free_port
from tokenpool._cluster.slots import SLOTS, balance, crc16, key_slot, ranges, shares


@pytest.fixture(scope="module")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A redis-server with cluster support on (CLUSTER KEYSLOT needs it), of its own."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    folder: Path = tmp_path_factory.mktemp("redis")
    proc: subprocess.Popen[bytes] | None = None
    r: redis.Redis | None = None
    try:
        # A port another test took meanwhile makes the server exit at once: another port.
        for _attempt in range(5):
            port = free_port()
            proc = subprocess.Popen(
                [
                    *(binary, "--port", str(port), "--bind", "127.0.0.1"),
                    *("--cluster-enabled", "yes", "--dir", str(folder)),
                    *("--save", "", "--appendonly", "no"),
                ],
                stdout=subprocess.DEVNULL,
            )
            r = redis.Redis(port=port, socket_timeout=30, socket_connect_timeout=1, retry=None)
            deadline = time.monotonic() + 20  # the machine may be busy
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            if proc.poll() is None:
                break
        assert proc is not None and r is not None and proc.poll() is None, "no redis-server"
        yield r
    finally:
        if r is not None:
            r.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


NAMES = st.one_of(
    st.text(max_size=40),
    # names built of the hash tag's characters, where the rule's corners are
    st.lists(st.sampled_from(["{", "}", "a", "b", "é", ""]), max_size=10).map("".join),
    st.builds(
        lambda a, t, b: f"{a}{{{t}}}{b}",
        st.text(max_size=8),
        st.text(max_size=8),
        st.text(max_size=8),
    ),
)


@settings(max_examples=300, deadline=None)
@given(NAMES)
def test_slots_are_redis_cluster_keyslot(cluster_redis: redis.Redis, name: str) -> None:
    assert cluster_redis.execute_command("CLUSTER", "KEYSLOT", name) == key_slot(name)


@settings(max_examples=2000)
@given(NAMES)
def test_slots_are_what_cluster_clients_route_by(name: str) -> None:
    assert redis_py_key_slot(name.encode()) == key_slot(name)


def test_known_values_from_the_redis_documentation() -> None:
    assert 11058 == key_slot("somekey")
    assert 2515 == key_slot("foo{hash_tag}") == key_slot("bar{hash_tag}")
    assert key_slot("{}x") == crc16(b"{}x") % SLOTS  # an empty tag: the whole name
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")


def test_ranges_group_consecutive_slots() -> None:
    assert [(0, 2), (7, 7), (9, 10)] == ranges([10, 2, 0, 1, 7, 9, 1])
    assert [] == ranges([])


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=50, unique=True))
def test_shares_cover_every_slot_within_one(nodes: list[str]) -> None:
    got = shares(nodes)
    assert SLOTS == sum(got.values())
    assert max(got.values()) - min(got.values()) <= 1
    assert got == shares(list(reversed(nodes)))  # every node computes the same


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(st.sampled_from(["a", "b", "c", "gone", None]), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_rounds_of_the_balancing_rule_spread_every_slot_evenly(
    count: int, pattern: list[str | None], rng: random.Random
) -> None:
    """From any map (slots of nodes that are gone, nobody's, unevenly held), rounds of
    every node applying ``balance`` (the database taking only free slots) end with each
    slot owned once and every node at its share."""
    nodes = [f"n{i}" for i in range(count)]
    live = set(nodes)
    owners: list[str | None] = [
        (p if p in (None, "gone") else nodes[ord(p) % count]) for p in pattern
    ] * (SLOTS // len(pattern)) + [None] * (SLOTS % len(pattern))
    for _ in range(60):
        changed = False
        for node in rng.sample(nodes, count):
            take, give = balance(node, owners, live, nodes, 1024)
            assert not (take and give)
            for slot in take:
                assert owners[slot] is None or owners[slot] not in live
                owners[slot] = node
                changed = True
            for slot in give:
                assert owners[slot] == node
                owners[slot] = None
                changed = True
        if not changed:
            break
    held = {n: owners.count(n) for n in nodes}
    assert shares(nodes) == held
