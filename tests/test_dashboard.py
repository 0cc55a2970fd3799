"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright),
and the live API against its own OpenAPI document (schemathesis)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_http import serving

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _browser_or_skip() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is needed for the dashboard test (make test installs it)")
        pytest.skip("no chromium (apt-get install chromium; make test does)")


def test_an_activation_shows_on_the_dashboard_within_a_second() -> None:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with serving("--dsn", "memory", "--size", "100", "--ttl", "300") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        api = httpx.Client(base_url=base, timeout=10)
        for i in range(12):  # something on the page before it opens
            api.post("/api/tokens/activate", json={"user_id": f"user-{i}"})
        ended = api.get("/api/users/user-3/lease").json()["data"]["token_id"]
        api.post(f"/api/tokens/{ended}/release")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base + "/")
            page.wait_for_selector(".tok.held", timeout=10_000)
            assert 11 == page.locator(".tok.held, .tok.soon").count()
            page.wait_for_selector('.recent li:has-text("user-3")', timeout=10_000)
            lease = api.post("/api/tokens/activate", json={"user_id": "newcomer"}).json()["data"]
            started = time.monotonic()
            page.wait_for_selector(
                f'[data-token="{lease["token_id"]}"][data-user="newcomer"]', timeout=1_000
            )
            assert time.monotonic() - started < 1.0
            released = api.post(f"/api/tokens/{lease['token_id']}/release").json()["data"]
            page.wait_for_selector(f'.recent li[data-lease="{released["id"]}"]', timeout=1_000)
            # 12 granted, user-3's and newcomer's released: the header counts the grid
            page.wait_for_function(
                "document.querySelector('[data-held]')?.textContent === '11'", timeout=5_000
            )
            docs = ROOT / "docs"
            docs.mkdir(exist_ok=True)
            page.screenshot(path=str(docs / "dashboard.png"), full_page=True)
            browser.close()
        api.close()


