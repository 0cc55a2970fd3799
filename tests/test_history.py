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
            revs, slots, users = log.drop_oldest(n)
            assert list(zip(revs, slots, users, strict=True)) == [
                (e[REV], e[SLOT], e[USER]) for e in gone
            ]
        assert len(log) == len(model)
        for r, ended in model.items():
            assert log.get(r) == ended
    for missing in (0, rev + 1):
        with pytest.raises(KeyError):
            log.get(missing)


def test_a_pool_lease_costs_its_stated_bytes() -> None:
    log = EndedLog()
    for rev in range(1, 1001):
        log.append((END, str(uuid.uuid4()), 3, "alice", 7, 1, 2, rev, "expired"))
    log.drop_oldest(0)  # moves every entry into the columns
    columns = [getattr(log, name) for name in log.__slots__]
    stored = sum(len(c) * getattr(c, "itemsize", 1) for c in columns if hasattr(c, "__len__"))
    assert not log._pending and not log._odd
    assert stored == 1000 * (ENTRY_BYTES + len("alice"))
    assert log.get(999)[REV] == 999


def test_a_batch_of_canonical_ids_with_one_odd_id_keeps_each_as_it_was() -> None:
    log = EndedLog()
    ids = [str(uuid.uuid4()) for _ in range(600)]
    ids[300] = ids[300].upper()
    ids[301] = "not-a-uuid"
    for rev, lease_id in enumerate(ids, 1):
        log.append((END, lease_id, rev % 7, f"user{rev}", rev, 1, 2, rev, "evicted"))
    assert [log.get(rev)[1] for rev in range(1, 601)] == ids
    revs, slots, users = log.drop_oldest(302)
    assert revs == list(range(1, 303)) and users[-1] == "user302" and slots[-1] == 302 % 7
    assert not log._odd
    assert [log.get(rev)[1] for rev in range(303, 601)] == ids[302:]
