"""The token-bucket rate limiter (tokenpool/_limits.py) on its own, with an injected clock.
The limits as the transports apply them are tested end to end in test_http.py (per client
address and per user) and test_server.py (failed AUTH), and as a command-layer step in
test_requests.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenpool import InvalidArgumentError
from tokenpool._limits import RateLimiter


class FakeTime:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limiter(rate: float = 2.0, burst: int = 3, keys: int = 100) -> tuple[RateLimiter, FakeTime]:
    clock = FakeTime()
    return RateLimiter(rate, burst, keys=keys, now=clock), clock


def test_a_key_spends_its_burst_then_waits_for_the_next_token() -> None:
    limits, _ = limiter(rate=2.0, burst=3)
    assert [0.0, 0.0, 0.0] == [limits.take("a") for _ in range(3)]
    assert 0.5 == pytest.approx(limits.take("a"))  # one token at 2 a second
    assert 1 == limits.statistics().limited


def test_a_bucket_refills_at_its_rate_and_never_past_its_burst() -> None:
    limits, clock = limiter(rate=2.0, burst=3)
    for _ in range(3):
        limits.take("a")
    clock.now += 0.5  # one token back
    assert (0.0, True) == (limits.take("a"), limits.take("a") > 0)
    clock.now += 3600  # a long idle time refills to the burst, no more
    assert [0.0, 0.0, 0.0] == [limits.take("a") for _ in range(3)]
    assert limits.take("a") > 0


def test_keys_have_buckets_of_their_own() -> None:
    limits, _ = limiter(rate=1.0, burst=1)
    assert 0.0 == limits.take("a")
    assert limits.take("a") > 0
    assert 0.0 == limits.take("b")


def test_the_table_forgets_the_key_touched_longest_ago() -> None:
    limits, _ = limiter(rate=1.0, burst=1, keys=2)
    for key in ("a", "b", "c"):
        limits.take(key)
    assert 2 == limits.statistics().keys
    assert 0.0 == limits.take("a")  # forgotten: a fresh bucket
    assert limits.take("c") > 0  # still remembered


def test_blocked_says_whether_take_would_be_refused() -> None:
    limits, clock = limiter(rate=1.0, burst=2)
    assert not limits.blocked("new")  # an unknown key has a full bucket
    limits.take("a")
    assert not limits.blocked("a")
    limits.take("a")
    assert limits.blocked("a")
    clock.now += 1.0
    assert not limits.blocked("a")


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["take", "blocked"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from([0.0, 0.1, 0.5, 1.0, 5.0]),
        ),
        max_size=40,
    )
)
def test_asking_blocked_spends_nothing_and_agrees_with_take(
    steps: list[tuple[str, str, float]],
) -> None:
    """Two limiters see the same takes; one is also asked ``blocked`` before each step.
    Their answers never differ, and ``blocked`` is true exactly when ``take`` refuses."""
    asked, clock = limiter(rate=2.0, burst=2, keys=2)
    plain, plain_clock = limiter(rate=2.0, burst=2, keys=2)
    for action, key, elapsed in steps:
        clock.now += elapsed
        plain_clock.now += elapsed
        if action == "take":
            assert plain.take(key) == asked.take(key)
        else:
            blocked = asked.blocked(key)
            assert blocked == (plain.take(key) > 0)
            asked.take(key)  # keep the two in step
    assert plain.statistics() == asked.statistics()


@pytest.mark.parametrize(
    ("rate", "burst", "keys", "named"),
    [
        (0.0, 1, 1, "rate"),
        (float("inf"), 1, 1, "rate"),
        (1.0, 0, 1, "burst"),
        (1.0, True, 1, "burst"),
        (1.0, 1, 0, "keys"),
    ],
)
def test_bad_limits_are_refused_with_their_name(
    rate: float, burst: int, keys: int, named: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=named):
        RateLimiter(rate, burst, keys=keys)
