"""The pure pool state: a hypothesis state machine against a naive model, plus unit cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.reference import NaivePool
from tokenpool import (
    FullError,
    InvalidArgumentError,
    Lease,
    NotActiveError,
    NotHolderError,
    TokenPoolError,
    UnknownTokenError,
    Usage,
)
from tokenpool._model import (
    END,
    FENCE,
    GRANT,
    ID,
    KIND,
    REASON,
    RENEW,
    REV,
    SLOT,
    START,
    STOP,
    USER,
    lease_value,
    record_revision,
    to_datetime,
    to_us,
    usage_value,
)
from tokenpool._settings import PoolSettings
from tokenpool._state import WAITING, PoolState

from .strategies import USERS, CountingIds, invalid_user_ids, not_uuids, users, valid_user_ids

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_US = to_us(T0)
TTL = 10.0
S = 1_000_000


def error_code(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except TokenPoolError as error:
        return error.code
    raise AssertionError("expected an error")


class PoolMachine(RuleBasedStateMachine):
    """Drives PoolState and NaivePool with the same operations and compares everything."""

    @initialize(
        size=st.integers(min_value=1, max_value=5),
        when_full=st.sampled_from(["evict", "reject", "wait"]),
        min_hold=st.sampled_from([0.0, 0.0, 2.0, 6.0]),
        max_lifetime=st.sampled_from([None, None, 4.0, 15.0]),
        history_memory=st.sampled_from([3, 10_000]),
    )
    def setup(
        self,
        size: int,
        when_full: str,
        min_hold: float,
        max_lifetime: float | None,
        history_memory: int,
    ) -> None:
        self.now = T0
        self.ids = CountingIds()
        self.model_ids = CountingIds()
        config = PoolSettings(size, TTL, when_full, min_hold, max_lifetime)
        self.state = PoolState(config, history_memory=history_memory, ids=self.ids)
        token_ids = [self.ids() for _ in range(size)]
        self.model_ids.n = self.ids.n
        self.state.add_tokens(token_ids, T0_US)
        self.model = NaivePool(
            token_ids,
            timedelta(seconds=TTL),
            self.model_ids,
            when_full=when_full,
            min_hold=timedelta(seconds=min_hold),
            max_lifetime=None if max_lifetime is None else timedelta(seconds=max_lifetime),
        )
        self.token_ids = token_ids
        self.leases_seen: list[Lease] = []
        self.records = list(self.state.changes)
        self.state.changes = []
        self.tickets: list[object] = []
        self.woken: dict[int, object] = {}
        self.model_woken: dict[int, object] = {}

    def lease(self, record: tuple) -> Lease:  # type: ignore[type-arg]
        return lease_value(record, self.state.token_text(record[SLOT]))

    def usage(self, record: tuple) -> Usage:  # type: ignore[type-arg]
        return usage_value(record, self.state.token_text(record[SLOT]))

    def settle(self) -> None:
        """Collect what the step changed and who it woke, in both."""
        self.records += self.state.changes
        self.state.changes = []
        for ticket, result in self.state.woken:
            self.woken[id(ticket)] = (
                self.lease(result) if isinstance(result, tuple) else type(result).__name__
            )
        self.state.woken = []
        for ticket, result in self.model.woken:
            self.model_woken[id(ticket)] = "FullError" if result == "FULL" else result
        self.model.woken = []
        assert self.model_woken == self.woken

    # -- time -----------------------------------------------------------------

    @rule(step=st.sampled_from([0.0, 0.000001, 0.5, 1.0, 3.0, TTL / 2, TTL, 2 * TTL]))
    def wait(self, step: float) -> None:
        self.now += timedelta(seconds=step)
        self.state.advance(to_us(self.now))
        self.model.advance(self.now)
        self.settle()

    @rule(offset=st.sampled_from([-1, 0, 1]))
    def jump_to_next_deadline(self, offset: int) -> None:
        deadline = self.state.next_deadline()
        assume(deadline is not None)
        assert deadline is not None
        self.now = max(self.now, to_datetime(deadline + offset))
        self.state.advance(to_us(self.now))
        self.model.advance(self.now)
        self.settle()

    # -- operations -----------------------------------------------------------

    @rule(user=users)
    def activate(self, user: str) -> None:
        expected = self.model.activate(user, self.now)
        try:
            record = self.state.activate(user, to_us(self.now))
        except FullError:
            assert "FULL" == expected
        else:
            assert expected == self.lease(record)
            self.leases_seen.append(self.lease(record))
        self.settle()

    @rule(user=users, wait=st.sampled_from([None, 0.5, 3.0, 30.0]))
    def activate_or_wait(self, user: str, wait: float | None) -> None:
        ticket = object()
        self.tickets.append(ticket)
        expected = self.model.activate(user, self.now, wait=wait, ticket=ticket)
        try:
            result = self.state.activate_or_wait(user, to_us(self.now), ticket, wait)
        except FullError:
            assert "FULL" == expected
        else:
            if result is WAITING:
                assert expected is None
            else:
                assert expected == self.lease(result)  # type: ignore[arg-type]
        self.settle()

    @precondition(lambda self: self.tickets)
    @rule(data=st.data())
    def cancel_wait(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self.tickets))
        self.state.cancel_wait(ticket)
        self.model.cancel(ticket)
        self.settle()

    @rule(data=st.data(), user=st.one_of(st.none(), users))
    def release(self, data: st.DataObject, user: str | None) -> None:
        token_id = data.draw(st.sampled_from(self.token_ids))
        expected = self.model.release(token_id, user, self.now)
        try:
            record = self.state.release(token_id, user, to_us(self.now))
        except (NotActiveError, NotHolderError) as error:
            assert error.code == expected
        else:
            assert expected == self.usage(record)
        self.settle()

    @precondition(lambda self: self.leases_seen)
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.leases_seen))
        expected = self.model.renew(lease.token_id, lease.id, self.now)
        try:
            renewed = self.state.renew(lease.token_id, lease.id, to_us(self.now))
        except NotHolderError as error:
            assert expected == error.code
        else:
            assert expected == self.lease(renewed)
        self.settle()

    @precondition(lambda self: self.leases_seen)
    @rule(data=st.data())
    def validate(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.leases_seen))
        current = self.model.token_lease(lease.token_id)
        assert (current is not None and current.id == lease.id) == self.state.validate(
            lease.token_id, lease.id
        )

    @rule()
    def clear(self) -> None:
        count = self.state.clear(to_us(self.now))
        assert self.model.clear(self.now) == count
        self.settle()

    @rule(bad=invalid_user_ids)
    def activate_invalid(self, bad: object) -> None:
        before = (self.state.revision, self.state.counters(), self.state.leases())
        with pytest.raises(InvalidArgumentError):
            self.state.activate(bad, to_us(self.now))  # type: ignore[arg-type]
        assert before == (self.state.revision, self.state.counters(), self.state.leases())
        assert [] == self.state.changes

    # -- checks after every step ----------------------------------------------

    @invariant()
    def same_tokens_as_model(self) -> None:
        for token_id in self.token_ids:
            _slot, lease = self.state.token(token_id)
            expected = self.model.token_lease(token_id)
            assert expected == (None if lease is None else self.lease(lease))

    @invariant()
    def one_holder_per_token_and_one_token_per_user(self) -> None:
        leases = self.state.leases()
        assert len({lease[SLOT] for lease in leases}) == len(leases)
        assert len({lease[USER] for lease in leases}) == len(leases)
        for user in USERS:
            record = self.state.lease_of(user)
            assert self.model.holder_lease(user) == (None if record is None else self.lease(record))

    @invariant()
    def history_in_memory_is_the_newest_suffix_of_the_model(self) -> None:
        floor = self.state.history_floor
        for token_id in self.token_ids:
            entries, store_before = self.state.history(token_id, 10_000)
            expected = [u for u in self.model.history_of(token_id) if u.revision >= floor]
            assert expected == [self.usage(r) for r in entries]
            older = [u for u in self.model.history_of(token_id) if u.revision < floor]
            assert bool(older) <= bool(store_before)  # the store is asked whenever it must be
        for user in USERS:
            entries, _ = self.state.user_history(user, 10_000)
            expected = [u for u in self.model.history_of_user(user) if u.revision >= floor]
            assert expected == [self.usage(r) for r in entries]

    @invariant()
    def every_ended_lease_once_with_its_own_revision(self) -> None:
        ended = [r for r in self.records if r[KIND] == END]
        assert len({r[REV] for r in ended}) == len(ended)
        assert [self.usage(r) for r in ended] == self.model.history
        started = {r[ID] for r in self.records if r[KIND] == GRANT}
        assert {r[ID] for r in ended} <= started

    @invariant()
    def records_carry_growing_revisions(self) -> None:
        revisions = [record_revision(r) for r in self.records]
        assert revisions == sorted(revisions)

    @invariant()
    def counters_add_up(self) -> None:
        state = self.state
        ended = state.evictions + state.expirations + state.releases + state.clears
        assert state.activations == state.active + ended
        assert state.size == state.active + state.available
        assert state.revision == self.model.revision
        assert state.waiting == len(self.model.waiters)
        assert state.waiting == state.statistics()["waiters_queued"]

    @invariant()
    def no_lease_outlives_its_deadline(self) -> None:
        leases = self.state.leases()
        for lease in leases:
            assert lease[STOP] > to_us(self.now)
            if self.state.max_life_us is not None:
                assert lease[STOP] - lease[START] <= max(self.state.max_life_us, self.state.ttl_us)
        deadline = self.state.next_deadline()
        waits = [w[2] for w in self.model.waiters]
        nearest = [to_us(x) for x in [*(lease.expires_at for lease in self.model.leases), *waits]]
        assert deadline == (min(nearest) if nearest else None)


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestPoolMachine = PoolMachine.TestCase


# -- unit cases the machine does not isolate --------------------------------


def make(size: int = 3, ttl: float = TTL, history_memory: int = 1000, **rules: object) -> PoolState:
    state = PoolState(
        PoolSettings(size, ttl, **rules),  # type: ignore[arg-type]
        history_memory=history_memory,
        ids=CountingIds(),
    )
    state.resize(size, T0_US)
    state.changes = []
    return state


def test_activate_is_idempotent_for_the_holder() -> None:
    state = make()
    first = state.activate("alice", T0_US)
    state.changes = []
    assert first == state.activate("alice", T0_US + S)
    assert [] == state.changes


def test_available_tokens_are_leased_fifo() -> None:
    state = make(size=3)
    a = state.activate("a", T0_US)
    b = state.activate("b", T0_US)
    state.release(state.token_text(b[SLOT]), None, T0_US)
    state.release(state.token_text(a[SLOT]), None, T0_US)
    third = next(s for s in range(3) if s not in (a[SLOT], b[SLOT]))
    assert [third, b[SLOT], a[SLOT]] == [state.activate(u, T0_US)[SLOT] for u in "xyz"]


def test_full_pool_evicts_the_oldest_activation_and_shares_its_revision() -> None:
    state = make(size=2)
    a = state.activate("a", T0_US)
    b = state.activate("b", T0_US + S)
    state.renew(state.token_text(a[SLOT]), a[ID], T0_US + 2 * S)  # renewing keeps activation order
    state.changes = []
    c = state.activate("c", T0_US + 3 * S)
    assert a[SLOT] == c[SLOT]
    (ended, granted) = state.changes
    assert (END, "evicted", c[FENCE]) == (ended[KIND], ended[REASON], ended[REV])
    assert granted is c
    assert state.lease_of("a") is None
    assert b == state.lease_of("b")


def test_reject_pool_refuses_when_full_and_counts_it() -> None:
    state = make(size=1, when_full="reject")
    state.activate("a", T0_US)
    with pytest.raises(FullError, match="held"):
        state.activate("b", T0_US)
    assert (1, 1) == (state.refusals, state.active)


def test_min_hold_protects_young_leases_from_eviction() -> None:
    state = make(size=1, min_hold=5.0)
    a = state.activate("a", T0_US)
    with pytest.raises(FullError, match="min-hold"):
        state.activate("b", T0_US + 5 * S - 1)
    b = state.activate("b", T0_US + 5 * S)
    assert a[SLOT] == b[SLOT]


def test_max_lifetime_caps_renewals() -> None:
    state = make(size=1, ttl=10.0, max_lifetime=25.0)
    a = state.activate("a", T0_US)
    token = state.token_text(a[SLOT])
    r1 = state.renew(token, a[ID], T0_US + 9 * S)
    assert T0_US + 19 * S == r1[STOP]
    r2 = state.renew(token, a[ID], T0_US + 18 * S)
    assert T0_US + 25 * S == r2[STOP]
    state.advance(T0_US + 25 * S)
    assert state.lease_of("a") is None


def test_wait_pool_grants_the_first_waiter_when_a_token_frees() -> None:
    state = make(size=1, when_full="wait")
    a = state.activate("a", T0_US)
    t1, t2 = object(), object()
    assert WAITING is state.activate_or_wait("b", T0_US, t1, 30.0)
    assert WAITING is state.activate_or_wait("c", T0_US, t2, 30.0)
    with pytest.raises(FullError):
        state.activate_or_wait("d", T0_US, object(), None)  # no wait asked: refused at once
    state.release(state.token_text(a[SLOT]), "a", T0_US + S)
    ((ticket, lease),) = state.woken
    assert (t1, "b", a[SLOT]) == (ticket, lease[USER], lease[SLOT])
    assert 1 == state.waiting


def test_every_wait_of_a_user_is_answered_with_the_lease_one_of_them_gets() -> None:
    # A user waiting twice (a retry, HTTP and RESP): the other waits got nothing until a
    # token freed for each, or FULL at their deadline while the user held a lease.
    state = make(size=1, when_full="wait")
    a = state.activate("a", T0_US)
    first, other, second, gone = object(), object(), object(), object()
    for ticket, user in ((first, "same"), (other, "other"), (second, "same"), (gone, "same")):
        assert WAITING is state.activate_or_wait(user, T0_US, ticket, 30.0)
    assert state.cancel_wait(gone)
    state.release(state.token_text(a[SLOT]), "a", T0_US + S)
    woken = dict(state.woken)
    assert {first, second} == set(woken) and woken[first] is woken[second]
    assert ("same", a[SLOT]) == (woken[first][USER], woken[first][SLOT])
    assert 1 == state.waiting  # "other" still waits: the next token freed is theirs
    state.woken = []
    state.release(state.token_text(a[SLOT]), "same", T0_US + 2 * S)
    ((ticket, lease),) = state.woken
    assert (other, "other") == (ticket, lease[USER])
    assert 0 == state.waiting


def test_a_wait_that_runs_out_gets_full_and_a_cancelled_one_nothing() -> None:
    state = make(size=1, when_full="wait")
    state.activate("a", T0_US)
    t1, t2 = object(), object()
    state.activate_or_wait("b", T0_US, t1, 2.0)
    state.activate_or_wait("c", T0_US, t2, 60.0)
    assert T0_US + 2 * S == state.next_deadline()
    state.advance(T0_US + 2 * S)
    ((ticket, error),) = state.woken
    assert (t1, FullError) == (ticket, type(error))
    assert state.cancel_wait(t2)
    state.woken = []
    state.advance(T0_US + 20 * S)  # a's lease expires: nobody is waiting any more
    assert [] == state.woken
    assert 1 == state.available


def test_waiters_that_leave_are_removed_at_once() -> None:
    """Waits that ran out or were cancelled leave nothing queued: a release then does O(1)
    work (it used to walk every dead waiter in one actor batch)."""
    state = make(size=1, when_full="wait")
    state.activate("a", T0_US)
    for n in range(10_000):
        state.activate_or_wait(f"w{n}", T0_US, ("timed out", n), 1.0)
    for n in range(10_000):
        state.activate_or_wait(f"c{n}", T0_US, ("cancelled", n), 60.0)
        assert state.cancel_wait(("cancelled", n))
    figures = state.statistics()
    assert 10_000 == figures["waiters_queued"]
    assert figures["wait_deadlines"] <= 2 * 10_000 + 64  # cancelled ones compacted away
    state.advance(T0_US + 2 * S)
    assert 10_000 == len(state.woken)
    figures = state.statistics()
    assert (0, 0) == (figures["waiters_queued"], state.waiting)
    assert figures["wait_deadlines"] <= 64
    state.woken = []
    state.activate_or_wait("late", T0_US + 2 * S, "late", 60.0)
    state.release(state.token_text(state.leases()[0][SLOT]), None, T0_US + 2 * S)
    assert [("late",)] == [(t,) for t, _ in state.woken]


def test_expired_lease_ends_exactly_at_its_deadline_even_when_noticed_late() -> None:
    state = make()
    lease = state.activate("a", T0_US)
    state.changes = []
    state.advance(T0_US + 5 * 3600 * S)
    (ended,) = state.changes
    assert (lease[STOP], "expired") == (ended[STOP], ended[REASON])


def test_time_never_runs_backwards() -> None:
    state = make()
    state.activate("a", T0_US + 10 * S)
    b = state.activate("b", T0_US)  # an older now is taken as the newest seen
    assert T0_US + 10 * S == b[START]


def test_renew_pushes_expiry_and_keeps_identity() -> None:
    state = make()
    lease = state.activate("a", T0_US)
    later = T0_US + 7 * S
    renewed = state.renew(state.token_text(lease[SLOT]).upper(), lease[ID].upper(), later)
    assert (lease[ID], lease[FENCE], later + 10 * S, RENEW) == (
        renewed[ID],
        renewed[FENCE],
        renewed[STOP],
        renewed[KIND],
    )
    state.advance(lease[STOP])
    assert state.validate(state.token_text(lease[SLOT]), lease[ID])


def test_release_errors_name_the_problem() -> None:
    state = make()
    lease = state.activate("a", T0_US)
    token = state.token_text(lease[SLOT])
    assert error_code(lambda: state.release(token, "b", T0_US)) == "NOTHOLDER"
    other = next(t for t in state.token_ids() if t != token)
    assert error_code(lambda: state.release(other, None, T0_US)) == "NOTACTIVE"
    unknown = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(UnknownTokenError, match=unknown):
        state.release(unknown, None, T0_US)
    with pytest.raises(InvalidArgumentError, match="not a UUID"):
        state.release("nope", None, T0_US)
    assert lease == state.lease_of("a")


def test_clear_gives_every_ended_lease_its_own_revision() -> None:
    state = make(size=3)
    for user in "ab":
        state.activate(user, T0_US)
    state.changes = []
    before = state.revision
    assert 2 == state.clear(T0_US)
    assert [before + 1, before + 2] == [r[REV] for r in state.changes]
    assert (0, 3) == (state.active, state.available)


def test_history_pages_by_revision_and_says_when_to_read_the_store() -> None:
    state = make(size=1, history_memory=10)
    for i in range(30):
        state.activate(f"u{i}", T0_US)
    token = state.token_ids()[0]
    page, store_before = state.history(token, 5)
    assert [f"u{i}" for i in range(28, 23, -1)] == [r[USER] for r in page]
    assert 0 == store_before
    older, store_before = state.history(token, 100, before=page[-1][REV])
    assert len(older) < 100 and store_before == older[-1][REV]  # the rest is in the store only
    assert [f"u{i}" for i in range(23, 23 - len(older), -1)] == [r[USER] for r in older]


def test_resize_grows_then_shrinks_available_first_then_oldest_leases() -> None:
    state = make(size=2)
    a = state.activate("a", T0_US)
    b = state.activate("b", T0_US + S)
    state.resize(4, T0_US + 2 * S)
    assert 4 == state.size
    state.changes = []
    state.resize(1, T0_US + 3 * S)
    assert 1 == state.size
    assert [a[ID]] == [r[ID] for r in state.changes if r[KIND] == END]
    assert b == state.lease_of("b")
    with pytest.raises(UnknownTokenError):
        state.token(state.token_text(a[SLOT]))  # retired


def test_tokens_page_walks_every_live_token_once() -> None:
    state = make(size=25)
    state.resize(20, T0_US)
    seen: list[int] = []
    cursor = 0
    while True:
        cursor, page = state.tokens_page(cursor, 7)
        seen += [slot for slot, _ in page]
        if cursor == 0:
            break
    assert sorted(seen) == seen and 20 == len(set(seen))


@given(user=valid_user_ids)
def test_valid_user_ids_are_accepted(user: str) -> None:
    state = make()
    assert user == state.activate(user, T0_US)[USER]


@given(bad=invalid_user_ids)
def test_invalid_user_ids_raise_and_change_nothing(bad: object) -> None:
    state = make()
    with pytest.raises(InvalidArgumentError, match="user_id"):
        state.activate(bad, T0_US)  # type: ignore[arg-type]
    assert 0 == state.activations


@given(bad=not_uuids)
def test_malformed_token_ids_raise_invalid_argument(bad: object) -> None:
    state = make()
    with pytest.raises(InvalidArgumentError, match="token_id"):
        state.token(bad)  # type: ignore[arg-type]


def test_history_limits_are_checked() -> None:
    state = make()
    token = state.token_ids()[0]
    for bad in (0, -1, 10_001, "5", 2.5, True):
        with pytest.raises(InvalidArgumentError, match="limit"):
            state.history(token, bad)  # type: ignore[arg-type]


def test_deadline_heap_stays_bounded_under_renew_churn() -> None:
    state = make(size=2)
    lease = state.activate("a", T0_US)
    token = state.token_text(lease[SLOT])
    for i in range(10_000):
        lease = state.renew(token, lease[ID], T0_US + i * 1000)
    assert state.statistics()["deadlines"] <= 2 * 1 + 64 + 1


def test_memory_history_is_bounded_for_the_whole_pool() -> None:
    state = make(size=50, history_memory=100)
    for i in range(5_000):
        state.activate(f"u{i}", T0_US)
    assert state.statistics()["history_in_memory"] <= 100 + 100 // 8 + 1


def test_the_per_token_and_per_user_indexes_forget_what_the_history_forgets() -> None:
    # Every activation evicts and every user is new: each index must hold exactly the
    # entries the history keeps, never a user or a revision it has forgotten.
    state = make(size=50, history_memory=1_000)
    for i in range(50_000):
        state.activate(f"u{i}", T0_US + i)
    kept = state.statistics()["history_in_memory"]
    assert kept <= 1_000 + 1_000 // 8
    assert sum(len(v) for v in state._user_history.values()) // 8 == kept
    assert sum(len(v) for v in state._by_slot.values()) // 8 == kept
    assert len(state._user_history) == kept  # one lease per user, none forgotten kept
    # A user whose lease was forgotten gets no page from memory, only the store's bound.
    page, store_before = state.user_history("u0")
    assert page == [] and store_before == state.history_floor
    newest = state.user_history(f"u{50_000 - 51}")[0]
    assert [e[USER] for e in newest] == [f"u{50_000 - 51}"]
