"""Pauses of the event loop: the histogram's arithmetic, the hooks that feed it, and
what a running server shows in ``INFO pauses`` and ``/metrics``."""

from __future__ import annotations

import gc
import time

import httpx
import redis
import trio
from hypothesis import given
from hypothesis import strategies as st

from tokenpool._pauses import CAUSES, PAUSE_BOUNDS, Pauses, info_fields

from .test_http import metric, serving


@given(st.lists(st.tuples(st.sampled_from(CAUSES), st.floats(0, 5))))
def test_each_pause_lands_in_the_first_bucket_that_holds_it(
    pauses_seen: list[tuple[str, float]],
) -> None:
    pauses = Pauses()
    for cause, seconds in pauses_seen:
        pauses.observe(cause, seconds)
    for series in pauses.snapshot():
        mine = [s for c, s in pauses_seen if c == series.cause]
        assert len(mine) == series.count
        for bound, count in zip(PAUSE_BOUNDS, series.cumulative, strict=False):
            assert count == sum(1 for s in mine if s <= bound)
        assert series.longest == max(mine, default=0.0)
        assert abs(series.total - sum(mine)) < 1e-6


def test_collections_are_timed_only_while_watched() -> None:
    pauses = Pauses()
    with pauses.watching_gc():
        gc.collect()
        gc.collect()
    gc.collect()
    (series,) = [s for s in pauses.snapshot() if s.cause == "gc"]
    assert 2 == series.count and series.longest > 0


async def test_the_heartbeat_sees_a_task_that_holds_the_loop() -> None:
    pauses = Pauses()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pauses.heartbeat, 0.005)
        await trio.sleep(0.05)
        time.sleep(0.06)  # noqa: ASYNC251 (holds the loop on purpose: the heartbeat is late)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    (series,) = [s for s in pauses.snapshot() if s.cause == "loop"]
    assert series.longest >= 0.05
    assert series.count >= 5


def test_info_fields_name_every_cause_and_bucket() -> None:
    pauses = Pauses()
    pauses.observe("actor", 0.003)
    fields = info_fields(pauses.snapshot())
    assert 1 == fields["actor_pauses"] and "3.000" == fields["actor_pause_max_ms"]
    assert str(fields["actor_pause_histogram_ms"]).startswith("le0.5=0,le1=0,le2=0,le5=1,")
    assert 0 == fields["gc_pauses"]


def test_a_server_shows_its_pauses_in_info_and_metrics() -> None:
    with (
        serving("--dsn", "memory", "--size", "5") as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as client,
    ):
        for user in range(20):
            reply = client.post("/api/tokens/activate", json={"user_id": f"u{user}"})
            assert 200 == reply.status_code
        time.sleep(0.2)  # twenty heartbeats
        text = client.get("/metrics").text
        assert metric(text, "tokenpool_pause_seconds_count", cause="actor") >= 20
        assert metric(text, "tokenpool_pause_seconds_count", cause="loop") >= 10
        gcs = metric(text, "tokenpool_pause_seconds_count", cause="gc")
        info = redis.Redis(port=server.port).info("pauses")
        assert info["actor_pauses"] >= 20 and info["loop_pauses"] >= 10
        assert info["gc_pauses"] >= gcs
        assert set(info) == set(info_fields(Pauses().snapshot()))
