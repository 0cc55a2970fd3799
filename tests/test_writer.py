"""The per-pool write-behind on its own: when it reports a stalled store, on trio's MockClock."""

from __future__ import annotations

import trio
import trio.testing

from tokenpool._store import LinkState
from tokenpool._writer import Writer


class QuietLink:
    """A store link that never acknowledges anything."""

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
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
