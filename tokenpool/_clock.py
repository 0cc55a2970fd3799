"""The pool's one clock: wall time read once at open, plus trio's monotonic time since.

Leases are measured on trio's monotonic clock, so a wall-clock jump (NTP, a
manual change) while a pool runs never shortens or stretches one, and trio's
``MockClock`` drives every timestamp in tests. Across restarts the wall clock
is read again, and it may have been set back: ``start(floor=...)`` begins no
earlier than the newest time the store holds, so time never runs backwards
(a lease can never end before it started, and recovery never rewrites the past).
"""

from __future__ import annotations

import time
from datetime import datetime

import trio

from ._model import to_us


class Clock:
    """Maps trio time to microseconds since the Unix epoch (and to datetimes) and back.

    ``start`` fixes the wall time of the moment the pool opens (tests use it
    for reproducible timestamps); by default it is read from the system then.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is not None and start.utcoffset() is None:
            raise ValueError("Clock start must be timezone-aware")
        self._start = start
        self._wall0 = to_us(start) if start is not None else time.time_ns() // 1000
        self._mono0 = 0.0
        self.behind = 0  # microseconds the wall clock was behind the store's floor at start

    def fork(self) -> Clock:
        """A clock of its own (one per pool) with the same fixed start, if any."""
        return Clock(self._start)

    def start(self, floor: int = 0) -> None:
        """Anchor the clock (inside ``trio.run``), no earlier than ``floor`` (microseconds)."""
        wall = to_us(self._start) if self._start is not None else time.time_ns() // 1000
        self.behind = max(0, floor - wall)
        self._wall0 = max(wall, floor)
        self._mono0 = trio.current_time()

    def now_us(self) -> int:
        """The current time, in microseconds since the Unix epoch."""
        return self._wall0 + int((trio.current_time() - self._mono0) * 1_000_000)

    def trio_time(self, at_us: int) -> float:
        """The trio time at which ``now_us()`` reaches ``at_us`` (for ``trio.sleep_until``)."""
        return self._mono0 + (at_us - self._wall0) / 1_000_000
