"""Pauses of the event loop, by cause: what a caller feels as tail latency.

One trio thread runs every pool and every connection, so anything that holds it
(a garbage collection, a long actor batch, a burst of store work) delays every
reply at once. ``Pauses`` counts them in histograms, shown in ``INFO pauses`` and
as ``tokenpool_pause_seconds`` in ``/metrics``:

- ``gc``: each collection of the cyclic collector, timed by a ``gc.callbacks`` hook;
- ``actor``: each batch an actor applies and answers (one pool's turn on the loop);
- ``loop``: how late a heartbeat woke (every ``HEARTBEAT`` seconds): whatever held
  the loop, including what no other cause names (a long task step, the store's
  encoding, the process preempted by another on the same cores).

The server (the CLI) installs the hooks; the library installs none, and an
application that wants them does as the CLI does.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

PAUSE_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds (seconds) of the buckets: sub-millisecond to a second."""
CAUSES = ("gc", "actor", "loop")
HEARTBEAT = 0.01
"""Seconds between the loop's heartbeats: 100 wake-ups a second, a few µs each."""


@attrs.frozen
class PauseSeries:
    """One cause's pauses: cumulative bucket counts (the last is every pause), sum, max."""

    cause: str
    cumulative: tuple[int, ...]
    total: float
    longest: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Pauses:
    """Histograms of pause lengths per cause (see the module's docstring)."""

    def __init__(self) -> None:
        self._counts = {cause: [0] * (len(PAUSE_BOUNDS) + 1) for cause in CAUSES}
        self._sums = dict.fromkeys(CAUSES, 0.0)
        self._longest = dict.fromkeys(CAUSES, 0.0)
        self._gc_started = 0.0

    def observe(self, cause: str, seconds: float) -> None:
        self._counts[cause][bisect.bisect_left(PAUSE_BOUNDS, seconds)] += 1
        self._sums[cause] += seconds
        if seconds > self._longest[cause]:
            self._longest[cause] = seconds

    def actor_batch(self, seconds: float) -> None:
        """An actor's batch took ``seconds`` (the hook ``Pools.observe_batches`` takes)."""
        self.observe("actor", seconds)

    def snapshot(self) -> list[PauseSeries]:
        series = []
        for cause in CAUSES:
            running = 0
            cumulative = []
            for count in self._counts[cause]:
                running += count
                cumulative.append(running)
            series.append(
                PauseSeries(cause, tuple(cumulative), self._sums[cause], self._longest[cause])
            )
        return series

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.observe("gc", time.perf_counter() - self._gc_started)
            self._gc_started = 0.0

    @contextmanager
    def watching_gc(self) -> Iterator[None]:
        """Time every collection while the block runs."""
        gc.callbacks.append(self._on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self._on_gc)

    async def heartbeat(self, interval: float = HEARTBEAT) -> None:
        """Wake every ``interval`` seconds and count how late each wake-up was. Runs
        until cancelled."""
        clock = trio.current_time
        due = clock() + interval
        while True:
            await trio.sleep_until(due)
            now = clock()
            self.observe("loop", max(0.0, now - due))
            due = max(due + interval, now + interval / 2)


def info_fields(series: list[PauseSeries]) -> dict[str, object]:
    """The ``INFO pauses`` fields: per cause, its count, longest, and buckets."""
    fields: dict[str, object] = {}
    for one in series:
        fields[f"{one.cause}_pauses"] = one.count
        fields[f"{one.cause}_pause_max_ms"] = f"{one.longest * 1000:.3f}"
        fields[f"{one.cause}_pause_total_ms"] = f"{one.total * 1000:.3f}"
        fields[f"{one.cause}_pause_histogram_ms"] = (
            ",".join(
                f"le{bound * 1000:g}={count}"
                for bound, count in zip(PAUSE_BOUNDS, one.cumulative, strict=False)
            )
            + f",inf={one.count}"
        )
    return fields
