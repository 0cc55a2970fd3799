"""The per-pool write-behind (tokenpool/_writer.py) on its own, on trio's MockClock: when it
reports a stalled store, a full backlog, a refused batch. Outages with a real store are in
test_durability.py and test_persistence.py; the actor's sync replies in test_actor.py."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tokenpool._model import GRANT, LeaseRecord
from tokenpool._store import MAX_BATCH_RECORDS, LinkState
from tokenpool._writer import MAX_STALL, Writer


class QuietLink:
    """A store link that never acknowledges anything."""

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self, now: bool = False) -> None:
        self.wakes += 1

    def now_us(self) -> int:
        return 0


def writer() -> Writer:
    return Writer(QuietLink(), 1, "p", max_backlog=100, write_timeout=2.0, committed=0)


async def test_a_writer_stalls_a_second_past_write_timeout_not_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = writer()
    assert w.stall_deadline() is None  # nothing pending: nothing can stall
    submitted = trio.current_time()
    w.submit([], {}, 0, 1)
    assert submitted + 3.0 == w.stall_deadline()
    await trio.sleep_until(submitted + 2.999)
    w.check_stalled()
    assert LinkState.UP is w.state
    await trio.sleep_until(submitted + 3.0)
    w.check_stalled()
    assert (LinkState.RETRYING, None) == (w.state, w.stall_deadline())


async def test_the_gathering_of_an_async_store_is_not_a_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The link may hold a change back for the flush interval before it sends it.
    w = Writer(QuietLink(), 1, "p", max_backlog=100, write_timeout=0.1, committed=0, gather=1.0)
    submitted = trio.current_time()
    w.submit([], {}, 0, 1)
    assert pytest.approx(submitted + 2.1) == w.stall_deadline()
    await trio.sleep_until(submitted + 2.0)
    w.check_stalled()
    assert LinkState.UP is w.state


async def test_an_acknowledgement_moves_the_stall_deadline_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = writer()
    first = w.submit([], {}, 0, 1)
    w.submit([], {}, 0, 2)
    await trio.sleep(1.5)
    assert first is not None
    w.acknowledged(first, 0)
    assert trio.current_time() + 3.0 == w.stall_deadline()


def grants(count: int) -> list[LeaseRecord]:
    return [
        (GRANT, f"l{i}", i, f"u{i}", i + 1, 0, 1, i + 1)  # a lease record (see _model)
        for i in range(count)
    ]


async def test_a_backlog_at_max_backlog_is_full_until_acknowledged() -> None:
    w = writer()  # max_backlog=100
    first = w.submit(grants(60), {}, 0, 60)
    assert not w.full()
    w.submit(grants(40), {}, 0, 100)
    assert (100, True) == (w.backlog, w.full())
    assert "backlog is full" in w.refusal()
    assert first is not None
    w.acknowledged(first, 60)
    assert (40, False, 60) == (w.backlog, w.full(), w.committed)


@given(st.lists(st.integers(1, 30), max_size=12))
def test_a_write_stall_grows_with_the_backlog_past_half_and_stops_when_full(
    sizes: list[int],
) -> None:
    async def main() -> tuple[Writer, list[tuple[int, float]]]:
        w = writer()  # max_backlog=100
        seen = []
        for size in sizes:
            w.submit(grants(size), {}, 0, 1)
            seen.append((w.backlog, w.stall()))
        return w, seen

    w, seen = trio.run(main)
    for backlog, delay in seen:
        if backlog <= 50 or backlog >= 100:
            assert 0.0 == delay  # none below half; none once full (refused at once)
        else:
            assert delay == pytest.approx(MAX_STALL * (backlog - 50) / 50)
    stalled = [d for _, d in seen if d]
    assert (len(stalled), pytest.approx(sum(stalled))) == (w.stalls, w.stall_seconds)


async def test_an_async_refusal_holds_activations_until_a_write_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    w = Writer(
        QuietLink(),
        1,
        "p",
        max_backlog=100,
        write_timeout=2.0,
        committed=0,
        hold_after_refusal=30.0,
    )
    refused = w.submit(grants(1), {}, 0, 1)
    assert refused is not None
    w.refused(refused, 1, "CHECK violated")
    assert w.full() and "CHECK violated" in w.refusal()
    later = w.submit(grants(2), {}, 0, 3)
    assert later is not None
    w.acknowledged(later, 2)
    assert not w.full()


@given(st.lists(st.integers(min_value=0, max_value=3 * MAX_BATCH_RECORDS // 2), max_size=12))
async def test_unsent_batches_go_in_bounded_frames_in_order_with_their_own_counters(
    sizes: list[int],
) -> None:
    # A backlog gathered while the store process was stopped went as ONE frame, written
    # as one transaction: ownership proofs waited for all of it. A frame holds at most
    # MAX_BATCH_RECORDS changes unless one batch alone is larger; it carries the counters
    # and clock of its own last batch (never later ones its records do not reach).
    w = Writer(QuietLink(), 1, "p", max_backlog=10**9, write_timeout=2.0, committed=0)
    for seq, size in enumerate(sizes, 1):
        w.submit([("r", seq)] * size, {"activations": seq}, 1000 * seq, seq)  # type: ignore[list-item]
    frames = w.take_all_unsent()
    assert not w.has_unsent and w.take_unsent() is None
    batches = [batch for frame in frames for batch in frame[3]]
    assert batches == [[("r", seq)] * size for seq, size in enumerate(sizes, 1)]
    for kind, key, last_seq, chunks, counters, clock_us in frames:
        assert (kind, key) == ("write", 1)
        assert chunks[-1] == [] or chunks[-1][0] == ("r", last_seq)
        assert (counters, clock_us) == ({"activations": last_seq}, 1000 * last_seq)
        size = sum(map(len, chunks))
        assert size <= MAX_BATCH_RECORDS or len(chunks) == 1
    for before, after in itertools.pairwise(frames):  # each frame as full as can be
        assert sum(map(len, before[3])) + len(after[3][0]) > MAX_BATCH_RECORDS
