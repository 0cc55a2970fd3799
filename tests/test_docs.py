"""/docs and /redoc work on a machine with no network: their scripts and styles come
from the package, checked in a real browser that may not reach anything but the server."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from tests.test_dashboard import CHROMIUM, _browser_or_skip
from tests.test_http import serving


def test_the_docs_pages_render_with_no_network() -> None:
    _browser_or_skip()
    from playwright.sync_api import Route, sync_playwright

    with serving("--dsn", "memory", "--size", "2") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        assert 200 == httpx.get(base + "/static/swagger-ui-bundle.js", timeout=10).status_code
        outside: list[str] = []

        def only_the_server(route: Route) -> None:
            if urlsplit(route.request.url).hostname in ("127.0.0.1", None):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.route("**/*", only_the_server)
            page.goto(base + "/docs")
            page.wait_for_selector(".opblock", timeout=15_000)  # one block per operation
            assert page.locator(".opblock").count() > 10
            page.goto(base + "/redoc")
            page.wait_for_selector("text=activate", timeout=15_000)
            browser.close()
        # ReDoc's "powered by" logo is its only outside request: refused, the page works
        assert all(u.endswith("logo-mini.svg") for u in outside), outside
