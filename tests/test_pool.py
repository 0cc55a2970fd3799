"""The embedded pool: the actor, its timer and the library API, on trio's MockClock."""

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
    Activate,
    Clock,
    GetLease,
    InvalidArgumentError,
    NotActiveError,
    NotHolderError,
    Reason,
    Release,
    UnavailableError,
    UnknownTokenError,
)
from tokenpool._actor import Actor
from tokenpool._model import END, GRANT, Record
from tokenpool._ops import Op
from tokenpool._settings import PoolSettings
from tokenpool._state import PoolState
from tokenpool._store import LinkState

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


async def test_expiry_fires_on_time_without_any_request(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=3, ttl=120, clock=Clock(T0)) as pool:
        lease = await pool.activate("alice")
        await trio.sleep(119.999)
        assert pool.statistics().stats.active == 1
        await trio.sleep(0.002)
        # statistics() reads without a request: none has reached the actor since activate.
        stats = pool.statistics().stats
        assert (stats.active, stats.expirations) == (0, 1)
        (usage,) = await pool.history(lease.token_id)
        assert (Reason.EXPIRED, lease.expires_at) == (usage.reason, usage.ended_at)


async def test_timer_follows_the_nearest_deadline_as_leases_come_and_go(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with tokenpool.open_pool(size=5, ttl=10, clock=Clock(T0)) as pool:
        a = await pool.activate("a")
        await trio.sleep(3)
        b = await pool.activate("b")
        await pool.release(a.token_id)  # the timer was set for a; now b is next
        await trio.sleep(7.5)
        assert b == await pool.lease_of("b")
        await trio.sleep(3)
        assert await pool.lease_of("b") is None
        stats = await pool.stats()
        assert (stats.releases, stats.expirations) == (1, 1)


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


async def test_batch_applies_in_order_and_returns_errors_as_values() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        results = await pool.batch(
            [Activate("a"), Activate("b"), GetLease("a"), Activate(""), GetLease("b")]
        )
        a, b, a_after, bad, b_after = results
        assert isinstance(a, tokenpool.Lease) and isinstance(b, tokenpool.Lease)
        assert a.token_id == b.token_id
        assert a_after is None
        assert isinstance(bad, InvalidArgumentError)
        assert b == b_after


async def test_batch_is_one_actor_message() -> None:
    async with tokenpool.open_pool(size=10) as pool:
        before = pool.statistics().actor.requests
        leases = await pool.activate_many([f"u{i}" for i in range(500)])
        assert pool.statistics().actor.requests - before == 1
        assert len({lease.id for lease in leases if isinstance(lease, tokenpool.Lease)}) == 500
        assert (await pool.stats()).active == 10


async def test_a_failing_op_does_not_take_the_actor_down() -> None:
    class Broken(Op):
        __slots__ = ()

        def apply(self, state: PoolState, now: int) -> object:
            raise RuntimeError("bug")

    async with tokenpool.open_pool(size=1) as pool:
        (error,) = await pool.batch([Broken()])
        assert isinstance(error, RuntimeError)
        assert (await pool.activate("a")).user_id == "a"


async def test_closed_pool_answers_unavailable() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        pass
    with pytest.raises(UnavailableError, match="closed"):
        await pool.activate("a")


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


async def test_cancelled_while_queued_is_never_applied() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.activate("ghost")
        assert scope.cancelled_caught
        assert await pool.lease_of("ghost") is None
        assert (await pool.stats()).activations == 0


class HeldWriter:
    """A fake write-behind store that commits only when the test says so."""

    def __init__(self) -> None:
        self.changes: list[Record] = []
        self.committed = 0
        self.committed_seq = 0
        self.refused_seqs: dict[int, str] = {}
        self.gave_up = False
        self.state = LinkState.UP
        self._seq = 0
        self._progress = trio.Event()

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def progress(self) -> trio.Event:
        return self._progress

    def full(self) -> bool:
        return False

    def refusal(self) -> str:
        return "full"

    def owns(self) -> bool:
        return True

    def disowned(self) -> str:
        return "not owned"

    def submit(
        self, records: list[Record], counters: dict[str, int], clock_us: int, last_rev: int
    ) -> int:
        self.changes += records
        self._seq += 1
        return self._seq

    def commit(self) -> None:
        fences = [c[4] for c in self.changes if c[0] == GRANT]
        self.committed = max([self.committed, *fences])
        self.committed_seq = self._seq
        self._progress.set()
        self._progress = trio.Event()


def sync_actor(writer: HeldWriter) -> Actor:
    clock = Clock()
    clock.start()
    state = PoolState(PoolSettings(size=2, ttl=60))
    state.resize(2, clock.now_us())
    state.changes = []
    return Actor(state, clock.now_us, clock.trio_time, writer=writer, sync=True)


async def test_sync_never_hands_out_a_lease_before_its_grant_is_committed() -> None:
    """Two activations of one user: the one that finds the other's pending grant waits
    for that commit too, so a crash cannot take back a lease anyone was told about."""
    writer = HeldWriter()
    actor = sync_actor(writer)
    answered: list[object] = []

    async def activate() -> None:
        answered.extend(await actor.call([Activate("twice")]))

    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        nursery.start_soon(activate)
        nursery.start_soon(activate)
        await trio.testing.wait_all_tasks_blocked()
        assert [] == answered  # neither answered: the grant is not committed
        writer.commit()
        await trio.testing.wait_all_tasks_blocked()
        first, second = answered
        assert first == second
        actor.close()


async def test_cancelled_after_grant_but_before_reply_releases_the_lease() -> None:
    writer = HeldWriter()
    actor = sync_actor(writer)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        with trio.move_on_after(1):
            await actor.call([Activate("impatient")])  # the commit never comes in time
        await trio.testing.wait_all_tasks_blocked()
        writer.commit()
        results = await _commit_while(actor, writer, [GetLease("impatient")])
        assert results == [None]
        ended = [c for c in writer.changes if c[0] == END]
        assert [(u[3], u[8]) for u in ended] == [("impatient", "released")]
        actor.close()


async def test_a_lease_held_before_is_not_released_when_the_caller_gives_up() -> None:
    writer = HeldWriter()
    actor = sync_actor(writer)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        (lease,) = await _commit_while(actor, writer, [Activate("holder")])
        with trio.move_on_after(1):
            await actor.call([Activate("holder")])  # idempotent: grants nothing new
        writer.commit()
        assert [lease] == await _commit_while(actor, writer, [GetLease("holder")])
        actor.close()


class StepCounter(trio.abc.Instrument):
    """Counts task steps: a task that polls shows up as many steps."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_sync_caller_whose_commit_never_comes_is_answered_at_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The actor sleeps until the caller's deadline, not in 50 ms polls: the answer comes
    exactly at ``write_timeout`` and the whole wait takes a handful of task steps."""
    writer = HeldWriter()
    actor = sync_actor(writer)
    counter = StepCounter()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        trio.lowlevel.add_instrument(counter)
        started = trio.current_time()
        (result,) = await actor.call([Activate("late")])
        waited = trio.current_time() - started
        trio.lowlevel.remove_instrument(counter)
        actor.close()
    assert isinstance(result, UnavailableError)
    assert "did not commit in time" in str(result)
    assert pytest.approx(actor.write_timeout, abs=1e-9) == waited
    assert counter.steps < 20


async def _commit_while(actor: Actor, writer: HeldWriter, ops: list[Op]) -> list[object]:
    async with trio.open_nursery() as nursery:
        done: list[object] = []

        async def call() -> None:
            done.extend(await actor.call(ops))

        nursery.start_soon(call)
        while not done:
            await trio.testing.wait_all_tasks_blocked()
            writer.commit()
            await trio.lowlevel.checkpoint()
    return done


async def test_release_op_in_batch_reports_errors() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        lease = await pool.activate("a")
        results = await pool.batch([Release(lease.token_id, "b"), Release(lease.token_id, "a")])
        assert isinstance(results[0], NotHolderError)
        assert isinstance(results[1], tokenpool.Usage)


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


async def test_a_cancelled_waiter_is_never_granted(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=1, ttl=100, when_full="wait") as pool:
        a = await pool.activate("a")
        with trio.move_on_after(2):
            await pool.activate("ghost", wait=60)
        assert 0 == (await pool.stats()).waiting
        await pool.release(a.token_id)
        assert await pool.lease_of("ghost") is None
        assert 1 == (await pool.stats()).available


async def test_waiting_never_blocks_other_callers(autojump_clock: trio.abc.Clock) -> None:
    async with tokenpool.open_pool(size=1, ttl=100, when_full="wait") as pool:
        a = await pool.activate("a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.activate, "b", 30.0)
            await trio.sleep(1)
            start = trio.current_time()
            assert a == await pool.lease_of("a")
            assert (await pool.stats()).waiting == 1
            assert trio.current_time() == start  # answered at once
            await pool.release(a.token_id)


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


# -- history and events ---------------------------------------------------------------------


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
