"""The cluster run's short versions (issue 20): three nodes, a SIGKILL, a SIGSTOP, a
restart and a drain under load, every client's calls checked across the pools' owners
(``tests/chaos/owners.py``); and that checker shown to catch the bugs it exists for, on
a real recorded run with the bug injected."""

from __future__ import annotations

import copy
import os
import shutil
from typing import Any

import attrs
import pytest

from tests.chaos import nodes, owners
from tests.chaos.checker import StoredLease
from tests.chaos.history import Operation
from tokenpool._store import EPOCH_SHIFT

# Short takeovers (the suite's other cluster tests use these too) and a short pause.
NODE_ARGS = ("--cluster-validity", "2", "--cluster-renew", "0.5")
CLIENTS = 6
PAUSE = 4.0


def _record(dsn: str, durability: str) -> tuple[Any, nodes.Recording]:
    summary, recording = nodes.record_cluster(
        CLIENTS, 1_000_000, dsn=dsn, durability=durability, pause=PAUSE, node_args=NODE_ARGS
    )
    assert recording is not None
    return summary, recording


@pytest.fixture(scope="module")
def sync_run(pg_server: str) -> tuple[Any, nodes.Recording]:
    return _record(pg_server, "sync")


@pytest.fixture(scope="module")
def async_run(pg_server: str) -> tuple[Any, nodes.Recording]:
    return _record(pg_server, "async")


def test_a_sync_cluster_run_is_explained_across_owners(sync_run: Any) -> None:
    summary, recording = sync_run
    assert 0 == summary.anomalies, summary.detail
    report = recording.check()
    assert report.takeovers >= 30  # every pool changed owner at least once
    assert report.mutations > 200 and report.reads > 200  # (a loaded 2-core machine: ~800)
    assert [] == report.window_lost and 0 == report.unverifiable
    answered = {op.client for op in recording.history if not op.lost}
    assert nodes.LIBRARY in answered  # the client library took part
    if shutil.which("redis-cli") or os.environ.get("CI") == "true":
        assert nodes.CLI in answered  # and redis-cli -c (make test installs it)


def test_an_async_cluster_run_loses_only_in_the_killed_and_paused_windows(
    async_run: Any,
) -> None:
    summary, recording = async_run
    assert 0 == summary.anomalies, summary.detail
    assert recording.lossy  # the run found which epochs the victims held
    assert recording.check().takeovers >= 30


def _epoch(revision: int) -> int:
    return revision >> EPOCH_SHIFT


def _grants(recording: nodes.Recording) -> list[Operation]:
    return sorted(
        (
            op
            for op in recording.history
            if op.kind == "activate" and op.ok and op.revision == int(op.value["fence"])
        ),
        key=lambda op: op.revision or 0,
    )


def _in_window(recording: nodes.Recording, op: Operation) -> bool:
    """Whether ``op`` changed a pool while a node that was then killed or paused held it."""
    return (op.pool, _epoch(op.revision or 0)) in recording.lossy


def _kinds(recording: nodes.Recording) -> list[str]:
    return sorted({a.kind for a in recording.check().anomalies})


def _first_grants_after_takeovers(recording: nodes.Recording) -> list[tuple[Operation, int]]:
    """The grants that were the first change of a pool's new owner (revision base + 1),
    with the base."""
    found = []
    for op in _grants(recording):
        base = _epoch(op.revision or 0) << EPOCH_SHIFT
        if op.revision == base + 1 and base > recording.start[op.pool]:
            found.append((op, base))
    assert found, "no takeover's first change was an acknowledged grant"
    return found


def _held_at(recording: nodes.Recording, pool: str, base: int) -> list[StoredLease]:
    """The leases the store held when the owner of ``base``'s epoch opened the pool."""
    return sorted(
        (
            s
            for s in recording.stored[pool]
            if (s.fence or 0) < base and (s.ended_revision is None or s.ended_revision > base)
        ),
        key=lambda s: (s.started_at, s.fence),
    )


def _restore(recording: nodes.Recording, lease_id: str, **changes: Any) -> None:
    """Make the store agree with an injected reply, as the buggy server would have."""
    for pool, leases in recording.stored.items():
        recording.stored[pool] = [
            attrs.evolve(s, **changes) if s.id == lease_id else s for s in leases
        ]


