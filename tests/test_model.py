"""The model's value helpers: times as text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tokenpool import _model
from tokenpool._model import iso, to_datetime

# Every microsecond datetime holds: years 1 to 9999.
MIN_US = -62_135_596_800_000_000
MAX_US = 253_402_300_799_999_999


def _formatted(us: int) -> str:
    """The plain formula ``iso`` keeps the text of (a datetime, formatted whole)."""
    return to_datetime(us).isoformat(timespec="microseconds").replace("+00:00", "Z")


@given(st.lists(st.integers(MIN_US, MAX_US), min_size=1, max_size=200))
def test_iso_is_the_datetime_formatted_whatever_seconds_it_kept(times: list[int]) -> None:
    for us in times:  # a list: seconds met again, and near ones, come from the kept text
        assert iso(us) == _formatted(us)
        near = min(us + 1, MAX_US)
        assert iso(near) == _formatted(near)


def test_iso_keeps_a_bounded_number_of_seconds() -> None:
    for second in range(10 * _model._ISO_KEPT):
        iso(second * 1_000_000 + 7)
        assert len(_model._iso_seconds) <= _model._ISO_KEPT
    assert iso(None) == ""
    assert iso(0) == "1970-01-01T00:00:00.000000Z"
    assert iso(-1) == "1969-12-31T23:59:59.999999Z"
