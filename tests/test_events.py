"""The event log and its subscribers (tokenpool/_events.py): watch, replay from a revision,
compaction and overflow, through a pool. The transports' event streams are tested end to
end in test_server.py (SUBSCRIBE) and test_http.py (Server-Sent Events)."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenpool
from tokenpool import _events as events_module
from tokenpool._model import is_lease_event, record_revision
from tokenpool._settings import PoolSettings


async def test_watch_delivers_every_change_with_its_revision() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        async with pool.watch() as events:
            a = await pool.activate("a")
            b = await pool.activate("b")  # evicts a
            await pool.renew(b.token_id, b.id)
            got = []
            async for event in events:
                got.append(event)
                if len(got) == 4:
                    break
        assert ["granted", "ended", "granted", "renewed"] == [e.kind for e in got]
        assert (a.fence, "evicted", b.fence) == (got[0].revision, got[1].reason, got[1].revision)
        assert got[2].revision == b.fence


async def test_watch_since_replays_and_names_the_oldest_when_compacted() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        a = await pool.activate("a")
        await pool.activate("b")
        async with pool.watch(since=a.fence) as events:
            async for event in events:
                assert ("ended", a.id) == (event.kind, event.lease_id)
                break
        with pytest.raises(tokenpool.CompactedError) as raised:
            async with pool.watch(since=0):
                pass
        assert a.fence - 1 <= raised.value.oldest <= a.fence
        # A revision ahead of the pool's is refused as the server refuses it: the events
        # at or below it would otherwise be replayed as if after it.
        current = (await pool.stats()).revision
        with pytest.raises(tokenpool.CompactedError, match="ahead") as ahead:
            async with pool.watch(since=current + 1000):
                pass
        assert current + 1 == ahead.value.oldest
        async with pool.watch(since=current):  # the current revision itself is fine
            pass


async def test_a_slow_watcher_overflows_and_never_slows_the_pool() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        async with pool.watch(buffer=10) as events:
            for i in range(50):
                await pool.activate(f"u{i}")
            kinds = [event.kind async for event in events]
        assert "overflow" == kinds[-1]
        assert len(kinds) <= 11


async def test_payloads_are_each_event_s_json_made_once_for_every_subscriber() -> None:
    """``next_payloads`` (the RESP server's fan-out): the same events, in order, as the
    ``Event`` values, each one's JSON shared by the subscribers (an eviction's two events
    share a revision and have a JSON each); the stream ends with its ``overflow``."""
    async with tokenpool.open_pool(size=3) as pool:
        async with (
            pool.watch() as first,
            pool.watch() as second,
            pool.watch() as third,
            pool.watch() as values,
        ):
            for user in ("a", "b", "c", "d"):  # d evicts a
                await pool.activate(user)
            await pool.clear()
            expected = []
            async for event in values:
                expected.append(json.dumps(event.as_dict()).encode())
                if len(expected) == 8:  # 4 granted, 1 evicted, 3 cleared
                    break
            alone = await third.next_payloads(8, 0)  # none made yet: the first only
            assert 1 == len(alone)
            got = [p for p in await first.next_payloads(3, 3)]
            while len(got) < 8:
                got += await first.next_payloads(3, 3)
            other = [p for _ in range(8) for p in await second.next_payloads(1, 0)]
            while len(alone) < 8:  # made by now: a batch's rest at once
                alone += await third.next_payloads(8, 0)
        assert expected == got == other == alone
        assert all(a is b for a, b in zip(got, other, strict=True))  # made once
        evicted, granted = (json.loads(p) for p in got[3:5])
        assert evicted["revision"] == granted["revision"]
        assert ("ended", "evicted", "granted") == (
            evicted["kind"],
            evicted["reason"],
            granted["kind"],
        )
        ends = [json.loads(p) for p in got[-3:]]
        assert 3 == len({e["lease_id"] for e in ends})
        assert ["cleared"] * 3 == [e["reason"] for e in ends]
        async with pool.watch(buffer=2) as slow:
            for user in ("e", "f", "g"):
                await pool.activate(user)
            tail = []
            with pytest.raises(StopAsyncIteration):
                while True:
                    tail += await slow.next_payloads(32, 32)
        assert "overflow" == json.loads(tail[-1])["kind"]


def _replay_by_walking(log: list[Any], since: int, buffer: int) -> list[int] | int:
    """The replay as the first version walked it, record by record from the newest: the
    revisions replayed, or the ``oldest`` of the ``CompactedError``."""
    replay = []
    for record in reversed(log):
        revision = record_revision(record)
        if revision <= since:
            break
        if is_lease_event(record):
            replay.append(revision)
            if len(replay) > buffer:
                return revision + 1
    return list(reversed(replay))


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.sampled_from(["activate"] * 4 + ["renew", "release", "add", "clear"]), max_size=60
    ),
    since_back=st.integers(0, 40),
    buffer=st.integers(1, 30),
    capacity=st.integers(20, 200),
    chunk=st.integers(1, 4),
)
def test_a_replay_is_what_walking_the_log_gives(
    steps: list[str], since_back: int, buffer: int, capacity: int, chunk: int
) -> None:
    """Subscribing from a revision replays exactly the lease events after it, or names
    the same oldest revision as walking the log record by record would (tokens added
    and a clear among them: records of other kinds and ends that share a revision),
    read from the log a few at a time (``REPLAY_CHUNK``: an eviction's two events, one
    revision, are never split between two reads)."""

    async def main() -> None:
        async with tokenpool.open_pool(size=2) as pool:
            pool._core.hub.capacity = capacity  # a short log: compaction is reached
            pool._core.hub._log = deque(maxlen=capacity)
            for n, step in enumerate(steps):
                if step == "activate":
                    await pool.activate(f"u{n % 5}")
                elif step == "renew":
                    for token in await pool.tokens():
                        if token.lease_id is not None:
                            await pool.renew(token.id, token.lease_id)
                            break
                elif step == "release":
                    for token in await pool.tokens():
                        if token.lease_id is not None:
                            await pool.release(token.id, token.current_user_id)
                            break
                elif step == "add":  # a token added: a record of another kind
                    values = pool.settings.as_dict()
                    values["size"] += 1
                    await pool._core.configure(PoolSettings.make(**values))
                elif step == "clear":
                    await pool.clear()
            hub = pool._core.hub
            since = max(0, pool.statistics().stats.revision - since_back)
            if since + 1 < hub.oldest:
                return  # older than the log: the first check, not the walk
            expected = _replay_by_walking(list(hub._log), since, buffer)
            try:
                async with pool.watch(since, buffer=buffer) as events:
                    got: list[int] | int = []
                    while events.next_revision() is not None:
                        got.append((await events.__anext__()).revision)
            except tokenpool.CompactedError as error:
                got = error.oldest
            assert expected == got

    saved, events_module.REPLAY_CHUNK = events_module.REPLAY_CHUNK, chunk
    try:
        trio.run(main)
    finally:
        events_module.REPLAY_CHUNK = saved


async def test_subscribers_far_behind_that_never_read_hold_no_copy_of_their_replay() -> None:
    """A replay is read from the pool's log as the subscriber goes: 2,000 subscriptions
    resuming 5,000 events back cost their counters (each copied its replay twice, a list
    then a deque: 160 MB here; an outside probe grew a server by 1 GB with 100
    connections of 1,000 such channels). Then every one of them still gets it whole."""
    import tracemalloc

    async with tokenpool.open_pool(size=100) as pool:
        for start in range(0, 5_000, 1_000):
            await pool.activate_many([f"u{n}" for n in range(start, start + 1_000)])
        since = (await pool.stats()).revision - 5_000
        hub = pool._core.hub
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            subscriptions = [hub.subscribe(since) for _ in range(2_000)]
            grew = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grew < 8 * 1024 * 1024, f"{grew / 2**20:.1f} MiB for 2,000 subscriptions"
        logged = [record_revision(r) for r in hub._log if record_revision(r) > since]
        assert len(logged) > 5_000  # (evictions: an ended and a granted share a revision)
        for subscription in subscriptions[:3]:
            revisions = []
            while subscription.next_revision() is not None:
                revisions.append((await subscription.__anext__()).revision)
            assert logged == revisions
        for subscription in subscriptions:
            subscription.close()
