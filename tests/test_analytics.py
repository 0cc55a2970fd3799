"""Usage analytics (``_store/analytics.py``, the ``Report`` request, ``/api/.../analytics``)
on real PostgreSQL and SQLite stores, over a history made by a real pool on MockClock."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio

import tokenpool
from tests.test_http import error_of, serving
from tokenpool._commands.analytics import Report
from tokenpool._errors import InvalidArgumentError
from tokenpool._model import to_us
from tokenpool._store.analytics import open_analyst, summarize

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
T0 = to_us(START)


async def _history(url: str) -> None:
    """Pool ``p`` of 2 tokens, ttl 0.2 s. At 09:00 alice releases at once, bob expires
    (held 0.2 s), carol and dave are held when the server stops; it starts again an
    hour later: both expired meanwhile; erin and frank take the tokens, and erin2
    evicts erin."""
    async with tokenpool.open_pool(
        size=2, ttl=0.2, store=url, clock=tokenpool.Clock(START), name="p"
    ) as pool:
        lease = await pool.activate("alice")
        await pool.release(lease.token_id)
        await pool.activate("bob")
        await trio.sleep(0.3)
        await pool.activate("carol")
        await pool.activate("dave")
    later = tokenpool.Clock(START + timedelta(hours=1))
    async with tokenpool.open_pool(size=2, ttl=60, store=url, clock=later, name="p") as pool:
        await pool.activate("erin")
        await pool.activate("frank")
        await pool.activate("erin2")
        await pool.flush()


async def test_the_reports_count_what_the_history_holds(store_url: str) -> None:
    await _history(store_url)
    analyst = open_analyst(store_url)
    try:
        span = (T0, T0 + 3 * 3_600_000_000)
        table = analyst.report("p", "summary", "leases", *span, 10, 0)
        row = dict(zip(table.columns, table.rows[0], strict=True))
        assert 5 == row["leases"]
        assert {"released": 1, "expired": 3, "evicted": 1, "cleared": 0} == {
            r: row[r] for r in ("released", "expired", "evicted", "cleared")
        }
        assert 0.2 == pytest.approx(row["hold_max_s"])
        assert 0.2 == pytest.approx(row["hold_p90_s"], rel=0.04)
        assert 0.6 == row["expired_share"]
        users = analyst.report("p", "users", "leases", *span, 2, 0)
        assert ("user_id", "leases") == users.columns[:2]
        assert 2 == len(users.rows) and 2 == users.next_cursor
        rest = analyst.report("p", "users", "leases", *span, 10, 2)
        assert 5 == len(users.rows) + len(rest.rows) and rest.next_cursor is None
        evicted = analyst.report("p", "users", "evicted", *span, 1, 0)
        assert "erin" == evicted.rows[0][0]
        tokens = analyst.report("p", "tokens", "leases", *span, 10, 0)
        assert 2 == len(tokens.rows) and 5 == sum(r[1] for r in tokens.rows)
        assert all(len(r[0]) == 36 for r in tokens.rows)  # token ids as UUID text
        hours = analyst.report("p", "hours", "time", *span, 10, 0)
        assert [("2026-01-05T09:00:00.000000Z", 4), ("2026-01-05T10:00:00.000000Z", 1)] == [
            (r[0], r[1]) for r in hours.rows
        ]
        busiest = analyst.report("p", "hours", "leases", *span, 1, 0)
        assert "2026-01-05T09:00:00.000000Z" == busiest.rows[0][0]
        nothing = analyst.report("p", "summary", "leases", T0 - 10**9, T0, 10, 0)
        assert 0 == nothing.rows[0][0]
        assert [] == analyst.report("nope", "users", "leases", *span, 10, 0).rows
    finally:
        analyst.close()


async def test_the_timeline_counts_grants_and_ends_per_period(store_url: str) -> None:
    await _history(store_url)
    analyst = open_analyst(store_url)
    try:
        timeline = analyst.timeline("p", T0, T0 + 2 * 3_600_000_000, 60)
    finally:
        analyst.close()
    first = T0 // 60_000_000
    # grants, expired, evicted, released, cleared
    assert [4, 3, 0, 1, 0] == timeline[first]
    assert [3, 0, 1, 0, 0] == timeline[first + 60]  # frank and erin2 still hold theirs


def test_a_report_checks_its_arguments_where_it_is_made() -> None:
    with pytest.raises(InvalidArgumentError, match="summary, users, tokens, hours"):
        Report("p", "people")
    with pytest.raises(InvalidArgumentError, match="leases, hold, evicted"):
        Report("p", "users", sort="time")
    with pytest.raises(InvalidArgumentError, match="since must be before until"):
        Report("p", "users", since=10, until=10)
    with pytest.raises(InvalidArgumentError, match="limit"):
        Report("p", "users", limit=0)
    assert "leases" == Report("p", "users").sort
    # The last microsecond of 9999 is a time a range may name; the next one is not.
    last = to_us(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    assert last == Report("p", "users", since=0, until=last).until
    with pytest.raises(InvalidArgumentError, match="9999-12-31"):
        Report("p", "users", since=0, until=last + 1)


def test_resp_names_each_number_of_a_report_with_its_own_range() -> None:
    """TP.REPORT's LIMIT and CURSOR are refused with the range each takes (the same as
    HTTP's), not one range for both."""
    from tokenpool._commands.analytics import MAX_OFFSET
    from tokenpool._server.argv import build
    from tokenpool._store.analytics import LIMIT_MAX

    def report(*args: str) -> Report:
        request = build("TP.REPORT", ["TP.REPORT", "p", "users", *args], "default")
        assert isinstance(request, Report)
        return request

    for bad in ("-1", "0", str(LIMIT_MAX + 1), "x", "9" * 30):
        with pytest.raises(InvalidArgumentError, match=f"LIMIT must be .* from 1 to {LIMIT_MAX:,}"):
            report("LIMIT", bad)
    for bad in ("-1", str(MAX_OFFSET + 1), "9" * 30):
        with pytest.raises(InvalidArgumentError, match=f"CURSOR .* from 0 to {MAX_OFFSET:,}"):
            report("CURSOR", bad)
    assert (LIMIT_MAX, MAX_OFFSET) == (
        report("LIMIT", str(LIMIT_MAX)).limit,
        report("CURSOR", str(MAX_OFFSET)).cursor,
    )


