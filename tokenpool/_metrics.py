"""What ``/metrics`` shows: request latencies, and a Prometheus collector over
``statistics()`` of the pools and the servers.

The collector reads every figure when Prometheus scrapes (``Pool.statistics()``
is a snapshot with no await), so nothing is counted twice and no metric object
sits on the hot path. Request latencies are counted here in plain lists: one
bucket increment a request, far cheaper than a ``prometheus_client.Histogram``
with its lock, which the RESP server would pay at every pipelined command.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._model import COUNTERS
from ._pauses import PAUSE_BOUNDS, Pauses
from ._store import LinkState

if TYPE_CHECKING:
    from ._pool import Pools

METRICS_POOLS = 100
"""Pools with per-pool series in one scrape (the largest); the rest are counted only."""
METRICS_CACHE = 1.0
"""Seconds a rendered scrape is served again to the next scrapers."""
METRICS_FRESH = 0.05
"""The same, after an HTTP worker's report came with its scrape (so a client sees its
own requests counted): still at most 20 renders a second, however many scrape."""

BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Latencies:
    """Request latencies per (transport, command): bucket counts and a sum.

    Labels come from a fixed set (the command table, the HTTP routes), so the
    number of series is bounded whatever clients send.
    """

    def __init__(self, pauses: Pauses | None = None) -> None:
        # The loop's pauses travel with the latencies they explain: both drivers and
        # the collector already hold this object.
        self.pauses = pauses or Pauses()
        self._series: dict[tuple[str, str], list[float]] = {}
        self._by_name: dict[str, list[float]] = {}  # RESP: a command as sent -> its series
        # Series kept elsewhere and shown here too (the HTTP workers' latencies, summed)
        self.remote: Callable[[], dict[tuple[str, str], list[float]]] | None = None

    def observe(self, transport: str, command: str, seconds: float, count: int = 1) -> None:
        key = (transport, command)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0] * (len(BOUNDS) + 2)  # buckets, +Inf, sum
        series[bisect.bisect_left(BOUNDS, seconds)] += count
        series[-1] += seconds * count

    def observe_pipeline(
        self, transport: str, commands: list[list[str]], label: Callable[[str], str], seconds: float
    ) -> None:
        """Every command of one pipeline took ``seconds`` (its replies went out together).

        ``commands`` are the commands as sent; ``label`` maps a name to its bounded metric
        label. The hot path costs one dict lookup per command: a name seen before maps
        straight to its series (up to 1,024 distinct names are remembered)."""
        index = bisect.bisect_left(BOUNDS, seconds)
        cache = self._by_name
        for argv in commands:
            name = argv[0]
            series = cache.get(name)
            if series is None:
                key = (transport, label(name))
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = [0.0] * (len(BOUNDS) + 2)
                if len(cache) < 1024:
                    cache[name] = series
            series[index] += 1
            series[-1] += seconds

    def series(self, transport: str) -> dict[str, list[float]]:
        """One transport's series as they are (bucket counts, +Inf, sum), by command:
        what an HTTP worker reports to its server."""
        return {c: list(v) for (t, c), v in self._series.items() if t == transport}

    def snapshot(self) -> list[tuple[str, str, list[float], float]]:
        """(transport, command, cumulative counts per bound and +Inf, sum) per series."""
        out = []
        merged = self._series
        if self.remote is not None:
            merged = {k: list(v) for k, v in self._series.items()}
            for key, series in self.remote().items():
                mine = merged.setdefault(key, [0.0] * (len(BOUNDS) + 2))
                for i, count in enumerate(series[: len(mine)]):
                    mine[i] += count
        for (transport, command), series in sorted(merged.items()):
            cumulative = []
            total = 0.0
            for count in series[:-1]:
                total += count
                cumulative.append(total)
            out.append((transport, command, cumulative, series[-1]))
        return out


class TokenpoolCollector(Collector):
    """Every figure of the pools and the servers, read at scrape time.

    ``servers`` returns, per transport, a dict of the driver's figures:
    ``clients``, ``commands``, ``errors`` and optionally ``protocol_errors``,
    ``auth_failures``, ``rate_limited``.
    """

    def __init__(
        self,
        pools: Callable[[], Pools | None],
        servers: Callable[[], dict[str, dict[str, int]]],
        latencies: Latencies,
    ) -> None:
        self._pools = pools
        self._servers = servers
        self._latencies = latencies

    def describe(self) -> list[Metric]:
        return []  # collected afresh at each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from self._pool_metrics()
        yield from self._server_metrics()
        histogram = HistogramMetricFamily(
            "tokenpool_request_duration_seconds",
            "Seconds from a request's arrival to its reply (RESP: the whole pipeline's).",
            labels=["transport", "command"],
        )
        for transport, command, cumulative, total in self._latencies.snapshot():
            buckets: list[tuple[str, float]] = [
                (f"{bound:g}", count) for bound, count in zip(BOUNDS, cumulative, strict=False)
            ]
            buckets.append(("+Inf", cumulative[-1]))
            histogram.add_metric([transport, command], buckets, total)
        yield histogram
        pauses = HistogramMetricFamily(
            "tokenpool_pause_seconds",
            "Pauses of the server's event loop by cause: gc (a collection), actor (one"
            " batch of a pool), loop (how late a 10 ms heartbeat woke).",
            labels=["cause"],
        )
        for series in self._latencies.pauses.snapshot():
            steps: list[tuple[str, float]] = [
                (f"{bound:g}", count)
                for bound, count in zip(PAUSE_BOUNDS, series.cumulative, strict=False)
            ]
            steps.append(("+Inf", series.count))
            pauses.add_metric([series.cause], steps, series.total)
        yield pauses

    def _pool_metrics(self) -> Iterator[Metric]:
        pools = self._pools()
        names = [] if pools is None else pools.names()
        count = GaugeMetricFamily("tokenpool_pools", "Pools served.")
        count.add_metric([], len(names))
        yield count
        if len(names) > METRICS_POOLS:
            # What one scrape costs is bounded: series for the largest pools only.
            def largest(name: str) -> tuple[int, str]:
                try:
                    return -pools.core(name).size, name  # type: ignore[union-attr]
                except Exception:  # dropped meanwhile
                    return 0, name

            names = sorted(names, key=largest)[:METRICS_POOLS]
        listed = GaugeMetricFamily(
            "tokenpool_pools_listed",
            f"Pools with per-pool series here (the {METRICS_POOLS} with the most tokens).",
        )
        listed.add_metric([], len(names))
        yield listed
        tokens = GaugeMetricFamily(
            "tokenpool_tokens", "Tokens of a pool by state.", labels=["pool", "state"]
        )
        size = GaugeMetricFamily("tokenpool_pool_size", "Tokens in a pool.", labels=["pool"])
        waiting = GaugeMetricFamily(
            "tokenpool_waiting", "Callers waiting for a token now.", labels=["pool"]
        )
        revision = GaugeMetricFamily(
            "tokenpool_revision", "The pool's latest revision.", labels=["pool"]
        )
        counters: dict[str, CounterMetricFamily] = {
            name: CounterMetricFamily(f"tokenpool_{name}", help_text, labels=["pool"])
            for name, help_text in COUNTERS.items()
        }
        backlog = GaugeMetricFamily(
            "tokenpool_write_backlog", "Changes not yet committed to the store.", labels=["pool"]
        )
        max_backlog = GaugeMetricFamily(
            "tokenpool_write_backlog_max",
            "Unwritten changes past which activations are refused.",
            labels=["pool"],
        )
        lag = GaugeMetricFamily(
            "tokenpool_write_lag_seconds",
            "Seconds the oldest uncommitted change has waited (0 when none).",
            labels=["pool"],
        )
        link = GaugeMetricFamily(
            "tokenpool_store_link",
            "The write-behind's link to the store: 1 for its current state.",
            labels=["pool", "state"],
        )
        written = CounterMetricFamily(
            "tokenpool_changes_written", "Changes committed to the store.", labels=["pool"]
        )
        batches = CounterMetricFamily(
            "tokenpool_batches_written", "Transactions committed to the store.", labels=["pool"]
        )
        stalls = CounterMetricFamily(
            "tokenpool_write_stalls",
            "Activation batches the RESP server delayed while the store fell behind.",
            labels=["pool"],
        )
        stall_seconds = CounterMetricFamily(
            "tokenpool_write_stall_seconds",
            "Seconds activations were delayed while the store fell behind.",
            labels=["pool"],
        )
        lost = CounterMetricFamily(
            "tokenpool_changes_lost",
            "Changes the store refused for good or that could not be written.",
            labels=["pool"],
        )
        subscribers = GaugeMetricFamily(
            "tokenpool_event_subscribers", "Event streams following the pool.", labels=["pool"]
        )
        for name in names:
            try:
                figures = pools.get(name).statistics()  # type: ignore[union-attr]
            except Exception:  # dropped between names() and get(): skip it
                continue
            stats = figures.stats
            tokens.add_metric([name, "active"], stats.active)
            tokens.add_metric([name, "available"], stats.available)
            size.add_metric([name], stats.size)
            waiting.add_metric([name], stats.waiting)
            revision.add_metric([name], stats.revision)
            for counter, family in counters.items():
                family.add_metric([name], getattr(stats, counter))
            subscribers.add_metric([name], figures.subscribers)
            writer = figures.writer
            if writer is None:
                continue
            backlog.add_metric([name], writer.backlog)
            max_backlog.add_metric([name], writer.max_backlog)
            lag.add_metric([name], writer.write_lag)
            for state in LinkState:
                link.add_metric([name, state.value], 1.0 if writer.link is state else 0.0)
            written.add_metric([name], writer.changes_written)
            batches.add_metric([name], writer.batches)
            lost.add_metric([name], writer.rejected + writer.lost)
            stalls.add_metric([name], writer.stalls)
            stall_seconds.add_metric([name], writer.stall_seconds)
        yield tokens
        yield size
        yield waiting
        yield revision
        yield from counters.values()
        yield backlog
        yield max_backlog
        yield lag
        yield link
        yield written
        yield batches
        yield lost
        yield stalls
        yield stall_seconds
        yield subscribers

    def _server_metrics(self) -> Iterator[Metric]:
        servers = self._servers()
        clients = GaugeMetricFamily(
            "tokenpool_connected_clients",
            "RESP: open connections; HTTP: requests in progress and open event streams.",
            labels=["transport"],
        )
        families = {
            key: CounterMetricFamily(f"tokenpool_{name}", help_text, labels=["transport"])
            for key, name, help_text in (
                ("commands", "commands", "Commands (RESP) or API requests (HTTP) served."),
                ("errors", "error_replies", "Replies that were errors."),
                ("protocol_errors", "protocol_errors", "Connections closed for a bad request."),
                ("auth_failures", "auth_failures", "Failed password attempts."),
                ("rate_limited", "rate_limited", "Requests refused by a rate limit (BUSY, 429)."),
            )
        }
        for transport, figures in sorted(servers.items()):
            clients.add_metric([transport], figures.get("clients", 0))
            for key, family in families.items():
                if key in figures:
                    family.add_metric([transport], figures[key])
        yield clients
        yield from families.values()


_rendered: weakref.WeakKeyDictionary[Any, tuple[float, bytes]] = weakref.WeakKeyDictionary()


def render(registry: Any, max_age: float = METRICS_CACHE) -> bytes:
    """The registry's text, rendered at most once per ``max_age`` seconds: however
    many scrape at once, they share one render."""
    from prometheus_client import generate_latest

    now = time.monotonic()
    cached = _rendered.get(registry)
    if cached is not None and now - cached[0] < max_age:
        return cached[1]
    data: bytes = generate_latest(registry)
    _rendered[registry] = (now, data)
    return data
