"""The embedded pool through the library API (tokenpool/_pool.py): leases, policies, history,
on trio's MockClock. The actor's own rules are in test_actor.py, the events in test_events.py."""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.lowlevel
import trio.testing

import tokenpool
from tokenpool import (
    Clock,
    InvalidArgumentError,
    NotActiveError,
    NotHolderError,
    Reason,
    UnknownTokenError,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_lease_fields_come_from_the_pool_clock(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=3, ttl=60, clock=Clock(T0)) as pool:
        await trio.sleep(5)
        lease = await pool.activate("alice")
    assert (T0 + timedelta(seconds=5), T0 + timedelta(seconds=65)) == (
        lease.activated_at,
        lease.expires_at,
    )
    assert lease.activated_at.tzinfo is not None


async def test_full_pool_evicts_the_oldest_lease(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=2, ttl=100) as pool:
        a = await pool.activate("a")
        await trio.sleep(1)
        b = await pool.activate("b")
        await trio.sleep(1)
        c = await pool.activate("c")
        assert a.token_id == c.token_id
        assert await pool.lease_of("a") is None
        assert b == await pool.lease_of("b")
        (usage,) = await pool.history(a.token_id)
        assert (usage.reason, usage.user_id) == (Reason.EVICTED, "a")
        assert not await pool.validate(a.token_id, a.id)
        assert await pool.validate(c.token_id, c.id)
        assert c.fence > b.fence > a.fence


async def test_activate_twice_returns_the_same_lease() -> None:
    async with tokenpool.open_pool(size=2) as pool:
        first = await pool.activate("a")
        assert first == await pool.activate("a")
        assert (await pool.stats()).activations == 1


async def test_release_checks_the_holder() -> None:
    async with tokenpool.open_pool(size=2) as pool:
        lease = await pool.activate("a")
        with pytest.raises(NotHolderError, match="'b'"):
            await pool.release(lease.token_id, "b")
        usage = await pool.release(lease.token_id.upper(), "a")
        assert (lease.id, Reason.RELEASED) == (usage.id, usage.reason)
        with pytest.raises(NotActiveError):
            await pool.release(lease.token_id)
        with pytest.raises(UnknownTokenError):
            await pool.release("6f1c1a8e-0000-4000-8000-000000000000")


async def test_renew_moves_expiry(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=1, ttl=10, clock=Clock(T0)) as pool:
        lease = await pool.activate("a")
        await trio.sleep(8)
        renewed = await pool.renew(lease.token_id, lease.id)
        assert T0 + timedelta(seconds=18) == renewed.expires_at
        await trio.sleep(9)
        assert await pool.validate(lease.token_id, lease.id)
        await trio.sleep(1)
        assert not await pool.validate(lease.token_id, lease.id)
        with pytest.raises(NotHolderError):
            await pool.renew(lease.token_id, lease.id)


async def test_clear_ends_everything() -> None:
    async with tokenpool.open_pool(size=4) as pool:
        for user in "abc":
            await pool.activate(user)
        assert await pool.clear() == 3
        statuses = await pool.tokens()
        assert [s.status for s in statuses] == ["available"] * 4
        assert (await pool.stats()).clears == 3


async def test_tokens_are_in_a_stable_order() -> None:
    async with tokenpool.open_pool(size=5) as pool:
        before = [t.id for t in await pool.tokens()]
        await pool.activate("a")
        after = await pool.tokens()
        assert before == [t.id for t in after]
        assert sorted(["active"] + ["available"] * 4) == sorted(t.status for t in after)
        one = after[2]
        assert one == await pool.token(one.id.upper())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.activate(""), "empty"),
        (lambda p: p.activate("has space"), "whitespace"),
        (lambda p: p.activate("x" * 129), "129 bytes"),
        (lambda p: p.token("not-a-uuid"), "not a UUID"),
        (lambda p: p.history("00000000-0000-4000-8000-000000000000", limit=0), "limit"),
        (lambda p: p.validate("00000000-0000-4000-8000-000000000000", "zzz"), "lease_id"),
    ],
)
async def test_invalid_input_is_rejected_and_changes_nothing(call, message) -> None:  # type: ignore[no-untyped-def]
    async with tokenpool.open_pool(size=2) as pool:
        before = await pool.stats()
        with pytest.raises(InvalidArgumentError, match=message):
            await call(pool)
        assert before == await pool.stats()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": -1},
        {"size": 10**9},
        {"size": True},
        {"ttl": 0},
        {"ttl": -5},
        {"ttl": float("inf")},
        {"ttl": float("nan")},
        {"ttl": 1e-7},
        {"ttl": 1e300},
        {"durability": "maybe"},
        {"when_full": "panic"},
        {"min_hold": -1},
        {"max_lifetime": 0},
        {"name": "a/b"},
        {"name": ""},
        {"name": "x" * 65},
        {"flush_interval": -1},
        {"write_timeout": 0},
        {"max_backlog": 0},
        {"queue_size": 0},
        {"history_memory": 0},
        {"store": "postgresql://u@h:99999/db"},
        {"store": "postgresql://u@[::1/db"},
        {"store": "postgresql://u@h/db?schema=a-b"},
    ],
)
async def test_bad_settings_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        async with tokenpool.open_pool(**kwargs):  # type: ignore[arg-type]
            pass


