"""Sustained load: a full minute at full speed, as an operator load-tests before trusting.

ACTIVATE of 100,000 users, 50 clients, pipeline 16, for 60 s (10 s in quick mode),
on tokenpool's default store (SQLite) and on PostgreSQL, in ``async`` durability:
the rate, whether any activation was refused (redis-benchmark stops at the first
error reply: a refusal ends the run, and the figure is then when it came), and the
write lag (submitted to committed) over the run, from the server's own histogram
(``INFO persistence``'s ``write_lag_histogram``, read before and after).
"""

from __future__ import annotations

from ._drivers import RefusedError, redis_benchmark
from ._measure import Figure
from ._systems import RespSystem, tokenpool_resp

USERS = 100_000
SIZE = 10_000


def _histogram(system: RespSystem) -> list[tuple[float, int]]:
    text = system.info("persistence").get("write_lag_histogram", "")
    out = []
    for part in text.split(","):
        if part:
            bound, _, count = part.partition("=")
            out.append((float(bound.removeprefix("le")), int(count)))
    return out


def _p99(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> float:
    """The bucket bound under which 99% of the run's batches committed (seconds)."""
    counts = [(b, a - dict(before).get(b, 0)) for b, a in after]
    total = counts[-1][1] if counts else 0
    for bound, cumulative in counts:
        if total and cumulative >= 0.99 * total:
            return bound
    return float("nan")


def _run(store: str, seconds: float) -> dict[str, float]:
    with tokenpool_resp(f"tokenpool async ({store})", SIZE, store=store) as system:
        probe = redis_benchmark(
            system.port,
            list(system.activate),
            clients=50,
            pipeline=16,
            requests=100_000,
            keyspace=USERS,
        )
        system.settle()
        before = _histogram(system)
        errors = system.errors()
        requests = int(probe.rps * seconds)
        try:
            run = redis_benchmark(
                system.port,
                list(system.activate),
                clients=50,
                pipeline=16,
                requests=requests,
                keyspace=USERS,
            )
            rps, refused, lasted = run.rps, system.errors() - errors, run.seconds
        except RefusedError:
            rps, refused, lasted = float("nan"), max(1, system.errors() - errors), float("nan")
        after = _histogram(system)
    return {
        "rps": rps,
        "refused": float(refused),
        "lag_p99_ms": _p99(before, after) * 1000,
        "seconds": lasted,
    }


def run(quick: bool) -> list[Figure]:
    seconds = 10.0 if quick else 60.0
    figures: list[Figure] = []
    for store in ("sqlite", "postgresql"):
        got = _run(store, seconds)
        params = {"section": "sustained", "store": store}
        figures += [
            Figure(
                f"sustained {seconds:.0f} s, {store}: requests/s",
                "requests/s",
                (got["rps"],),
                {**params, "metric": "rps"},
            ),
            Figure(
                f"sustained {seconds:.0f} s, {store}: refused",
                "requests",
                (got["refused"],),
                {**params, "metric": "refused"},
            ),
            Figure(
                f"sustained {seconds:.0f} s, {store}: write lag p99",
                "ms",
                (got["lag_p99_ms"],),
                {**params, "metric": "lag_p99"},
            ),
        ]
    return figures
