"""Every setting's range (tokenpool/_settings.py): Range, parse_int/parse_seconds and
PoolSettings.make, with plain calls. How the CLI, the environment and TOML reach them is
in test_cli.py; open_pool()'s refusals in test_pool.py."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenpool import InvalidArgumentError
from tokenpool._settings import (
    MAX_SIZE,
    PORT,
    SIZE,
    TTL,
    PoolSettings,
    Range,
    check_max_lifetime,
    parse_int,
    parse_seconds,
)

SMALL = Range("small", 1, 1000)
ASCII_DIGITS = "0123456789"


def is_ascii_integer(text: str) -> bool:
    """The naive reading: an optional sign, then 1 to 19 ASCII digits."""
    digits = text[1:] if text[:1] in ("+", "-") else text
    return 1 <= len(digits) <= 19 and all(c in ASCII_DIGITS for c in digits)


integer_texts = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.text(alphabet="+-0123456789", max_size=22),
    st.text(max_size=8),  # anything: other scripts' digits, spaces, signs alone
    st.sampled_from(["²", "٣", "\uff11", " 5", "5 ", "1_0", "0x10", "1e3", "5.0", "9" * 5000]),
)


@given(text=integer_texts)
def test_range_parse_accepts_exactly_ascii_integers_within_bounds(text: str) -> None:
    if is_ascii_integer(text) and 1 <= int(text) <= 1000:
        assert int(text) == SMALL.parse(text)
    else:
        with pytest.raises(InvalidArgumentError, match="small must be an integer from 1 to 1,000"):
            SMALL.parse(text)


@given(value=st.integers(0, 65535))
def test_every_value_in_range_round_trips_as_text(value: int) -> None:
    assert value == PORT.parse(str(value)) == PORT.check(value)


@pytest.mark.parametrize("value", [-1, 65536, True, 1.0, "80", None])
def test_range_check_refuses_what_is_not_an_int_in_bounds(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="port"):
        PORT.check(value)


def test_a_refusal_names_the_setting_the_range_and_the_value() -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        SIZE.parse("0")
    assert f"size must be an integer from 1 to {MAX_SIZE:,}, not 0" == str(raised.value)
    with pytest.raises(InvalidArgumentError, match="--size must"):
        SIZE.parse("0", "--size")  # the caller's own name for it


def test_a_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        SIZE.parse("9" * 5000)  # int() would raise a ValueError of its own here
    assert len(str(raised.value)) < 120


@given(seconds=st.floats(0.001, 10 * 365.25 * 86400))
def test_seconds_in_range_round_trip_as_text(seconds: float) -> None:
    assert seconds == TTL.parse(repr(seconds)) == TTL.check(seconds)


@pytest.mark.parametrize(
    "text", ["0", "-1", "inf", "nan", "1e999", "0x10", "1_0", "²", "", " 1", "1.5s", "True"]
)
def test_parse_seconds_refuses_what_is_not_a_finite_ascii_number_in_range(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="ttl must be a number of seconds"):
        TTL.parse(text)


@pytest.mark.parametrize(
    "value", [True, float("nan"), float("inf"), "1", 0.0005, None, 10**400, -(10**400)]
)
def test_check_seconds_refuses_bools_non_finite_text_and_out_of_range(value: object) -> None:
    # (an int too large for a float included: refused as out of range, not OverflowError;
    # the range is written as people read it, not 3.15576e+08)
    with pytest.raises(InvalidArgumentError, match=r"ttl .* from 0\.001 to 315,576,000,"):
        TTL.check(value)


@pytest.mark.parametrize("text", ["nan", "inf", "1e309", "x", ""])
def test_parse_seconds_writes_its_range_as_people_read_it(text: str) -> None:
    # (text that is not a finite number named the range 0.001 to 3.15576e+08)
    with pytest.raises(InvalidArgumentError, match=r"ttl .* from 0\.001 to 315,576,000,"):
        TTL.parse(text, "ttl")


def test_parse_int_and_parse_seconds_take_their_bounds_inclusive() -> None:
    assert (1, 10, -5) == (
        parse_int("1", "n", 1, 10),
        parse_int("+10", "n", 1, 10),
        parse_int("-5", "n", -5, 0),
    )
    assert (0.5, 2.0) == (parse_seconds(".5", "s", 0.5, 2), parse_seconds("2e0", "s", 0.5, 2))
    with pytest.raises(InvalidArgumentError):
        parse_int("11", "n", 1, 10)
    with pytest.raises(InvalidArgumentError):
        parse_seconds("0.49", "s", 0.5, 2)


def test_pool_settings_make_takes_loose_values_and_fills_defaults() -> None:
    assert PoolSettings() == PoolSettings.make()
    made = PoolSettings.make(size=5, ttl=2, when_full="WAIT", max_lifetime=30)
    assert (5, 2.0, "wait", 0.0, 30.0) == (
        made.size,
        made.ttl,
        made.when_full,
        made.min_hold,
        made.max_lifetime,
    )
    assert isinstance(made.ttl, float)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"size": 0}, "size"),
        ({"size": "5"}, "size"),
        ({"ttl": math.inf}, "ttl"),
        ({"when_full": "panic"}, "when-full"),
        ({"min_hold": -1}, "min-hold"),
        ({"max_lifetime": 0}, "max-lifetime"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_pool_settings_make_names_the_bad_value(values: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidArgumentError, match=named):
        PoolSettings.make(**values)


def test_pool_settings_are_checked_on_construction_too() -> None:
    with pytest.raises(InvalidArgumentError, match="size"):
        PoolSettings(size=0)
    # checked before any conversion: float() would take these
    for bad in ({"ttl": "5"}, {"ttl": " 7 "}, {"ttl": True}, {"min_hold": "3"}):
        with pytest.raises(InvalidArgumentError, match=r"ttl|min-hold"):
            PoolSettings(**bad)  # type: ignore[arg-type]
    # a policy in any case is the policy (it was kept as given, and matched none)
    assert ("evict", "reject", "wait") == tuple(
        PoolSettings(when_full=w).when_full for w in ("EVICT", "Reject", "wAIT")
    )


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, None), (0.0, None), (5, 5.0)])
def test_max_lifetime_zero_means_no_cap(value: object, expected: float | None) -> None:
    assert expected == check_max_lifetime(value)
