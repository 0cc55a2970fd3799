"""The event log and its subscribers (tokenpool/_events.py): watch, replay from a revision,
compaction and overflow, through a pool. The transports' event streams are tested end to
end in test_server.py (SUBSCRIBE) and test_http.py (Server-Sent Events)."""

from __future__ import annotations

import json

import pytest

import tokenpool


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