def test_the_recorded_cluster_history_is_clean(sync_run: Any) -> None:
    assert [] == _kinds(copy.deepcopy(sync_run[1]))


def test_a_double_grant_across_two_owners_is_caught(sync_run: Any) -> None:
    """The new owner grants a token the old owner's lease still holds (recovered)."""
    recording = copy.deepcopy(sync_run[1])
    for grant, base in _first_grants_after_takeovers(recording):
        held = _held_at(recording, grant.pool, base)
        free = [t for t in recording.tokens[grant.pool] if t not in {s.token_id for s in held}]
        # Not the token the rules give (the first free one, else the oldest lease's):
        victims = held if free else held[1:]
        if victims:
            break
    else:
        pytest.fail("no takeover with a lease of the old owner to grant over")
    victim = victims[-1]
    grant.value["token_id"] = victim.token_id
    _restore(recording, grant.value["id"], token_id=victim.token_id)
    kinds = _kinds(recording)
    assert "wrong grant" in kinds and "double holder" in kinds


def test_a_fence_going_back_at_a_takeover_is_caught(sync_run: Any) -> None:
    """The new owner numbers its grants below the old owner's (no epoch bump)."""
    recording = copy.deepcopy(sync_run[1])
    grants = _grants(recording)
    for grant, base in _first_grants_after_takeovers(recording):
        before = [
            int(g.value["fence"])
            for g in grants
            if g.pool == grant.pool and (g.revision or 0) < base and g.completed < grant.invoked
        ]
        if before:
            break
    else:
        pytest.fail("no takeover after an acknowledged grant of the old owner")
    fence = max(before) - 1
    grant.value["fence"] = str(fence)
    grant.value["revision"] = str(fence)
    grant.revision = fence
    _restore(recording, grant.value["id"], fence=fence)
    assert "fence went back" in _kinds(recording)


def test_a_lost_sync_acknowledgement_is_caught(sync_run: Any) -> None:
    """A grant the killed node acknowledged in sync mode, missing from the store."""
    recording = copy.deepcopy(sync_run[1])
    acknowledged = [g for g in _grants(recording) if _in_window(recording, g)]
    assert acknowledged, "the victims acknowledged no grant"
    gone = acknowledged[-1].value["id"]
    for pool, leases in recording.stored.items():
        recording.stored[pool] = [s for s in leases if s.id != gone]
    assert "lost change" in _kinds(recording)


def test_an_async_loss_outside_the_victims_windows_is_caught(async_run: Any) -> None:
    """In async mode a loss is forgiven only in an epoch a killed or paused node held."""
    recording = copy.deepcopy(async_run[1])
    assert [] == _kinds(recording)
    kept = [g for g in _grants(recording) if not _in_window(recording, g)]
    gone = kept[-1].value["id"]  # acknowledged by a node that stopped in order
    for pool, leases in recording.stored.items():
        recording.stored[pool] = [s for s in leases if s.id != gone]
    assert "lost change" in _kinds(recording)
    # The same recording, had it been sync: the victims' windows are losses too.
    if recording.check().window_lost:
        assert "lost change" in _kinds(attrs.evolve(async_run[1], durability="sync"))


def test_a_vouch_after_a_takeover_is_caught(sync_run: Any) -> None:
    """A VALIDATE answered 1 for a lease after the new owner ended it (a paused owner
    that kept vouching): no state in the read's window gives it."""
    recording = copy.deepcopy(sync_run[1])
    ended = {
        s.id: s
        for leases in recording.stored.values()
        for s in leases
        if s.ended_revision is not None and _epoch(s.ended_revision) > _epoch(s.fence or 0)
    }
    ends = {}  # lease id -> when the change that ended it was acknowledged
    for op in recording.history:
        if op.ok and op.revision is not None and op.kind in owners.MUTATING:
            ends[(op.pool, op.revision)] = op.completed
    for op in recording.history:
        if op.kind == "validate" and op.ok and op.value == 0 and op.args[1] in ended:
            lease = ended[op.args[1]]
            done = ends.get((op.pool, lease.ended_revision))
            if done is not None and done < op.invoked:
                op.value = 1  # vouched for a lease another owner had ended before it asked
                break
    else:
        pytest.fail("no VALIDATE of a lease ended by a later owner")
    assert "stale or impossible read" in _kinds(recording)
