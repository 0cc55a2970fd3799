"""The event log and its subscribers (tokenpool/_events.py): watch, replay from a revision,
compaction and overflow, through a pool. The transports' event streams are tested end to
end in test_server.py (SUBSCRIBE) and test_http.py (Server-Sent Events)."""

from __future__ import annotations

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
