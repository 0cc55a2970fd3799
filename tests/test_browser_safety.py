"""A local HTTP port is within every web page's reach: cross-site writes, foreign Host
headers (DNS rebinding) and framing are refused. Checked with a plain client and with a
real browser (Debian's chromium, driven by Playwright) on pages of another origin."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.chaos.server import free_port
from tests.test_dashboard import CHROMIUM, _browser_or_skip
from tests.test_http import api, error_of, serving


def _held(client: httpx.Client) -> int:
    return sum(t["status"] == "active" for t in client.get("/api/tokens").json()["data"])


def test_cross_site_writes_are_refused_and_change_nothing() -> None:
    with api("--size", "3") as client:
        for user in "abc":
            client.post("/api/tokens/activate", json={"user_id": user})
        attacks = [
            {"content-type": "text/plain"},  # a simple request: no preflight
            {"content-type": "application/x-www-form-urlencoded"},  # an auto-submitted form
            {"content-type": "application/json", "origin": "http://evil.example"},
            {"content-type": "application/json", "sec-fetch-site": "cross-site"},
            {"content-type": "application/json", "origin": "null"},  # a sandboxed iframe
            {"origin": "http://evil.example"},  # a no-cors fetch without a body
        ]
        for headers in attacks:
            refused = client.post("/api/tokens/clear", headers=headers, content=b"{}")
            assert refused.status_code in (403, 415), headers
            assert error_of(refused)[1] in ("CROSSSITE", "NOTJSON")
        assert 3 == _held(client)
        same = client.post(
            "/api/tokens/clear",
            json={},
            headers={"origin": str(client.base_url).rstrip("/"), "sec-fetch-site": "same-origin"},
        )
        assert 200 == same.status_code and 0 == _held(client)


def test_a_foreign_host_header_is_refused_and_allowed_hosts_widen_it() -> None:
    with api("--size", "2") as client:
        rebound = client.get("/api/tokens", headers={"host": "attacker.example:4000"})
        assert (421, "BADHOST") == error_of(rebound)
        for name in ("localhost", "127.0.0.1", "[::1]"):
            assert 200 == client.get("/api/tokens", headers={"host": f"{name}:1"}).status_code
        page = client.get("/")
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    with api("--size", "2", "--http-allowed-hosts", "tokens.internal") as client:
        assert 200 == client.get("/healthz", headers={"host": "tokens.internal"}).status_code
        assert 421 == client.get("/healthz", headers={"host": "localhost"}).status_code
    with api("--size", "2", "--http-allowed-hosts", "*") as client:
        assert 200 == client.get("/healthz", headers={"host": "anything.example"}).status_code


@contextmanager
def _attacker_site(html: str) -> Iterator[int]:
    """A page served from another origin (another port of this machine)."""
    body = html.encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def test_a_real_browser_on_another_origin_or_a_rebinding_name_changes_nothing() -> None:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with serving("--dsn", "memory", "--size", "3") as server:
        target = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=target, timeout=10) as client:
            for user in "abc":
                client.post("/api/tokens/activate", json={"user_id": user})
            form = f"""<form id=f method=POST action="{target}/api/tokens/clear"
                enctype="text/plain"><input name='{{"a":"' value='"}}'></form>
                <script>
                  fetch("{target}/api/tokens/clear", {{method: "POST", mode: "no-cors",
                    headers: {{"content-type": "text/plain"}}, body: "{{}}"}});
                  document.getElementById("f").submit();
                </script>"""
            with _attacker_site(form) as attacker_port, sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM,
                    args=[
                        "--no-sandbox",
                        "--host-resolver-rules=MAP rebind.test 127.0.0.1,"
                        f"MAP evil.test 127.0.0.1:{attacker_port}",
                    ],
                )
                page = browser.new_page()
                page.goto(f"http://evil.test:{attacker_port}/")
                page.wait_for_load_state("load")
                page.wait_for_timeout(1_000)
                assert 3 == _held(client)  # the form and the fetch changed nothing
                # DNS rebinding: a page at a name that now resolves to the server reads and
                # posts "same-origin"; the server refuses the foreign Host.
                page.goto(f"http://rebind.test:{server.http_port}/healthz")
                status = page.evaluate(
                    """async () => {
                        const read = await fetch("/api/tokens");
                        const clear = await fetch("/api/tokens/clear", {method: "POST",
                            headers: {"content-type": "application/json"}, body: "{}"});
                        return [read.status, clear.status];
                    }"""
                )
                assert [421, 421] == status
                assert 3 == _held(client)
                # framing: the dashboard refuses to be drawn inside another site's page
                frame = page.goto(f"{target}/")
                assert frame is not None and frame.headers["x-frame-options"] == "DENY"
                browser.close()


@pytest.mark.parametrize("path", ["/api/tokens/clear", "/api/pools/default"])
def test_a_change_takes_a_json_body_or_none_at_all(path: str) -> None:
    with api("--size", "1") as client:
        method = "POST" if path.endswith("clear") else "DELETE"
        for kind in ("text/plain", "multipart/form-data; boundary=x", ""):
            refused = client.request(method, path, content=b"{}", headers={"content-type": kind})
            assert (415, "NOTJSON") == error_of(refused), kind
        assert 200 == client.request(method, path).status_code  # a program's: curl -X POST
