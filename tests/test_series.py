"""The series (``_series``): the rings against a naive model (hypothesis), a pool's
seconds and minutes, and the sampler over real pools on trio's MockClock."""

from __future__ import annotations

import math

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import tokenpool
from tokenpool._errors import NotKeptError
from tokenpool._series import (
    DAY,
    FIELDS,
    HOUR,
    Figures,
    PoolSeries,
    Ring,
    Sampler,
    SeriesBook,
    rebuilt,
)

BASE = 1_800_000_000  # a Unix second


def _values(v: float) -> list[float]:
    return [v + i for i in range(len(FIELDS))]


@given(
    capacity=st.integers(1, 50),
    steps=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 1000)), max_size=60),
)
def test_a_ring_holds_exactly_the_last_capacity_periods_written(
    capacity: int, steps: list[tuple[int, int]]
) -> None:
    ring = Ring(capacity)
    model: dict[int, list[float]] = {}
    t = BASE
    for advance, value in steps:
        t += advance
        ring.put(t, _values(value))
        model[t] = _values(value)
    columns = ring.columns(t)
    for i, period in enumerate(range(t - capacity + 1, t + 1)):
        expected = model.get(period)
        got = [column[i] for column in columns]
        assert (expected if expected is not None else [None] * len(FIELDS)) == got
        assert expected == ring.get(period)


def _figures(active: int, activations: int, **more: int) -> Figures:
    base = dict.fromkeys(Figures._fields, 0)
    base.update(held=active, size=10, activations=activations, **more)
    base["write_lag"] = 0.0
    return Figures(**base)  # type: ignore[arg-type]


def test_counters_become_events_a_second_and_a_late_sample_spreads_its_growth() -> None:
    series = PoolSeries()
    series.sample(BASE, _figures(1, 100))
    series.sample(BASE + 1, _figures(3, 110, evictions=2))
    series.sample(BASE + 4, _figures(3, 140, evictions=2))  # late: 3 seconds of growth
    window = series.window("hour", BASE + 4)
    grants = window.values["grants"][-5:]
    assert [0.0, 10.0, 10.0, 10.0, 10.0] == grants
    assert 2.0 == window.values["evictions"][-4]
    assert [1.0, 3.0, 3.0, 3.0, 3.0] == window.values["held"][-5:]
    assert window.start == BASE + 4 - HOUR + 1


def test_a_minute_is_the_mean_of_its_seconds_the_current_one_included() -> None:
    series = PoolSeries()
    start = (BASE // 60) * 60
    for s in range(60):
        series.sample(start + s, _figures(s % 2 * 4, 0))
    series.sample(start + 60, _figures(8, 0))
    window = series.window("day", start + 60)
    assert 60 == window.step
    assert [2.0, 8.0] == window.values["held"][-2:]
    assert len(window.values["held"]) == DAY


def test_the_wait_is_the_mean_wait_of_the_grants_made_to_queued_callers() -> None:
    series = PoolSeries()
    series.sample(BASE, _figures(1, 0))
    series.sample(BASE + 1, _figures(1, 2, wait_grants=2, waited_us=3_000_000))
    assert 1.5 == series.window("hour", BASE + 1).values["wait"][-1]


def test_a_backfill_never_overwrites_a_sample() -> None:
    series = PoolSeries()
    series.sample(BASE, _figures(7, 0))
    filled = series.backfill(1, [(BASE - 1, _values(1)), (BASE, _values(2))])
    assert 1 == filled
    assert [1.0, 7.0] == series.window("hour", BASE).values["held"][-2:]


def test_tokens_held_are_walked_back_from_now_through_the_timeline() -> None:
    # period: grants, expired, evicted, released, cleared
    timeline = {10: [3, 0, 0, 0, 0], 12: [1, 1, 0, 1, 0]}
    rows = rebuilt(timeline, 0, 13, 1, held=2, size=5)
    held = {t: v[0] for t, v in rows}
    assert {10: 3, 11: 3, 12: 2, 13: 2} == held
    assert math.isnan(rows[0][1][FIELDS.index("refusals")])


def test_only_the_first_pools_have_series_the_others_are_not_kept() -> None:
    book = SeriesBook(limit=2)
    assert ["a", "b"] == book.keep(["a", "b", "c"])
    with pytest.raises(NotKeptError, match="first 2 pools"):
        book.of("c")
    assert [] == book.keep(["b", "a"])
    book.keep(["b"])
    assert ["b"] == book.names()


async def test_the_sampler_samples_every_pool_once_a_second(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with tokenpool.open_pools(None, declared={}) as pools:
        await pools.create("a", tokenpool.PoolSettings(size=2, ttl=30, when_full="wait"))
        await pools.create("b", tokenpool.PoolSettings(size=1, ttl=30))
        book = SeriesBook()
        sampler = Sampler(book, lambda: pools, wall=lambda: BASE + trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler.run)
            await trio.sleep(1.5)
            a = pools.get("a")
            await a.activate("u1")
            await a.activate("u2")

            async def waiter() -> None:
                await a.activate("u3", wait=10)

            nursery.start_soon(waiter)
            await trio.sleep(2)
            lease = await a.lease_of("u1")
            assert lease is not None
            await a.release(lease.token_id)
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
        now = sampler.now()
        values = book.of("a").window("hour", now).values
        seen = [v for v in values["held"] if v is not None]
        assert [0.0, 2.0, 2.0, 2.0, 2.0] == seen[:5]
        assert 3.0 == sum(v for v in values["grants"] if v is not None)  # u3 waited
        assert 1.0 == max(v for v in values["waiters"] if v is not None)
        assert 1.0 == sum(v for v in values["releases"] if v is not None)
        waits = [v for v in values["wait"] if v]
        assert 1 == len(waits) and 1.9 < waits[0] < 2.1
        assert ["a", "b"] == book.names()


def test_the_series_over_http() -> None:
    import time

    import httpx

    from tests.test_http import error_of, serving

    with (
        serving("--dsn", "memory", "--size", "4") as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as api,
    ):
        api.post("/api/tokens/activate", json={"user_id": "ann"})
        deadline = time.monotonic() + 10
        while True:
            hour = api.get("/api/series").json()["data"]
            if 1.0 in hour["values"]["held"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (1, HOUR) == (hour["step"], len(hour["values"]["held"]))
        assert set(FIELDS) == set(hour["values"])
        assert 1.0 in hour["values"]["held"]
        assert 4.0 == hour["values"]["size"][-1]
        day = api.get("/api/pools/default/series", params={"window": "day"}).json()["data"]
        assert (60, DAY) == (day["step"], len(day["values"]["held"]))
        assert day["start"] % 60 == 0
        assert (422, "INVALID") == error_of(api.get("/api/series?window=week"))
        assert (404, "UNKNOWN") == error_of(api.get("/api/pools/nope/series"))
