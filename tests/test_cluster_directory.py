"""The cluster's tables on a real PostgreSQL (a schema per test): leases by the
database's clock, takeover only after expiry, never two owners of a slot."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tokenpool._cluster.directory import Directory
from tokenpool._cluster.lease import DRIFT, SCHEDULING, LocalLease, margin
from tokenpool._cluster.slots import SLOTS, claims
from tokenpool._errors import PoolLockedError

SHORT = 0.4  # seconds: a lease that runs out within a test


@pytest.fixture
def directory(pg_url: str) -> Iterator[Callable[[], Directory]]:
    """Directories on one fresh schema (each its own connection), closed afterwards."""
    made: list[Directory] = []

    def make() -> Directory:
        made.append(Directory(pg_url, timeout=5.0))
        return made[-1]

    yield make
    for d in made:
        d.close()


def test_a_node_id_with_a_live_lease_cannot_join_twice(directory: Callable[[], Directory]) -> None:
    first, second = directory(), directory()
    assert 1 == first.join("a", "h:1", SHORT)
    with pytest.raises(PoolLockedError, match="held by a live node"):
        second.join("a", "h:2", SHORT)
    time.sleep(SHORT + 0.1)
    assert 2 == second.join("a", "h:2", SHORT)  # expired: a new incarnation
    assert first.renew("a", 1, SHORT, -1) is None  # the first incarnation lost it


def test_slots_of_a_live_node_are_not_taken_and_expired_ones_are(
    directory: Callable[[], Directory],
) -> None:
    a, b = directory(), directory()
    a.join("a", "h:1", 1.5)
    b.join("b", "h:2", 30.0)
    taken = a.take("a", 1, 1.5, list(range(SLOTS)))
    assert taken is not None and SLOTS == len(taken)
    assert {1} == set(taken.values())
    assert {} == b.take("b", 1, 30.0, [0, 1, 2])  # a's lease holds
    time.sleep(1.6)
    assert {0: 2, 1: 2, 2: 2} == b.take("b", 1, 30.0, [0, 1, 2])  # expired: epoch bumped
    assert a.renew("a", 1, SHORT, -1) is None  # a cannot come back to what it lost
    assert a.take("a", 1, SHORT, [3]) is None


def test_renewal_reads_the_map_only_when_it_moved(directory: Callable[[], Directory]) -> None:
    a = directory()
    a.join("a", "h:1", 30.0)
    a.take("a", 1, 30.0, [5, 6, 7, 9])
    renewal = a.renew("a", 1, 30.0, -1)
    assert renewal is not None and renewal.map is not None
    assert ((5, 7, "a"), (9, 9, "a")) == renewal.map.ranges
    assert {5: 1, 6: 1, 7: 1, 9: 1} == renewal.map.mine
    again = a.renew("a", 1, 30.0, renewal.map.version)
    assert again is not None and again.map is None
    assert ["a"] == [m.id for m in again.members] and again.members[0].live


def test_two_nodes_taking_the_same_slots_at_once_never_both_get_one(
    directory: Callable[[], Directory],
) -> None:
    nodes = {name: directory() for name in ("a", "b", "c")}
    for name, d in nodes.items():
        d.join(name, f"{name}:1", 30.0)
    got: dict[str, dict[int, int]] = {}

    def take(name: str) -> None:
        result = nodes[name].take(name, 1, 30.0, list(range(2000)))
        assert result is not None
        got[name] = result

    threads = [threading.Thread(target=take, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owned = [slot for taken in got.values() for slot in taken]
    assert sorted(owned) == list(range(2000))  # each slot exactly once


def test_release_by_a_stale_incarnation_changes_nothing(directory: Callable[[], Directory]) -> None:
    old, new = directory(), directory()
    old.join("a", "h:1", SHORT)
    old.take("a", 1, SHORT, [1])
    time.sleep(SHORT + 0.1)
    new.join("a", "h:1", 30.0)  # incarnation 2 (the slot freed)
    assert {1: 2} == new.take("a", 2, 30.0, [1])
    old.release("a", 1, [1])
    renewal = new.renew("a", 2, 30.0, -1)
    assert renewal is not None and renewal.map is not None
    assert {1: 2} == renewal.map.mine


def test_the_local_lease_ends_a_margin_before_the_database_can_expire_it() -> None:
    lease = LocalLease(2.0)
    assert not lease.valid(0.0)
    lease.renewed(sent=10.0)
    assert margin(2.0) == pytest.approx(2.0 * DRIFT + SCHEDULING)
    assert lease.valid(10.0 + 2.0 - margin(2.0) - 0.001)
    assert not lease.valid(10.0 + 2.0 - margin(2.0))
    lease.renewed(sent=9.0)  # an older renewal answered late never shortens it
    assert lease.valid(11.9)
    lease.lost()
    assert not lease.valid(10.5)


def test_claims_cut_free_slots_in_runs_by_node() -> None:
    free = list(range(10))
    deficits = {"b": 3, "a": 4, "c": 0}
    assert [0, 1, 2, 3] == claims(free, deficits, "a")
    assert [4, 5, 6] == claims(free, deficits, "b")
    assert [] == claims(free, deficits, "c")
    assert [] == claims(free, deficits, "z")
