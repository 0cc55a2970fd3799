"""The packed in-memory history (``tokenpool._history``) against a plain dict."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenpool._history import ENTRY_BYTES, EndedLog
from tokenpool._model import END, REV, SLOT, USER, EndRecord, Reason

_US = st.integers(min_value=0, max_value=2**62)
_lease_ids = st.one_of(
    st.uuids().map(str),  # what the pool makes: kept as 16 raw bytes
    st.uuids().map(lambda u: str(u).upper()),  # not canonical: kept as text
    st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t),
)
_users = st.text(min_size=1, max_size=20)


def _ended(
    rev: int, lease_id: str, user: str, reason: Reason, numbers: tuple[int, ...]
) -> EndRecord:
    fence, start, stop, slot = numbers
    return (END, lease_id, slot, user, fence, start, stop, rev, reason.value)


_records = st.tuples(
    _lease_ids,
    _users,
    st.sampled_from(list(Reason)),
    st.tuples(_US, _US, _US, st.integers(min_value=0, max_value=2**31 - 1)),
)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 3), _records),
            st.tuples(st.just("drop"), st.integers(0, 5), st.none()),
        ),
        max_size=60,
    )
)
def test_the_log_keeps_what_a_dict_keeps(steps: list[tuple[str, int, object]]) -> None:
    log = EndedLog()
    model: dict[int, EndRecord] = {}
    rev = 0
    for op, n, record in steps:
        if op == "add":
            assert isinstance(record, tuple)
            rev += n  # revisions only grow, with gaps (grants and renewals use some)
            ended = _ended(rev, *record)
            log.append(ended)
            model[rev] = ended
        else:
            oldest = sorted(model)[:n]
            gone = [model.pop(r) for r in oldest]
            assert log.drop_oldest(n) == [(e[REV], e[SLOT], e[USER]) for e in gone]
        assert len(log) == len(model)
        for r, ended in model.items():
            assert log.get(r) == ended
    for missing in (0, rev + 1):
        with pytest.raises(KeyError):
            log.get(missing)


def test_a_pool_lease_costs_its_stated_bytes() -> None:
    log = EndedLog()
    log.append((END, str(uuid.uuid4()), 3, "alice", 7, 1, 2, 9, "expired"))
    packed = log._entries[0]
    assert len(packed) + 33 + 8 + 8 == ENTRY_BYTES + len("alice")
    assert log.get(9)[REV] == 9
