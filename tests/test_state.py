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

from tokenpool import (
    InvalidArgumentError,
    Lease,
    NotActiveError,
    NotHolderError,
    Reason,
    TokenPoolError,
    UnknownTokenError,
    Usage,
)
from tokenpool._model import Renewed
from tokenpool._state import PoolState
from tokenpool.chaos.reference import NaivePool

from .strategies import USERS, CountingIds, invalid_user_ids, not_uuids, users, valid_user_ids

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = 10.0
US = timedelta(microseconds=1)


def error_code(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except TokenPoolError as error:
        return error.code
    raise AssertionError("expected an error")


class PoolMachine(RuleBasedStateMachine):
    """Drives PoolState and NaivePool with the same operations and compares everything."""

    @initialize(size=st.integers(min_value=1, max_value=5))
    def setup(self, size: int) -> None:
        self.now = T0
        self.ids = CountingIds()
        self.model_ids = CountingIds()
        self.state = PoolState(ttl=TTL, history_limit=10_000, ids=self.ids)
        token_ids = [self.ids() for _ in range(size)]
        self.model_ids.n = self.ids.n
        changes = self.state.add_tokens(token_ids, T0)
        self.model = NaivePool(token_ids, timedelta(seconds=TTL), self.model_ids)
        self.token_ids = token_ids
        self.leases_seen: list[Lease] = []
        self.changes = list(changes)

    # -- time -----------------------------------------------------------------

    @rule(step=st.sampled_from([0.0, 0.000001, 0.5, 1.0, 3.0, TTL / 2, TTL, 2 * TTL]))
    def wait(self, step: float) -> None:
        self.now += timedelta(seconds=step)
        self.changes += self.state.advance(self.now)
        self.model.advance(self.now)

    @rule(offset=st.sampled_from([-US, timedelta(0), US]))
    def jump_to_next_deadline(self, offset: timedelta) -> None:
        deadline = self.state.next_deadline()
        assume(deadline is not None)
        assert deadline is not None
        self.now = max(self.now, deadline + offset)
        self.changes += self.state.advance(self.now)
        self.model.advance(self.now)

    # -- operations -----------------------------------------------------------

    @rule(user=users)
    def activate(self, user: str) -> None:
        lease, changes = self.state.activate(user, self.now)
        self.changes += changes
        assert self.model.activate(user, self.now) == lease
        self.leases_seen.append(lease)

    @rule(data=st.data(), user=st.one_of(st.none(), users))
    def release(self, data: st.DataObject, user: str | None) -> None:
        token_id = data.draw(st.sampled_from(self.token_ids))
        expected = self.model.release(token_id, user, self.now)
        try:
            usage, changes = self.state.release(token_id, user, self.now)
        except (NotActiveError, NotHolderError) as error:
            assert error.code == expected
        else:
            self.changes += changes
            assert expected == usage

    @precondition(lambda self: self.leases_seen)
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.leases_seen))
        expected = self.model.renew(lease.token_id, lease.id, self.now)
        try:
            renewed, changes = self.state.renew(lease.token_id, lease.id, self.now)
        except NotHolderError as error:
            assert expected == error.code
        else:
            self.changes += changes
            assert expected == renewed

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
        count, changes = self.state.clear(self.now)
        self.changes += changes
        assert self.model.clear(self.now) == count

    @rule(bad=invalid_user_ids)
    def activate_invalid(self, bad: object) -> None:
        before = self.state.stats()
        with pytest.raises(InvalidArgumentError):
            self.state.activate(bad, self.now)  # type: ignore[arg-type]
        assert before == self.state.stats()

    # -- checks after every step ----------------------------------------------

    @invariant()
    def same_tokens_as_model(self) -> None:
        for status in self.state.tokens():
            lease = self.model.token_lease(status.id)
            if lease is None:
                assert (status.status, status.current_user_id) == ("available", None)
            else:
                assert (status.status, status.current_user_id, status.expires_at) == (
                    "active",
                    lease.user_id,
                    lease.expires_at,
                )

    @invariant()
    def one_holder_per_token_and_one_token_per_user(self) -> None:
        leases = self.state.leases()
        assert len({lease.token_id for lease in leases}) == len(leases)
        assert len({lease.user_id for lease in leases}) == len(leases)
        for user in USERS:
            assert self.model.holder_lease(user) == self.state.lease_of(user)

    @invariant()
    def history_matches_model(self) -> None:
        for token_id in self.token_ids:
            assert self.model.history_of(token_id) == self.state.history(token_id, 10_000)

    @invariant()
    def every_ended_lease_once_with_its_reason(self) -> None:
        ended = [c for c in self.changes if type(c) is Usage]
        assert len({u.id for u in ended}) == len(ended)
        assert sorted(ended, key=lambda u: u.id) == sorted(self.model.history, key=lambda u: u.id)
        started = {c.id for c in self.changes if type(c) is Lease}
        assert {u.id for u in ended} <= started

    @invariant()
    def counters_add_up(self) -> None:
        stats = self.state.stats()
        ended = stats.evictions + stats.expirations + stats.releases + stats.clears
        assert stats.activations == stats.active + ended
        assert stats.size == stats.active + stats.available
        assert stats.revision == self.model.revision
        counts = {reason: 0 for reason in Reason}
        for usage in self.model.history:
            counts[usage.reason] += 1
        assert (stats.expirations, stats.evictions, stats.releases, stats.clears) == (
            counts[Reason.EXPIRED],
            counts[Reason.EVICTED],
            counts[Reason.RELEASED],
            counts[Reason.CLEARED],
        )

    @invariant()
    def no_lease_outlives_its_deadline(self) -> None:
        for lease in self.state.leases():
            assert lease.expires_at > self.now
        deadline = self.state.next_deadline()
        leases = self.state.leases()
        assert deadline == (min(lease.expires_at for lease in leases) if leases else None)


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestPoolMachine = PoolMachine.TestCase