async def test_an_error_in_the_body_comes_out_plain() -> None:
    with pytest.raises(KeyError):
        async with tokenpool.open_pool(size=1):
            raise KeyError("mine")


async def test_hundreds_of_tasks_keep_the_invariants(autojump_clock: trio.abc.Clock) -> None:
    rng = random.Random(7)
    granted: list[tokenpool.Lease] = []

    async def client(n: int, pool: tokenpool.Pool) -> None:
        for _ in range(20):
            user = f"user-{rng.randrange(60)}"
            lease = await pool.activate(user)
            assert user == lease.user_id
            granted.append(lease)
            await trio.sleep(rng.random() * 3)
            if rng.random() < 0.5:
                with contextlib.suppress(NotHolderError, NotActiveError):
                    await pool.release(lease.token_id, user)  # unless evicted or expired

    async with tokenpool.open_pool(size=8, ttl=2.5) as pool:
        async with trio.open_nursery() as nursery:
            for n in range(300):
                nursery.start_soon(client, n, pool)
        stats = await pool.stats()
        tokens = await pool.tokens()
        held = [t for t in tokens if t.current_user_id is not None]
        histories = [u for t in tokens for u in await pool.history(t.id, 10_000)]
    leases = held
    assert len({t.current_user_id for t in held}) == len(held)
    assert stats.activations == len({lease.id for lease in granted})
    assert stats.activations == len(leases) + len(histories)
    assert len(histories) == len({u.id for u in histories})
    assert stats.evictions > 0 and stats.expirations > 0 and stats.releases > 0


# -- policies for a full pool -------------------------------------------------------


async def test_reject_pool_raises_full_with_its_own_code() -> None:
    async with tokenpool.open_pool(size=1, when_full="reject") as pool:
        await pool.activate("a")
        with pytest.raises(tokenpool.FullError) as raised:
            await pool.activate("b")
        assert "FULL" == raised.value.code
        assert 1 == (await pool.stats()).refusals


async def test_a_waiter_gets_the_next_free_token(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=1, ttl=10, when_full="wait") as pool:
        a = await pool.activate("a")
        got: list[tokenpool.Lease] = []

        async def wait_for_it() -> None:
            got.append(await pool.activate("b", wait=60))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await trio.sleep(3)
            assert [] == got and 1 == (await pool.stats()).waiting
            await pool.release(a.token_id)
        (b,) = got
        assert (a.token_id, "b") == (b.token_id, b.user_id)


async def test_a_wait_that_runs_out_raises_full(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=1, ttl=100, when_full="wait") as pool:
        await pool.activate("a")
        start = trio.current_time()
        with pytest.raises(tokenpool.FullError, match="in time"):
            await pool.activate("b", wait=5)
        assert 5 == pytest.approx(trio.current_time() - start, abs=0.01)
        with pytest.raises(tokenpool.FullError):
            await pool.activate("b")  # no wait asked: refused at once


async def test_min_hold_refuses_rather_than_evict_a_young_lease(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with tokenpool.open_pool(size=1, ttl=100, min_hold=10) as pool:
        a = await pool.activate("a")
        await trio.sleep(5)
        with pytest.raises(tokenpool.FullError, match="min-hold"):
            await pool.activate("b")
        await trio.sleep(5)
        b = await pool.activate("b")
        assert a.token_id == b.token_id


async def test_max_lifetime_caps_renew(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=1, ttl=10, max_lifetime=15, clock=Clock(T0)) as pool:
        lease = await pool.activate("a")
        await trio.sleep(8)
        renewed = await pool.renew(lease.token_id, lease.id)
        assert T0 + timedelta(seconds=15) == renewed.expires_at


# -- history -------------------------------------------------------------------------------


async def test_history_pages_newest_first_each_entry_once() -> None:
    async with tokenpool.open_pool(size=1, history_memory=50) as pool:
        for i in range(120):
            await pool.activate(f"u{i}")
        token = (await pool.tokens())[0].id
        page = await pool.history(token, limit=30)
        seen = [u.user_id for u in page]
        while page.next_before is not None:
            page = await pool.history(token, limit=30, before=page.next_before)
            seen += [u.user_id for u in page]
        # Memory keeps at least 50: a memory-only pool pages through what it keeps.
        assert 50 <= len(seen) and [f"u{i}" for i in range(118, 118 - len(seen), -1)] == seen


async def test_user_history_lists_every_token_a_user_held() -> None:
    async with tokenpool.open_pool(size=3) as pool:
        tokens = []
        for _ in range(3):
            lease = await pool.activate("alice")
            tokens.append(lease.token_id)
            await pool.release(lease.token_id)
            await pool.activate("x")  # the next activation of alice gets another token
        page = await pool.user_history("alice")
        assert tokens[::-1] == [u.token_id for u in page]
        assert page.next_before is None


async def _hold(pool: tokenpool.Pool, count: int) -> None:
    for start in range(0, count, 5_000):
        await pool.activate_many([f"u{n}" for n in range(start, min(count, start + 5_000))])


@pytest.mark.parametrize("how", ["clear", "drop", "shrink"])
async def test_ending_many_leases_lets_other_requests_in_between(how: str) -> None:
    """CLEAR, POOL DROP and a shrinking ALTER of 20,000 leases end them END_STEP an
    actor batch: another client's request is answered before they finish (it used to
    wait for all of them in one batch)."""
    count = 20_000
    async with tokenpool.open_pools(
        declared={
            "big": tokenpool.PoolSettings(size=count + 10, ttl=3600),
            "other": tokenpool.PoolSettings(size=1, ttl=3600),
        }
    ) as pools:
        pool = pools.get("big")
        await _hold(pool, count)
        finished = trio.Event()
        answered_first: list[bool] = []
        ended: list[int] = []

        async def end_them() -> None:
            if how == "clear":
                ended.append(await pool.clear())
            elif how == "drop":
                ended.append(await pools.drop("big"))
            else:
                await pools.alter("big", size=1)
            finished.set()

        async def other_client() -> None:
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            await pools.get("other").activate("bystander")
            if how == "clear":
                await pool.activate("late")  # granted while the clear runs: kept
            answered_first.append(not finished.is_set())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end_them)
            nursery.start_soon(other_client)
        assert [True] == answered_first
        if how == "clear":
            assert [count] == ended
            assert (await pool.lease_of("late")) is not None
            assert 1 == (await pool.stats()).active
        elif how == "drop":
            assert [count] == ended
        else:
            stats = await pool.stats()
            assert (1, 1) == (stats.size, stats.active)


