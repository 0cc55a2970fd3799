"""Write-behind persistence and recovery, against a real PostgreSQL and a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

import tokenpool
from tokenpool import Clock, PoolLockedError, Reason

from .dbutil import execute, query

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def settle(pool: tokenpool.Pool) -> None:
    """Wait (real time, briefly) until the writer has committed everything queued."""
    with trio.fail_after(10):
        await pool.flush()


async def test_restart_keeps_tokens_leases_and_history(store_url: str) -> None:
    async with tokenpool.open_pool(size=3, ttl=600, store=store_url) as pool:
        tokens = [t.id for t in await pool.tokens()]
        a = await pool.activate("alice")
        b = await pool.activate("bob")
        await pool.release(a.token_id, "alice")
        history = await pool.history(a.token_id)
        stats = await pool.stats()
    async with tokenpool.open_pool(size=3, ttl=600, store=store_url) as pool:
        assert tokens == [t.id for t in await pool.tokens()]
        assert b == await pool.lease_of("bob")
        assert await pool.lease_of("alice") is None
        assert history == await pool.history(a.token_id)
        again = await pool.stats()
        assert (stats.activations, stats.releases, stats.active) == (
            again.activations,
            again.releases,
            again.active,
        )
        assert again.revision > stats.revision  # a new owner epoch: fences keep growing
        c = await pool.activate("carol")
        assert c.fence > b.fence


async def test_leases_that_expired_while_closed_end_expired_at_their_deadline(
    store_url: str,
) -> None:
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=Clock(T0)) as pool:
        lease = await pool.activate("alice")
    later = Clock(T0 + timedelta(hours=2))
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=later) as pool:
        assert await pool.lease_of("alice") is None
        (usage,) = await pool.history(lease.token_id)
        assert (lease.id, Reason.EXPIRED, lease.expires_at) == (
            usage.id,
            usage.reason,
            usage.ended_at,
        )
        assert 1 == (await pool.stats()).expirations
    assert [] == query(store_url, "SELECT id FROM token_assignments")
    rows = query(store_url, "SELECT id, expiration_reason FROM token_usage_history")
    assert [(lease.id, "expired")] == rows


async def test_a_live_lease_keeps_its_deadline_across_a_restart(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=Clock(T0)) as pool:
        lease = await pool.activate("alice")
    later = Clock(T0 + timedelta(seconds=30))
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=later) as pool:
        assert lease == await pool.lease_of("alice")
        assert await pool.validate(lease.token_id, lease.id)


async def test_sync_durability_answers_after_commit(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, durability="sync") as pool:
        lease = await pool.activate("alice")
        # No waiting: the reply came after the commit.
        assert [(lease.id, lease.token_id)] == query(
            store_url, "SELECT id, token_id FROM token_assignments"
        )
        usage = await pool.release(lease.token_id)
        assert [(usage.id, "released")] == query(
            store_url, "SELECT id, expiration_reason FROM token_usage_history"
        )
        assert [] == query(store_url, "SELECT id FROM token_assignments")


async def test_async_durability_commits_within_the_flush_interval(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, flush_interval=0.002) as pool:
        lease = await pool.activate("alice")
        await settle(pool)
        stats = await pool.stats()
        assert stats.last_commit_at is not None and stats.write_lag is not None
        assert stats.write_lag < 1.0
        assert "up" == stats.link
        assert [(lease.id,)] == query(store_url, "SELECT id FROM token_assignments")
        assert [("alice",)] == query(store_url, "SELECT id FROM users")


async def test_flush_waits_for_the_commit(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, flush_interval=0.05) as pool:
        lease = await pool.activate("alice")
        await pool.flush()
        assert [(lease.id,)] == query(store_url, "SELECT id FROM token_assignments")
        assert 0 == (await pool.stats()).backlog


async def test_available_flag_follows_assignments_and_is_repaired_on_start(
    store_url: str,
) -> None:
    async with tokenpool.open_pool(size=3, store=store_url, durability="sync") as pool:
        lease = await pool.activate("alice")
        flags = dict(query(store_url, "SELECT id, available FROM tokens"))
        assert 1 == sum(1 for f in flags.values() if not f)
        assert not flags[lease.token_id]
    # Corrupt every flag, as a crash between two writers of the seed design could.
    execute(store_url, "UPDATE tokens SET available = NOT available")
    async with tokenpool.open_pool(size=3, store=store_url) as pool:
        assert lease == await pool.lease_of("alice")
    flags = dict(query(store_url, "SELECT id, available FROM tokens"))
    assert {t: t != lease.token_id for t in flags} == {t: bool(f) for t, f in flags.items()}


async def test_resize_grows_and_shrinks_across_restarts(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, clock=Clock(T0)) as pool:
        first = [t.id for t in await pool.tokens()]
        a = await pool.activate("a")
    async with tokenpool.open_pool(
        size=4, store=store_url, clock=Clock(T0 + timedelta(seconds=1))
    ) as pool:
        grown = [t.id for t in await pool.tokens()]
        assert first == grown[:2] and 4 == len(grown)
        b = await pool.activate("b")
        await pool.activate("c")
    async with tokenpool.open_pool(
        size=1, store=store_url, clock=Clock(T0 + timedelta(seconds=2))
    ) as pool:
        assert 1 == len(await pool.tokens())
        # Available tokens went first, then the oldest leases (a's, then b's).
        assert await pool.lease_of("a") is None and await pool.lease_of("b") is None
        assert "c" == (await pool.tokens())[0].current_user_id
    ended = dict(query(store_url, "SELECT id, expiration_reason FROM token_usage_history"))
    assert {a.id: "evicted", b.id: "evicted"} == ended
    assert 1 == len(query(store_url, "SELECT id FROM tokens WHERE retired_at IS NULL"))
    assert 4 == len(query(store_url, "SELECT id FROM tokens"))  # rows are never deleted


async def test_a_second_owner_is_refused_with_the_pool_name(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, name="seats"):
        with pytest.raises(PoolLockedError, match="seats"):
            async with tokenpool.open_pool(size=2, store=store_url, name="seats"):
                pass
        async with tokenpool.open_pool(size=2, store=store_url, name="other") as other:
            assert 2 == len(await other.tokens())


async def test_pools_with_different_names_share_one_database(store_url: str) -> None:
    async with (
        tokenpool.open_pool(size=2, store=store_url, name="a", durability="sync") as a,
        tokenpool.open_pool(size=3, store=store_url, name="b", durability="sync") as b,
    ):
        await a.activate("same-user")
        await b.activate("same-user")  # one lease per user per pool
    assert [("a", 1), ("b", 1)] == query(
        store_url, "SELECT pool, count(*) FROM token_assignments GROUP BY pool ORDER BY pool"
    )


async def test_history_beyond_memory_is_read_from_the_store(store_url: str) -> None:
    async with tokenpool.open_pool(
        size=1, store=store_url, history_limit=3, durability="sync"
    ) as pool:
        leases = [await pool.activate(f"u{i}") for i in range(8)]
        history = await pool.history(leases[0].token_id, limit=7)
    assert [lease.id for lease in reversed(leases[:7])] == [u.id for u in history]


async def test_stale_owner_is_fenced_and_stops_taking_activations(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, durability="sync") as pool:
        await pool.activate("a")
        execute(store_url, "UPDATE pools SET owner_epoch = owner_epoch + 1")
        with pytest.raises(tokenpool.UnavailableError):
            await pool.activate("b")
        with trio.fail_after(5):
            while (await pool.stats()).link != "fenced":
                await trio.sleep(0.01)
        with pytest.raises(tokenpool.UnavailableError):
            await pool.activate("c")
        assert "a" == (await pool.lease_of("a")).user_id  # type: ignore[union-attr]
    assert [] == query(store_url, "SELECT id FROM token_assignments WHERE user_id <> 'a'")


async def test_unreachable_store_fails_open_clearly() -> None:
    with pytest.raises(tokenpool.UnavailableError, match="cannot connect"):
        async with tokenpool.open_pool(
            store="postgresql://postgres@127.0.0.1:1/none", write_timeout=1
        ):
            pass


async def test_bad_store_url_is_invalid_argument() -> None:
    with pytest.raises(tokenpool.InvalidArgumentError, match="store"):
        async with tokenpool.open_pool(store="mysql://x"):
            pass


async def test_user_ids_with_quotes_and_backslashes_are_stored_as_given(store_url: str) -> None:
    """User ids may hold any printable character; the store's array literals escape them."""
    users = ['a"b', "c\\d", "{x,y}", "é,ü", 'q"\\"']
    async with tokenpool.open_pool(size=3, store=store_url) as pool:
        for user in users:
            await pool.activate(user)
        await pool.flush()
    assert set(users) == {r[0] for r in query(store_url, "SELECT id FROM users")}
    held = {r[0] for r in query(store_url, "SELECT user_id FROM token_assignments")}
    ended = {r[0] for r in query(store_url, "SELECT user_id FROM token_usage_history")}
    assert (set(users[2:]), set(users[:2])) == (held, ended)
    async with tokenpool.open_pool(size=3, store=store_url) as pool:
        assert users[2:] == [lease.user_id for lease in await _leases(pool)]


async def _leases(pool: tokenpool.Pool) -> list[tokenpool.Lease]:
    leases = [await pool.lease_of(u) for u in ("{x,y}", "é,ü", 'q"\\"')]
    return [lease for lease in leases if lease is not None]


async def test_history_is_one_snapshot_even_when_the_store_has_caught_up(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HISTORY reads memory, then the store for older entries. A lease that ends in
    between is in the store by then, but not in the memory snapshot: the reply must not
    mix the two states (the history checker caught exactly this)."""
    async with tokenpool.open_pool(size=1, store=pg_url) as pool:
        a = await pool.activate("a")
        await pool.release(a.token_id)
        b = await pool.activate("b")  # the same (only) token
        store_type = type(pool._store)
        real = store_type.history

        def racing(self: Any, token_id: str, limit: int) -> Any:
            trio.from_thread.run(pool.release, b.token_id)  # b ends after the memory read
            trio.from_thread.run(pool.flush)  # and its row is committed before ours
            return real(self, token_id, limit)

        monkeypatch.setattr(store_type, "history", racing)
        entries = await pool.history(a.token_id, limit=5)
        assert [a.id] == [u.id for u in entries]