# -- unit cases the machine does not isolate --------------------------------


def make(size: int = 3, ttl: float = TTL, history_limit: int = 1000) -> PoolState:
    state = PoolState(ttl=ttl, history_limit=history_limit, ids=CountingIds())
    state.resize(size, T0)
    return state


def test_activate_is_idempotent_for_the_holder() -> None:
    state = make()
    first, _ = state.activate("alice", T0)
    again, changes = state.activate("alice", T0 + timedelta(seconds=1))
    assert first == again
    assert changes == []


def test_available_tokens_are_leased_fifo() -> None:
    state = make(size=3)
    a, _ = state.activate("a", T0)
    b, _ = state.activate("b", T0)
    state.release(b.token_id, None, T0)
    state.release(a.token_id, None, T0)
    # The third token was never used: it has been available the longest.
    third = next(t for t in state.token_ids() if t not in (a.token_id, b.token_id))
    assert [third, b.token_id, a.token_id] == [state.activate(u, T0)[0].token_id for u in "xyz"]


def test_full_pool_evicts_the_oldest_activation() -> None:
    state = make(size=2)
    a, _ = state.activate("a", T0)
    b, _ = state.activate("b", T0 + timedelta(seconds=1))
    state.renew(a.token_id, a.id, T0 + timedelta(seconds=2))  # renewing keeps activation order
    c, changes = state.activate("c", T0 + timedelta(seconds=3))
    assert a.token_id == c.token_id
    assert [ch.reason for ch in changes if type(ch) is Usage] == [Reason.EVICTED]
    assert state.lease_of("a") is None
    assert b == state.lease_of("b")


def test_expired_lease_ends_exactly_at_its_deadline_even_when_noticed_late() -> None:
    state = make()
    lease, _ = state.activate("a", T0)
    changes = state.advance(T0 + timedelta(hours=5))
    (ended,) = changes
    assert isinstance(ended, Usage)
    assert (lease.expires_at, Reason.EXPIRED) == (ended.ended_at, ended.reason)


def test_lease_is_valid_until_just_before_expires_at() -> None:
    state = make()
    lease, _ = state.activate("a", T0)
    state.advance(lease.expires_at - US)
    assert state.validate(lease.token_id, lease.id)
    state.advance(lease.expires_at)
    assert not state.validate(lease.token_id, lease.id)


def test_renew_pushes_expiry_and_keeps_identity() -> None:
    state = make()
    lease, _ = state.activate("a", T0)
    later = T0 + timedelta(seconds=7)
    renewed, changes = state.renew(lease.token_id.upper(), lease.id.upper(), later)
    assert (lease.id, lease.fence, later + timedelta(seconds=TTL)) == (
        renewed.id,
        renewed.fence,
        renewed.expires_at,
    )
    assert [Renewed(renewed)] == changes
    state.advance(lease.expires_at)
    assert state.validate(lease.token_id, lease.id)