async def test_a_replay_counts_against_the_subscriber_buffer() -> None:
    """A replay longer than the buffer is refused (compacted, naming where to resume)
    instead of being held whole past the bound; from there the replay fits."""
    async with tokenpool.open_pool(size=100, ttl=3600) as pool:
        start = (await pool.stats()).revision
        await pool.activate_many([f"u{n}" for n in range(30)])
        with pytest.raises(tokenpool.CompactedError) as caught:
            async with pool.watch(since=start, buffer=10):
                pass
        resume = caught.value.oldest - 1
        assert start + 20 == resume
        got = []
        async with pool.watch(since=resume, buffer=10) as events:
            async for event in events:
                got.append(event.user_id)
                if len(got) == 10:
                    break
        assert [f"u{n}" for n in range(20, 30)] == got


async def test_a_memory_pool_created_again_continues_above_the_dropped_ones_revisions(
    autojump_clock: trio.abc.Clock,
) -> None:
    """No store: a pool dropped and created again under its name starts its revisions
    above the old pool's (as a stored pool's epoch does), so a watch resuming from the
    old pool's revision is told its events are gone (``CompactedError``) instead of
    being taken for a place in the new pool's history. The same holds across restarts:
    a memory pool's first revision is the wall clock's microseconds. (A clock fixed at
    the start, which does not move here: only the dropped pool's revision can lift the
    new one's.)"""
    settings = tokenpool.PoolSettings(size=2, ttl=60)
    async with tokenpool.open_pools(declared={"p": settings}, clock=Clock(T0)) as pools:
        old = pools.get("p")
        for user in ("a", "b", "c", "d", "e"):
            await old.activate(user)
        reached = old.statistics().stats.revision
        await pools.drop("p")
        new = await pools.create("p", settings)
        assert new.statistics().stats.revision >= reached
        lease = await new.activate("x")
        assert lease.fence > reached
        with pytest.raises(tokenpool.CompactedError):
            async with new.watch(since=reached - 2):
                pass


async def test_the_tokens_of_every_pool_together_are_bounded_by_max_tokens() -> None:
    """``max_tokens`` (the server's --max-tokens) bounds what ``create`` and ``alter``
    may add (an outside probe made pools of millions of tokens until memory ran out):
    refused whole, nothing made; a pool dropped or shrunk gives its tokens back."""
    settings = tokenpool.PoolSettings
    async with tokenpool.open_pools(max_tokens=100) as pools:
        await pools.create("a", settings(size=60))
        with pytest.raises(tokenpool.InvalidArgumentError, match=r"110 tokens .* max-tokens"):
            await pools.create("b", settings(size=50))
        assert "b" not in pools
        await pools.create("b", settings(size=40))
        with pytest.raises(tokenpool.InvalidArgumentError, match="max-tokens of 100"):
            await pools.alter("a", size=61)
        assert 60 == (await pools.get("a").stats()).size
        await pools.alter("b", size=10)  # shrinking is never refused
        await pools.alter("a", size=90)
        await pools.drop("b")
        await pools.create("c", settings(size=10))
    with pytest.raises(tokenpool.InvalidArgumentError, match="max_tokens"):
        async with tokenpool.open_pools(max_tokens=0):
            pass
