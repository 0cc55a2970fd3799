"""The pool's one clock: wall time read once at open, plus trio's monotonic time since.

Leases are measured on trio's monotonic clock, so a wall-clock jump (NTP, a
manual change) never shortens or stretches one, and trio's ``MockClock``
drives every timestamp in tests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import trio


class Clock:
    """Maps trio time to timezone-aware UTC datetimes and back.

    ``start`` fixes the wall time of the moment the pool opens (tests use it
    for reproducible timestamps); by default it is read from the system then.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is not None and start.utcoffset() is None:
            raise ValueError("Clock start must be timezone-aware")
        self._start = start
        self._wall0 = start or datetime.now(UTC)
        self._mono0 = 0.0

    def start(self) -> None:
        """Anchor the clock; called by the pool inside ``trio.run`` as it opens."""
        self._wall0 = (self._start or datetime.now(UTC)).astimezone(UTC)
        self._mono0 = trio.current_time()

    def now(self) -> datetime:
        """The current time."""
        return self._wall0 + timedelta(seconds=trio.current_time() - self._mono0)

    def trio_time(self, at: datetime) -> float:
        """The trio time at which ``now()`` reaches ``at`` (for ``trio.sleep_until``)."""
        return self._mono0 + (at - self._wall0).total_seconds()