def test_an_empty_summary_says_zero_leases_and_no_percentiles() -> None:
    (row,) = summarize([]).rows
    assert (0, None, None) == row[:3]


def test_analytics_over_http_as_json_and_csv(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    with serving("--dsn", url, "--size", "2") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=10) as api:
            for user in ("=cmd", "bob", "carol"):
                api.post("/api/tokens/activate", json={"user_id": user})
            api.post("/api/tokens/clear")
            deadline = time.monotonic() + 20  # the store is written behind: wait for the 3
            while time.monotonic() < deadline:
                summary = api.get("/api/analytics/summary").json()["data"]["rows"][0]
                if summary["leases"] == 3:
                    break
                time.sleep(0.05)
            body = api.get("/api/analytics/users", params={"limit": 2}).json()["data"]
            assert 2 == len(body["rows"]) and 2 == body["next_cursor"]
            assert {"user_id", "leases", "evicted"} <= set(body["columns"])
            since = "2000-01-01T00:00:00Z"
            text = api.get(
                "/api/pools/default/analytics/users", params={"format": "csv", "since": since}
            ).text
            rows = list(csv.reader(io.StringIO(text)))
            assert "user_id" == rows[0][0]
            assert {"'=cmd", "bob", "carol"} == {r[0] for r in rows[1:]}
            summary = api.get("/api/analytics/summary").json()["data"]["rows"][0]
            assert 3 == summary["leases"] and 1 == summary["evicted"]
            assert (422, "INVALID") == error_of(api.get("/api/analytics/people"))
            assert (422, "INVALID") == error_of(api.get("/api/analytics/users?since=yesterday"))
            assert (404, "UNKNOWN") == error_of(api.get("/api/pools/nope/analytics/users"))


def test_a_memory_only_server_says_it_keeps_no_history() -> None:
    with (
        serving("--dsn", "memory") as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as api,
    ):
        status, code = error_of(api.get("/api/analytics/summary"))
        assert (404, "NOTKEPT") == (status, code)
        assert "keeps no history" in api.get("/api/analytics/users").json()["error"]["message"]