def test_many_pools_stay_live_and_a_grid_follows_its_pool() -> None:
    """A browser opens at most 6 connections to a host over HTTP/1.1, and each pool
    followed live holds an event stream: the dashboard follows 3 pools live and shows
    the others' figures, so with 8 pools the page still updates, a pool created later
    appears, and a pool is followed at a click. A dropped pool's stream ends; a grid is
    rebuilt when its pool is resized, or dropped and created again under its name."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    live = "document.querySelectorAll('section.pool[data-live=yes]').length"
    with serving("--dsn", "memory", "--size", "4", "--http-workers", "1") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=10) as api:
            for i in range(1, 8):
                api.post("/api/pools", json={"name": f"p{i}", "size": 3, "ttl": 300})
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(base + "/")
                page.wait_for_function(
                    "document.querySelectorAll('section.pool').length === 8", timeout=10_000
                )
                page.wait_for_function(f"{live} === 3", timeout=10_000)
                # The page keeps polling: a pool created now appears.
                api.post("/api/pools", json={"name": "late", "size": 2, "ttl": 300})
                page.wait_for_selector('section.pool[data-pool="late"]', timeout=10_000)
                # A pool shown by its figures only, followed at a click, shows a grant live.
                idle = page.locator('section.pool[data-live="no"][data-pool="p6"]')
                idle.locator("button.follow").click()
                p6 = 'section.pool[data-pool="p6"]'
                page.wait_for_selector(f'{p6}[data-live="yes"] .tok', timeout=10_000)
                assert 3 == page.evaluate(live)
                lease = api.post("/api/pools/p6/tokens/activate", json={"user_id": "zed"}).json()
                page.wait_for_selector(
                    f'{p6} [data-token="{lease["data"]["token_id"]}"][data-user="zed"]',
                    timeout=5_000,
                )
                # Resized: the grid is rebuilt to the new size.
                api.patch("/api/pools/p6", json={"size": 5})
                page.wait_for_function(
                    f"document.querySelectorAll('{p6} .tok').length === 5", timeout=10_000
                )
                # Dropped and created again at once (the name never leaves the listing):
                # the new pool's tokens replace the old ones.
                api.delete("/api/pools/p6")
                api.post("/api/pools", json={"name": "p6", "size": 2, "ttl": 300})
                fresh = api.post("/api/pools/p6/tokens/activate", json={"user_id": "amy"}).json()
                page.wait_for_selector(
                    f'{p6} [data-token="{fresh["data"]["token_id"]}"][data-user="amy"]',
                    timeout=10_000,
                )
                assert 2 == page.locator(f"{p6} .tok").count()
                # A followed pool dropped: its section goes, another pool takes its place.
                api.delete("/api/pools/p6")
                page.wait_for_selector(p6, state="detached", timeout=10_000)
                page.wait_for_function(f"{live} === 3", timeout=10_000)
                status = page.locator("#status").inner_text()
                page.wait_for_function(
                    f"document.getElementById('status').textContent !== {status!r}",
                    timeout=10_000,
                )
                browser.close()


def test_the_dashboard_draws_a_pool_of_ten_thousand() -> None:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with serving("--dsn", "memory", "--size", "10000") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=10) as api:
            for i in range(50):
                api.post("/api/tokens/activate", json={"user_id": f"u{i}"})
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page()
                started = time.monotonic()
                page.goto(base + "/")
                page.wait_for_selector("canvas.cells", timeout=10_000)
                page.wait_for_function(
                    "document.querySelector('[data-held]')?.textContent === '50'",
                    timeout=10_000,
                )
                assert time.monotonic() - started < 10
                api.post("/api/tokens/activate", json={"user_id": "late"})
                page.wait_for_function(
                    "document.querySelector('[data-held]')?.textContent === '51'",
                    timeout=5_000,
                )
                browser.close()


def test_schemathesis_finds_no_server_error_and_no_response_outside_the_schema() -> None:
    if shutil.which("schemathesis") is None and not (ROOT / ".venv/bin/schemathesis").exists():
        pytest.skip("schemathesis is not installed (the dev extra has it)")
    exe = shutil.which("schemathesis") or str(ROOT / ".venv/bin/schemathesis")
    with serving("--dsn", "memory", "--size", "5", "--requirepass", "st-Pw-1") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        out = subprocess.run(
            [
                exe,
                "run",
                f"{base}/openapi.json",
                "--url",
                base,
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance,response_headers_conformance",
                "--max-examples",
                "25",
                "--header",
                "Authorization: Bearer st-Pw-1",
                "--exclude-path",
                "/api/events",
                "--exclude-path",
                "/api/pools/{pool}/events",
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env={
                **os.environ,
                "NO_COLOR": "1",
                "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
                "PYTHONPATH": str(ROOT),
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            },
        )
        assert 0 == out.returncode, out.stdout[-6000:] + out.stderr[-2000:]


def _an_hour_of_history(path: Path, size: int) -> tuple[int, list[str]]:
    """The SQLite store of pool ``default`` (``size`` tokens) with an hour of ended leases
    written straight into its history, as a busy hour leaves it: each second a few leases
    start (more at the top of a wave), each held 5 to 24 s, ending expired, evicted or
    released. Returns how many, and the users."""
    import sqlite3
    import uuid

    import trio

    import tokenpool

    async def create() -> None:
        async with tokenpool.open_pool(size=size, ttl=60, store=f"sqlite:///{path}"):
            pass

    trio.run(create)
    now = int(time.time())
    conn = sqlite3.connect(path)
    (pool_id, revision) = conn.execute("SELECT id, revision FROM pools").fetchone()
    tokens = [r[0] for r in conn.execute("SELECT no FROM tokens WHERE pool_id = ?", (pool_id,))]
    rows = []
    users = [f"user-{i:03d}" for i in range(60)]
    reasons = ("expired", "evicted", "released")
    n = 0
    for second in range(now - 3600, now - 30):
        wave = 1 + int(1.5 * (1 + math.sin((second % 1200) / 1200 * 2 * math.pi)))
        for k in range((second % 3 == 0) + wave - 1):
            hold = 5 + (second * 7 + k * 13) % 20
            revision += 1
            rows.append(
                (
                    pool_id,
                    revision,
                    str(uuid.uuid4()),
                    tokens[n % len(tokens)],
                    revision,
                    second * 1_000_000,
                    (second + hold) * 1_000_000,
                    reasons[(second + k) % 3],
                    users[(second * 3 + k) % len(users)],
                )
            )
            n += 1
    with conn:
        conn.executemany("INSERT INTO token_usage_history VALUES (?,?,?,?,?,?,?,?,?)", rows)
        conn.execute(
            "UPDATE pools SET revision = ?, clock_us = ?",
            (revision, max(r[6] for r in rows)),
        )
    conn.close()
    return len(rows), users


def _path_points(d: str) -> list[tuple[int, float]]:
    return [(int(x), float(y)) for x, y in re.findall(r"[ML](\d+) ([\d.]+)", d)]


def test_the_charts_draw_the_figures_the_series_api_returns(tmp_path: Path) -> None:
    """An hour of history in the store: the server rebuilds its series from it; the page's
    charts, read back from their SVG paths, hold the API's figures second by second; the
    usage panel counts the API's leases; a user found shows its history."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    leases, users = _an_hour_of_history(tmp_path / "hour.db", 50)
    with serving("--dsn", f"sqlite:///{tmp_path}/hour.db", "--size", "50") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        api = httpx.Client(base_url=base, timeout=10)
        for i in range(3):  # and a few live leases
            api.post("/api/tokens/activate", json={"user_id": f"live-{i}"})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(base + "/")
            # the series are rebuilt from the store in the background: wait for the hour
            page.wait_for_function(
                "(document.querySelector('[data-chart=events] path[data-field=grants]')"
                "?.getAttribute('d') || '').split('L').length > 3000",
                timeout=20_000,
            )
            page.wait_for_selector("[data-usage=summary] [data-leases]", timeout=10_000)
            drawn = page.evaluate(
                """() => Object.fromEntries([...document.querySelectorAll('.chart svg')].map(
                    (svg) => [svg.parentElement.dataset.chart, {
                        max: Number(svg.dataset.max), start: Number(svg.dataset.start),
                        paths: Object.fromEntries([...svg.querySelectorAll('path')].map(
                            (p) => [p.dataset.field, p.getAttribute('d')]))}]))"""
            )
            served = api.get("/api/series").json()["data"]
            compared = 0
            for chart in drawn.values():
                offset = chart["start"] - served["start"]
                for field, d in chart["paths"].items():
                    for x, y in _path_points(d):
                        if x + offset < 0:
                            continue  # out of the API's window by the time it was asked
                        expected = served["values"][field][x + offset]
                        shown = (100 - y) / 100 * chart["max"]
                        assert expected is not None
                        assert abs(expected - shown) <= chart["max"] * 1e-4 + 1e-3, (field, x)
                        compared += 1
            assert compared > 3 * 3000
            grants = [v for v in served["values"]["grants"] if v]
            # the history (less its first seconds, out of the window by now) and the live ones
            assert leases * 0.97 <= sum(grants) <= leases + 3
            summary = api.get("/api/analytics/summary").json()["data"]["rows"][0]
            shown_leases = page.inner_text("[data-usage=summary] [data-leases]")
            assert f"{summary['leases']:,}" == shown_leases
            page.fill("#find input", users[5])
            page.press("#find input", "Enter")
            page.wait_for_selector(".found tr[data-lease]", timeout=10_000)
            assert 20 == page.locator(".found tr[data-lease]").count()  # a page of 20
            page.click(".found [data-more]")
            page.wait_for_function(
                "document.querySelectorAll('.found tr[data-lease]').length > 20", timeout=10_000
            )
            page.fill("#find input", "")
            page.press("#find input", "Enter")
            docs = ROOT / "docs"
            page.screenshot(path=str(docs / "dashboard-charts.png"), full_page=True)
            browser.close()
        api.close()
