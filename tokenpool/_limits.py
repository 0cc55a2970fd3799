"""Rate limits: a token bucket per key (a client address, a user id), with no I/O.

Each key may spend ``burst`` requests at once and regains ``rate`` a second.
The table of buckets is bounded: it holds at most ``keys`` entries, and the one
touched longest ago goes first. A bucket untouched for ``burst / rate`` seconds
is full again, so forgetting it loses nothing; only when more than ``keys``
distinct keys are all busy at once does a forgotten key get a fresh bucket
early. Many distinct clients therefore cost a bounded amount of memory
(about 150 bytes a key), never a leak.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import attrs

from ._settings import check_int, check_seconds

MAX_KEYS = 100_000


@attrs.frozen
class LimiterStatistics:
    rate: float
    burst: int
    keys: int
    limited: int


class RateLimiter:
    """``take(key)`` spends one request of ``key``'s bucket.

    Returns 0.0 when the request may go ahead, else the seconds until it could.
    ``now`` is a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        keys: int = MAX_KEYS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = float(check_seconds(rate, "rate", 0.001, 1e9))
        self.burst = check_int(burst, "burst", 1, 10**9)
        self.keys = check_int(keys, "keys", 1, 10**8)
        self._now = now
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.limited = 0

    def take(self, key: str) -> float:
        now = self._now()
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            tokens = float(self.burst)
        else:
            tokens, stamp = entry
            tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            self.limited += 1
        if len(buckets) > self.keys:
            buckets.popitem(last=False)
        return wait

    def blocked(self, key: str) -> bool:
        """Whether ``take(key)`` would be refused now (asking spends nothing)."""
        entry = self._buckets.get(key)
        if entry is None:
            return False
        tokens, stamp = entry
        return min(float(self.burst), tokens + (self._now() - stamp) * self.rate) < 1.0

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(self.rate, self.burst, len(self._buckets), self.limited)