def _all_reports(analyst: Any) -> list[Any]:
    day = 86_400_000_000
    ranges = [
        (T0, T0 + 3 * 3_600_000_000),  # whole hours
        (T0 + 100_000, T0 + 3_600_000_000 + 5),  # edges of hours only
        (T0 - 2 * day, T0 + 2 * day),  # whole days
        (T0 - day // 2, T0 + day + 7),  # a whole day between two partial ones
    ]
    out = []
    for since, until in ranges:
        for kind, sort in (("summary", "leases"), ("users", "evicted"), ("tokens", "hold")):
            out.append(analyst.report("p", kind, sort, since, until, 10, 0))
        out.append(analyst.report("p", "hours", "time", since, until, 10, 0))
    return out


async def test_the_summary_tables_change_no_report(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reports are the same read from the history alone, from the summary tables, and
    from both (rolled up part of the way, a few rows at a time)."""
    from tokenpool._store import analytics

    await _history(store_url)
    analyst = open_analyst(store_url)
    try:
        raw = _all_reports(analyst)
        monkeypatch.setattr(analytics, "ROLL_CHUNK", 2)
        monkeypatch.setattr(analytics, "ROLL_CHUNK_SQLITE", 2)
        assert 5 == analyst.roll("p")
        assert 0 == analyst.roll("p")
        rolled = _all_reports(analyst)
        assert _same(raw, rolled)
        later = tokenpool.Clock(START + timedelta(hours=1, minutes=5))
        async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=later, name="p"):
            pass  # frank and erin2 expire meanwhile: history not rolled up yet
        mixed = _all_reports(analyst)
        assert 7 == mixed[0].rows[0][0]  # 5 rolled up, 2 not
        assert 2 == analyst.roll("p")
        assert _same(mixed, _all_reports(analyst))
    finally:
        analyst.close()


def _same(a: list[Any], b: list[Any]) -> bool:
    for x, y in zip(a, b, strict=True):
        assert x.columns == y.columns and x.next_cursor == y.next_cursor
        for r, s in zip(x.rows, y.rows, strict=True):
            assert (r[0], len(r)) == (s[0], len(s))
            assert list(r[1:]) == pytest.approx(list(s[1:]), rel=1e-6, abs=1e-5)  # rounded to 1e-6
    return True


@pytest.mark.parametrize("http_workers", ["0", "2"])
def test_reports_and_series_on_resp_and_through_http_workers(
    tmp_path: object, http_workers: str
) -> None:
    """TP.REPORT and TP.SERIES are requests of the command layer: RESP answers them as
    JSON, and an HTTP worker (another process, no pools of its own) reaches them through
    its backend, with the same figures as the server's own."""
    import json

    import redis

    url = f"sqlite:///{tmp_path}/w.db"
    with serving("--dsn", url, "--size", "2", "--http-workers", http_workers) as server:
        client = redis.Redis(port=server.port, decode_responses=True)
        for user in ("ann", "ben", "cat"):
            client.execute_command("TP.ACTIVATE", "default", user)
        client.execute_command("TP.CLEAR", "default")
        # Reports read the store, written behind: ask until the three ended leases are in.
        deadline = time.monotonic() + 20
        while True:
            summary = json.loads(
                client.execute_command("TP.REPORT", "default", "summary", "SINCE", "0")
            )
            row = summary["rows"][0]  # an object per row, as the HTTP report's
            if row["leases"] == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert 3 == row["leases"] and 1 == row["evicted"] and 2 == row["cleared"]
        users = json.loads(
            client.execute_command("TP.REPORT", "default", "USERS", "SINCE", "0", "LIMIT", "2")
        )
        assert 2 == len(users["rows"]) and 2 == users["next_cursor"]
        for bad in (
            ["people"],
            ["users", "SINCE", "yesterday"],
            ["users", "LIMIT", "-1"],
            *(["summary", "SINCE", t] for t in ("1_000", "\u0663", "+5", "1e9", "nan", "-5")),
            ["summary", "UNTIL", "999999999999"],
            ["summary", "CURSOR", "9" * 30],
        ):
            with pytest.raises(redis.ResponseError, match=r"INVALID|must be|syntax"):
                client.execute_command("TP.REPORT", "default", *bad)
        series = json.loads(client.execute_command("TP.SERIES", "default"))
        assert 1 == series["step"] and "held" in json.dumps(series["values"])
        with pytest.raises(redis.ResponseError, match="hour or day"):
            client.execute_command("TP.SERIES", "default", "week")
        for name in ("TP.REPORT", "TP.SERIES"):  # a store query is never flagged fast
            reply = client.execute_command("COMMAND", "INFO", name)  # redis-py: by name
            flags = reply[name.lower()]["flags"]
            assert "fast" not in flags and "readonly" in flags, reply
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as api:
            body = api.get("/api/analytics/summary", params={"since": "0"}).json()["data"]
            assert row == body["rows"][0]
            for since in ("1_000", "\u0663", "+5", "1e9"):
                response = api.get("/api/analytics/summary", params={"since": since})
                assert (422, "INVALID") == error_of(response), since
                assert "Unix seconds" in response.json()["error"]["message"]
            response = api.get("/api/analytics/summary", params={"until": "0"})
            assert "since must be before until" == response.json()["error"]["message"]
            day = api.get("/api/series", params={"window": "day"}).json()["data"]
            assert 60 == day["step"] and set(series["values"]) == set(day["values"])
            assert (404, "UNKNOWN") == error_of(api.get("/api/pools/nope/series"))
        client.close()


async def test_usage_reports_wait_their_turn_within_bounds(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The analyst has one connection: reports run one at a time. A report waits for
    its turn behind at most REPORTS_WAITING others and at most REPORT_WAIT seconds,
    refused at once past either bound, never queued without end."""
    import tokenpool._pool as pool_module
    from tokenpool._errors import UnavailableError

    monkeypatch.setattr(pool_module, "REPORT_WAIT", 0.5)
    async with tokenpool.open_pools(
        f"sqlite:///{tmp_path}/r.db", declared={"p": tokenpool.PoolSettings(size=2, ttl=60)}
    ) as pools:
        await pools.get("p").activate("ann")
        await pools.get("p").flush()
        outcomes: list[str] = []
        held = trio.Event()
        done = trio.Event()

        async def hold() -> None:  # the server's own roll-up, say: it has the turn
            async with pools.report_turn(bounded=False):
                held.set()
                await done.wait()

        async def report() -> None:
            try:
                async with pools.report_turn():
                    outcomes.append("ran")
            except UnavailableError as error:
                outcomes.append(str(error))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await held.wait()
            for _ in range(pool_module.REPORTS_WAITING):
                nursery.start_soon(report)
            while pools._reports_waiting < pool_module.REPORTS_WAITING:
                await trio.sleep(0.01)
            started = trio.current_time()
            await report()  # one too many: refused at once, without waiting
            assert trio.current_time() - started < 0.4
            assert 1 == len(outcomes) and "8 usage reports are waiting" in outcomes[0]
            while len(outcomes) < 1 + pool_module.REPORTS_WAITING:
                await trio.sleep(0.05)
            assert all("waited 0.5 s" in o for o in outcomes[1:]), outcomes
            assert 0 == pools._reports_waiting
            done.set()
        # The turn is free again: a report runs, and answers right.
        from tokenpool._commands import CommandSettings
        from tokenpool._commands.connection import Client

        client = Client("127.0.0.1:1", "resp", CommandSettings(password=None))
        table = await Report("p", "summary", since=0).run(pools, client)
        assert 1 == len(table.rows)


def test_a_slow_report_through_a_worker_holds_no_other_request(pg_url: str) -> None:
    """A worker's link answers a connection's requests in order: a report that runs for
    seconds takes a connection to itself, so /healthz, an activation and a read sent
    meanwhile through the same worker are answered at once, not after it (the report
    is held here by a lock on the history table, as a long report would hold it)."""
    import threading
    from urllib.parse import parse_qs, urlsplit

    import psycopg

    schema = parse_qs(urlsplit(pg_url).query)["schema"][0]
    dsn = pg_url.split("?")[0]
    table = f'"{schema}".token_usage_history'
    with serving("--dsn", pg_url, "--size", "4", "--http-workers", "1") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=10) as api:
            assert 200 == api.post("/api/tokens/activate", json={"user_id": "ann"}).status_code
        statuses: list[int] = []

        def report() -> None:
            with httpx.Client(base_url=base, timeout=60) as mine:
                response = mine.get("/api/analytics/summary", params={"since": "0"})
                statuses.append(response.status_code)

        with psycopg.connect(dsn) as lock, psycopg.connect(dsn, autocommit=True) as look:
            lock.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            reports = [threading.Thread(target=report) for _ in range(3)]
            for thread in reports:
                thread.start()
            deadline = time.monotonic() + 20
            waiting = (
                "SELECT count(*) FROM pg_locks WHERE NOT granted"
                f" AND relation = '{table}'::regclass"
            )
            while not look.execute(waiting).fetchone()[0]:  # type: ignore[index]
                # (until a report runs, blocked on the lock)
                assert time.monotonic() < deadline, "no report reached the store"
                time.sleep(0.05)
            time.sleep(0.2)  # and the other two are queued behind it
            with httpx.Client(base_url=base, timeout=5) as other:
                assert 200 == other.get("/healthz").status_code
                activated = other.post("/api/tokens/activate", json={"user_id": "ben"})
                assert 200 == activated.status_code
                assert 200 == other.get("/api/pools/default").status_code
                assert [] == statuses  # the reports are still held
            lock.rollback()  # the lock goes: the reports run, one after another
        for thread in reports:
            thread.join(60)
        assert [200, 200, 200] == statuses
