"""The actor (tokenpool/_actor.py): its expiry timer, batching, the cancellation rule and
sync replies, through a pool or on its own with a fake writer, on trio's MockClock."""

from __future__ import annotations

from datetime import UTC, datetime

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
    NotHolderError,
    Reason,
    Release,
    UnavailableError,
)
from tokenpool._actor import Actor
from tokenpool._model import (
    END,
    FENCE,
    GRANT,
    KIND,
    REASON,
    USER,
    Record,
)
from tokenpool._ops import Op
from tokenpool._settings import PoolSettings
from tokenpool._state import PoolState
from tokenpool._store import LinkState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- the expiry timer ----------------------------------------------------------------------


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


# -- batches: one message, results in order, errors as values ------------------------------


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


async def test_release_op_in_batch_reports_errors() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        lease = await pool.activate("a")
        results = await pool.batch([Release(lease.token_id, "b"), Release(lease.token_id, "a")])
        assert isinstance(results[0], NotHolderError)
        assert isinstance(results[1], tokenpool.Usage)


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


# -- the cancellation rule -----------------------------------------------------------------


async def test_cancelled_while_queued_is_never_applied() -> None:
    async with tokenpool.open_pool(size=1) as pool:
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.activate("ghost")
        assert scope.cancelled_caught
        assert await pool.lease_of("ghost") is None
        assert (await pool.stats()).activations == 0


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


# -- sync replies: answered only once the grant is committed -------------------------------


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
        fences = [c[FENCE] for c in self.changes if c[KIND] == GRANT]
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
        ended = [c for c in writer.changes if c[KIND] == END]
        assert [(u[USER], u[REASON]) for u in ended] == [("impatient", "released")]
        actor.close()


async def test_cancelled_just_as_its_commit_comes_still_releases_the_lease() -> None:
    """The caller is cancelled while it waits for its grant's commit, and the commit
    comes before the cancelled task runs again: the actor's answer must not overwrite
    "abandoned", or the caller, seeing it answered, keeps no lease and undoes nothing:
    a lease held by nobody until its TTL (found by an outside probe, 2 to 11 in 100
    cancelled activations on SQLite). trio runs the two tasks in either order: many
    rounds meet both."""
    for _ in range(40):
        writer = HeldWriter()
        actor = sync_actor(writer)
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            scope = trio.CancelScope()

            async def impatient(scope: trio.CancelScope = scope, actor: Actor = actor) -> None:
                with scope:
                    await actor.call([Activate("impatient")])

            nursery.start_soon(impatient)
            await trio.testing.wait_all_tasks_blocked()  # applied; waiting for its commit
            scope.cancel()
            writer.commit()  # in the same step: both are runnable now
            await trio.testing.wait_all_tasks_blocked()
            results = await _commit_while(actor, writer, [GetLease("impatient")])
            assert results == [None]
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
    # (it said "the change is kept and will be written", while the grant is given back)
    assert "did not commit this change in time: a lease it granted is given back" in str(result)
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