def test_renew_of_a_replaced_lease_is_not_holder() -> None:
    state = make(size=1)
    old, _ = state.activate("a", T0)
    state.activate("b", T0)  # evicts a
    with pytest.raises(NotHolderError):
        state.renew(old.token_id, old.id, T0)


def test_release_errors_name_the_problem() -> None:
    state = make()
    lease, _ = state.activate("a", T0)
    assert error_code(lambda: state.release(lease.token_id, "b", T0)) == "NOTHOLDER"
    other = next(t for t in state.token_ids() if t != lease.token_id)
    assert error_code(lambda: state.release(other, None, T0)) == "NOTACTIVE"
    unknown = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(UnknownTokenError, match=unknown):
        state.release(unknown, None, T0)
    with pytest.raises(InvalidArgumentError, match="not a UUID"):
        state.release("nope", None, T0)
    assert lease == state.lease_of("a")


def test_token_ids_are_accepted_in_any_case_and_returned_lowercase() -> None:
    state = make()
    token_id = state.token_ids()[0]
    assert token_id == token_id.lower()
    assert token_id == state.token(token_id.upper()).id


def test_fences_strictly_increase() -> None:
    state = make(size=2)
    fences = [state.activate(f"u{i}", T0 + timedelta(seconds=i))[0].fence for i in range(20)]
    assert fences == sorted(set(fences))


def test_history_in_memory_is_bounded_per_token() -> None:
    state = make(size=1, history_limit=5)
    for i in range(20):
        state.activate(f"u{i}", T0)
    token_id = state.token_ids()[0]
    history = state.history(token_id, 100)
    assert [f"u{i}" for i in range(18, 13, -1)] == [u.user_id for u in history]
    for i in range(1000):
        state.activate(f"v{i}", T0)
    assert len(state._history[token_id]) <= 5 + 1  # trimmed in steps of limit // 4
    assert 5 == state.history_kept(token_id)


def test_history_limit_is_checked() -> None:
    state = make()
    token_id = state.token_ids()[0]
    for bad in (0, -1, 10_001, "5", 2.5, True):
        with pytest.raises(InvalidArgumentError, match="limit"):
            state.history(token_id, bad)  # type: ignore[arg-type]


def test_clear_ends_every_lease_and_counts_them() -> None:
    state = make(size=3)
    for user in "ab":
        state.activate(user, T0)
    count, changes = state.clear(T0)
    assert count == 2
    assert [c.reason for c in changes if type(c) is Usage] == [Reason.CLEARED] * 2
    assert (state.stats().active, state.stats().available) == (0, 3)


def test_resize_grows_then_shrinks_available_first_then_oldest_leases() -> None:
    state = make(size=2)
    a, _ = state.activate("a", T0)
    b, _ = state.activate("b", T0 + timedelta(seconds=1))
    state.resize(4, T0 + timedelta(seconds=2))
    assert state.size == 4
    changes = state.resize(1, T0 + timedelta(seconds=3))
    assert state.size == 1
    assert [a.id] == [c.id for c in changes if type(c) is Usage]
    assert b == state.lease_of("b")


@given(user=valid_user_ids)
def test_valid_user_ids_are_accepted(user: str) -> None:
    state = make()
    lease, _ = state.activate(user, T0)
    assert user == lease.user_id


@given(bad=invalid_user_ids)
def test_invalid_user_ids_raise_and_change_nothing(bad: object) -> None:
    state = make()
    with pytest.raises(InvalidArgumentError, match="user_id"):
        state.activate(bad, T0)  # type: ignore[arg-type]
    assert state.stats().activations == 0


@given(bad=not_uuids)
def test_malformed_token_ids_raise_invalid_argument(bad: object) -> None:
    state = make()
    with pytest.raises(InvalidArgumentError, match="token_id"):
        state.token(bad)  # type: ignore[arg-type]


def test_deadline_heap_stays_bounded_under_renew_churn() -> None:
    state = make(size=2)
    lease, _ = state.activate("a", T0)
    for i in range(10_000):
        lease, _ = state.renew(lease.token_id, lease.id, T0 + timedelta(milliseconds=i))
    assert len(state._deadlines) <= 2 * 1 + 64 + 1
