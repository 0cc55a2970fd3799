"""Passwords over both transports: the right password never counts as a failure, each
wrong one counts once, under the transport it came on (issue 19's lockout)."""

from __future__ import annotations

import re

import httpx
import redis

from tests.test_http import serving


def _failures(metrics: str, transport: str) -> float:
    found = re.search(
        r'^tokenpool_auth_failures_total\{transport="' + transport + r'"\} ([0-9.e+]+)$',
        metrics,
        re.M,
    )
    return float(found.group(1)) if found else 0.0


def test_a_right_user_password_is_never_tried_as_the_admin_one() -> None:
    env = {"TOKENPOOL_PASSWORD": "user-pw", "TOKENPOOL_ADMIN_PASSWORD": "admin-pw"}
    with serving("--dsn", "memory", "--size", "5", env=env) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        user = {"authorization": "Bearer user-pw"}
        with httpx.Client(base_url=base, timeout=10) as client:
            for i in range(60):  # past the address's budget of 20 failures, were they any
                got = client.post("/api/tokens/activate", json={"user_id": f"u{i}"}, headers=user)
                assert 200 == got.status_code, got.text
            assert 403 == client.post("/api/tokens/clear", json={}, headers=user).status_code
            admin = {"authorization": "Bearer admin-pw"}
            assert 200 == client.post("/api/tokens/clear", json={}, headers=admin).status_code
            r = redis.Redis(port=server.port, password="user-pw", decode_responses=True)
            assert r.ping()  # RESP AUTH from the same address still works
            r.close()
            wrong = client.get("/api/tokens", headers={"authorization": "Bearer nope"})
            assert 401 == wrong.status_code
            metrics = client.get("/metrics").text
            assert 1.0 == _failures(metrics, "http")  # one wrong attempt, counted once
            assert 0.0 == _failures(metrics, "resp")


def test_an_admin_password_alone_lets_anyone_lease_over_http_as_over_resp() -> None:
    env = {"TOKENPOOL_ADMIN_PASSWORD": "admin-pw"}
    with serving("--dsn", "memory", "--size", "5", env=env) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            assert 200 == client.post("/api/tokens/activate", json={"user_id": "a"}).status_code
            assert 403 == client.post("/api/tokens/clear", json={}).status_code
            admin = {"authorization": "Bearer admin-pw"}
            assert 200 == client.post("/api/tokens/clear", json={}, headers=admin).status_code
        r = redis.Redis(port=server.port, decode_responses=True)
        assert "a" in str(r.execute_command("ACTIVATE", "a"))
        r.close()
