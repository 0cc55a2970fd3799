"""The HTTP API through real HTTP clients (httpx, curl) against the real server process."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.chaos import server as chaos_server
from tests.chaos.cluster import Cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[chaos_server.Process]:
    port = free_port()
    with chaos_server.running("--http-port", str(port), *args, env=env) as server:
        assert port == server.http_port
        yield server


@contextmanager
def api(*args: str, env: dict[str, str] | None = None) -> Iterator[httpx.Client]:
    """A client for a fresh server (memory store unless ``args`` say otherwise)."""
    if "--dsn" not in args:
        args = ("--dsn", "memory", *args)
    with (
        serving(*args, env=env) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as client,
    ):
        yield client


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return response.status_code, body["error"]["code"]


# -- the seed's contract ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_seed_curl_examples_verbatim() -> None:
    with serving("--dsn", "memory", "--size", "3") as server:
        base = f"http://localhost:{server.http_port}"

        def curl(*args: str) -> Any:
            out = subprocess.run(
                ["curl", "-s", "-f", *args], capture_output=True, text=True, timeout=30
            )
            assert 0 == out.returncode, out.stderr
            return json.loads(out.stdout)

        activated = curl(
            "-X",
            "POST",
            f"{base}/api/tokens/activate",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"user_id": "123e4567-e89b-12d3-a456-426614174000"}',
        )["data"]
        assert "123e4567-e89b-12d3-a456-426614174000" == activated["user_id"]
        assert {
            "id",
            "token_id",
            "user_id",
            "activated_at",
            "expires_at",
            "fence",
            "revision",
        } == set(activated)
        tokens = curl(f"{base}/api/tokens")["data"]
        assert 3 == len(tokens)
        held = [t for t in tokens if t["status"] == "active"]
        assert [activated["token_id"]] == [t["id"] for t in held]
        assert activated["user_id"] == held[0]["current_user_id"]
        assert activated["activated_at"] == held[0]["activated_at"]
        free = [t for t in tokens if t["status"] == "available"]
        assert all(t["current_user_id"] is None for t in free)
        one = curl(f"{base}/api/tokens/{activated['token_id']}")["data"]
        assert "active" == one["status"]
        assert activated["id"] == one["active_usage"]["id"]
        assert activated["user_id"] == one["active_usage"]["user_id"]
        assert activated["activated_at"] == one["active_usage"]["started_at"]
        cleared = curl("-X", "POST", f"{base}/api/tokens/clear")["data"]
        assert 1 == cleared["cleared_tokens"]
        history = curl(f"{base}/api/tokens/{activated['token_id']}/history")["data"]
        assert activated["token_id"] == history["token_id"]
        assert [("cleared", activated["user_id"], activated["activated_at"])] == [
            (u["reason"], u["user_id"], u["started_at"]) for u in history["usages"]
        ]
        assert curl(f"{base}/api/tokens/{activated['token_id']}")["data"]["active_usage"] is None


def test_release_renew_and_a_users_lease_and_history() -> None:
    with api("--size", "2", "--ttl", "60") as client:
        lease = client.post("/api/tokens/activate", json={"user_id": "alice"}).json()["data"]
        token = lease["token_id"]
        assert lease == {
            **client.get("/api/users/alice/lease").json()["data"],
            "revision": lease["revision"],
        }
        renewed = client.post(f"/api/tokens/{token}/renew", json={"lease_id": lease["id"]})
        assert 200 == renewed.status_code
        assert renewed.json()["data"]["expires_at"] >= lease["expires_at"]
        valid = client.get(f"/api/tokens/{token}/validate", params={"lease_id": lease["id"]})
        assert {"valid": True} == valid.json()["data"]
        released = client.post(f"/api/tokens/{token}/release", json={"user_id": "alice"})
        assert 200 == released.status_code
        assert ("released", lease["id"]) == (
            released.json()["data"]["reason"],
            released.json()["data"]["id"],
        )
        assert client.get("/api/users/alice/lease").json()["data"] is None
        history = client.get("/api/users/alice/history").json()["data"]
        assert "alice" == history["user_id"]
        assert [lease["id"]] == [u["id"] for u in history["usages"]]


def test_history_pages_with_limit_and_cursor() -> None:
    with api("--size", "1") as client:
        users = [f"u{i}" for i in range(7)]
        for user in users:  # a pool of one: each activation evicts the one before
            client.post("/api/tokens/activate", json={"user_id": user})
        token = client.get("/api/tokens").json()["data"][0]["id"]
        seen: list[str] = []
        before = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if before is not None:
                params["before"] = before
            page = client.get(f"/api/tokens/{token}/history", params=params).json()["data"]
            seen += [u["user_id"] for u in page["usages"]]
            before = page["next_before"]
            if before is None:
                break
        assert list(reversed(users[:-1])) == seen


# -- status codes and errors --------------------------------------------------------------


def test_status_codes_name_what_was_wrong() -> None:
    with api("--size", "1", "--when-full", "reject") as client:
        unknown_token = str(uuid.uuid4())
        assert (422, "INVALID") == error_of(client.post("/api/tokens/activate", json={}))
        assert (422, "INVALID") == error_of(
            client.post(
                "/api/tokens/activate",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
        )
        assert (422, "INVALID") == error_of(
            client.post("/api/tokens/activate", json={"user_id": "has space"})
        )
        assert (422, "INVALID") == error_of(client.get("/api/tokens/not-a-uuid"))
        assert (404, "UNKNOWN") == error_of(client.get(f"/api/tokens/{unknown_token}"))
        assert (404, "UNKNOWN") == error_of(client.get("/api/pools/nope/tokens"))
        lease = client.post("/api/tokens/activate", json={"user_id": "alice"}).json()["data"]
        token = lease["token_id"]
        assert (409, "FULL") == error_of(
            client.post("/api/tokens/activate", json={"user_id": "bob"})
        )
        assert (409, "NOTHOLDER") == error_of(
            client.post(f"/api/tokens/{token}/release", json={"user_id": "bob"})
        )
        client.post(f"/api/tokens/{token}/release")
        assert (409, "NOTACTIVE") == error_of(client.post(f"/api/tokens/{token}/release"))
        assert (409, "NOTHOLDER") == error_of(  # the lease is no longer the token's
            client.post(f"/api/tokens/{token}/renew", json={"lease_id": lease["id"]})
        )
        assert (404, "NOTFOUND") == error_of(client.get("/api/nothing/here"))


def test_a_body_past_the_bound_is_refused_before_it_is_read() -> None:
    with api() as client:
        big = b'{"user_id": "' + b"x" * 100_000 + b'"}'
        response = client.post(
            "/api/tokens/activate", content=big, headers={"content-type": "application/json"}
        )
        assert (413, "TOOLARGE") == error_of(response)
        assert 200 == client.post("/api/tokens/activate", json={"user_id": "a"}).status_code


# -- authentication ------------------------------------------------------------------------


def test_bearer_password_guards_every_api_call() -> None:
    env = {"TOKENPOOL_PASSWORD": "pw-Http-1", "TOKENPOOL_ADMIN_PASSWORD": "adm-Http-2"}
    with api(env=env) as client:
        missing = client.get("/api/tokens")
        assert (401, "NOAUTH") == error_of(missing)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.get("/api/tokens", headers={"authorization": "Bearer nope"})
        assert (401, "WRONGPASS") == error_of(wrong)
        user = {"authorization": "Bearer pw-Http-1"}
        admin = {"authorization": "Bearer adm-Http-2"}
        assert 200 == client.get("/api/tokens", headers=user).status_code
        assert (
            200
            == client.post("/api/tokens/activate", json={"user_id": "a"}, headers=user).status_code
        )
        refused = client.post("/api/tokens/clear", headers=user)
        assert (403, "NOPERM") == error_of(refused)
        assert "Authorization: Bearer <admin password>" in refused.json()["error"]["message"]
        assert 200 == client.post("/api/tokens/clear", headers=admin).status_code
        assert 200 == client.get("/healthz").status_code  # probes need no password
        assert 200 == client.get("/metrics").status_code


# -- pools -------------------------------------------------------------------------------------


def test_pools_are_created_listed_altered_and_dropped_over_http() -> None:
    with api() as client:
        made = client.post(
            "/api/pools", json={"name": "seats", "size": 2, "ttl": 30, "when_full": "reject"}
        )
        assert 200 == made.status_code
        assert {"size": 2, "ttl": 30.0, "when_full": "reject"}.items() <= made.json()["data"][
            "settings"
        ].items()
        assert (409, "EXISTS") == error_of(
            client.post("/api/pools", json={"name": "seats", "size": 2, "ttl": 30})
        )
        assert ["default", "seats"] == sorted(
            p["name"] for p in client.get("/api/pools").json()["data"]
        )
        for user in ("a", "b"):
            assert (
                200
                == client.post(
                    "/api/pools/seats/tokens/activate", json={"user_id": user}
                ).status_code
            )
        assert (409, "FULL") == error_of(
            client.post("/api/pools/seats/tokens/activate", json={"user_id": "c"})
        )
        assert 0 == client.get("/api/pools/default").json()["data"]["stats"]["active"]
        altered = client.patch("/api/pools/seats", json={"size": 3})
        assert 3 == altered.json()["data"]["settings"]["size"]
        assert (
            200
            == client.post("/api/pools/seats/tokens/activate", json={"user_id": "c"}).status_code
        )
        assert 200 == client.delete("/api/pools/seats").status_code
        assert (404, "UNKNOWN") == error_of(client.get("/api/pools/seats"))
        assert (422, "INVALID") == error_of(
            client.post("/api/pools", json={"name": "bad name", "size": 1, "ttl": 1})
        )
        assert (422, "INVALID") == error_of(
            client.post("/api/pools", json={"name": "x", "size": 0, "ttl": 1})
        )


# -- rate limits --------------------------------------------------------------------------------


def test_rate_limit_per_client_address_on_both_transports() -> None:
    with serving("--dsn", "memory", "--rate-limit", "1", "--rate-limit-burst", "3") as server:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}") as client:
            codes = [client.get("/api/tokens").status_code for _ in range(4)]
            assert [200, 200, 200, 429] == codes
            refused = client.get("/api/tokens")
            assert (429, "BUSY") == error_of(refused)
            assert 1 <= int(refused.headers["retry-after"]) <= 2
        r = redis.Redis(port=server.port, decode_responses=True)
        with pytest.raises(redis.ResponseError, match="rate limit"):
            r.execute_command("PING")  # the same address's budget: already spent
        r.close()


def test_rate_limit_per_user_id() -> None:
    with api("--user-rate-limit", "1", "--user-rate-limit-burst", "2") as client:
        codes = [
            client.post("/api/tokens/activate", json={"user_id": "greedy"}).status_code
            for _ in range(3)
        ]
        assert [200, 200, 429] == codes
        assert 200 == client.post("/api/tokens/activate", json={"user_id": "other"}).status_code


# -- events -----------------------------------------------------------------------------------


def read_events(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    """The next ``count`` SSE messages (with their id and event name, if any)."""
    out: list[dict[str, Any]] = []
    message: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in message:
                out.append(message)
                if len(out) == count:
                    return out
            message = {}
            continue
        field, _, value = line.partition(": ")
        if field == "data":
            message["data"] = json.loads(value)
        elif field in ("id", "event"):
            message[field] = value
    return out


def test_events_resume_after_last_event_id_without_a_gap() -> None:
    with api("--size", "1") as client:
        with client.stream("GET", "/api/events") as stream:
            client.post("/api/tokens/activate", json={"user_id": "a"})
            (first,) = read_events(stream, 1)
        assert "granted" == first["data"]["kind"]
        assert str(first["data"]["revision"]) == first["id"]
        client.post("/api/tokens/activate", json={"user_id": "b"})  # evicts a
        client.post("/api/tokens/activate", json={"user_id": "c"})  # evicts b
        with client.stream("GET", "/api/events", headers={"last-event-id": first["id"]}) as stream:
            replayed = read_events(stream, 4)
        assert [("ended", "a"), ("granted", "b"), ("ended", "b"), ("granted", "c")] == [
            (m["data"]["kind"], m["data"]["user_id"]) for m in replayed
        ]
        # an eviction's ended event shares its revision with the grant: only the
        # grant carries the id, so a client resuming from it has both
        assert ["id" in m for m in replayed] == [False, True, False, True]


def test_events_after_a_restart_say_compacted(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/p.db"
    with api("--dsn", store) as client:
        for user in ("a", "b", "c"):
            client.post("/api/tokens/activate", json={"user_id": user})
    with api("--dsn", store) as client:
        with client.stream("GET", "/api/events", headers={"last-event-id": "1"}) as stream:
            (message,) = read_events(stream, 1)
        assert "compacted" == message["event"]
        assert message["data"]["oldest"] > 1


# -- operations ------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text ``text`` (labels in any order)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    raise AssertionError(f"no {name}{labels} in /metrics")


def test_metrics_after_a_known_sequence() -> None:
    with api("--size", "2") as client:
        for user in ("a", "b", "c"):  # the third evicts a
            client.post("/api/tokens/activate", json={"user_id": user})
        token = client.get("/api/users/b/lease").json()["data"]["token_id"]
        client.post(f"/api/tokens/{token}/release")
        client.post("/api/tokens/activate", json={"user_id": "bad user"})  # 422
        text = client.get("/metrics").text
        assert 1 == metric(text, "tokenpool_tokens", pool="default", state="active")
        assert 1 == metric(text, "tokenpool_tokens", pool="default", state="available")
        assert 3 == metric(text, "tokenpool_activations_total", pool="default")
        assert 1 == metric(text, "tokenpool_evictions_total", pool="default")
        assert 1 == metric(text, "tokenpool_releases_total", pool="default")
        assert 0 == metric(text, "tokenpool_expirations_total", pool="default")
        assert metric(text, "tokenpool_error_replies_total", transport="http") >= 1
        assert 4 == metric(
            text,
            "tokenpool_request_duration_seconds_count",
            transport="http",
            command="activate",
        )


def test_metrics_show_the_write_behind(tmp_path: Path) -> None:
    with api("--dsn", f"sqlite:///{tmp_path}/p.db") as client:
        client.post("/api/tokens/activate", json={"user_id": "a"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = client.get("/metrics").text
            if (
                metric(text, "tokenpool_changes_written_total", pool="default") >= 1
                and metric(text, "tokenpool_write_backlog", pool="default") == 0
            ):
                break
            time.sleep(0.05)
        assert 1 == metric(text, "tokenpool_store_link", pool="default", state="up")
        assert 0 == metric(text, "tokenpool_write_backlog", pool="default")


def test_readiness_follows_the_store(cluster_url: str, pg_cluster: Cluster) -> None:
    with api("--dsn", cluster_url, "--write-timeout", "1", "--max-backlog", "5") as client:
        assert 200 == client.get("/readyz").status_code
        pg_cluster.stop("immediate")
        try:
            client.post("/api/tokens/activate", json={"user_id": "a"})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ready = client.get("/readyz")
                if ready.status_code == 503:
                    break
                time.sleep(0.1)
            assert 503 == ready.status_code
            assert "default" in ready.json()["reasons"]
            assert 200 == client.get("/healthz").status_code
            codes = [
                client.post("/api/tokens/activate", json={"user_id": f"u{i}"}).status_code
                for i in range(10)
            ]
            assert 503 in codes  # the backlog of 5 is full: refused, not queued
            refused = client.post("/api/tokens/activate", json={"user_id": "late"})
            assert (503, "UNAVAILABLE") == error_of(refused)
        finally:
            pg_cluster.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.get("/readyz").status_code != 200:
            time.sleep(0.2)
        assert 200 == client.get("/readyz").status_code


def test_a_waiter_that_hangs_up_is_never_granted() -> None:
    with serving("--dsn", "memory", "--size", "1", "--when-full", "wait") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base) as client:
            client.post("/api/tokens/activate", json={"user_id": "holder"})

            def wait_and_hang_up() -> None:
                with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=base) as other:
                    other.post(
                        "/api/tokens/activate",
                        json={"user_id": "waiter", "wait": 30},
                        timeout=0.5,
                    )

            thread = threading.Thread(target=wait_and_hang_up)
            thread.start()
            thread.join()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if client.get("/api/pools/default").json()["data"]["stats"]["waiting"] == 0:
                    break
                time.sleep(0.05)
            token = client.get("/api/users/holder/lease").json()["data"]["token_id"]
            client.post(f"/api/tokens/{token}/release")
            assert client.get("/api/users/waiter/lease").json()["data"] is None
            assert 0 == client.get("/api/pools/default").json()["data"]["stats"]["activations"] - 1


def test_openapi_describes_every_route() -> None:
    with api() as client:
        doc = client.get("/openapi.json").json()
        paths = set(doc["paths"])
        for path in (
            "/api/tokens/activate",
            "/api/tokens",
            "/api/tokens/{token_id}",
            "/api/tokens/{token_id}/history",
            "/api/tokens/clear",
            "/api/tokens/{token_id}/release",
            "/api/tokens/{token_id}/renew",
            "/api/users/{user_id}/lease",
            "/api/users/{user_id}/history",
            "/api/events",
            "/api/pools",
            "/api/pools/{pool}",
            "/api/pools/{pool}/tokens/activate",
            "/healthz",
            "/readyz",
            "/metrics",
        ):
            assert path in paths
        assert 200 == client.get("/docs").status_code


def test_the_plain_activation_answers_as_the_route_does() -> None:
    """``{"user_id": ...}`` alone takes the path in front of FastAPI; a ``wait`` of null
    or a non-ASCII user id goes through FastAPI: the same shape and headers either way."""
    with api("--size", "3", "--requirepass", "pw") as client:
        auth = {"Authorization": "Bearer pw"}
        plain = client.post("/api/tokens/activate", json={"user_id": "a"}, headers=auth)
        routed = client.post(
            "/api/tokens/activate", json={"user_id": "b", "wait": None}, headers=auth
        )
        other = client.post(
            "/api/pools/default/tokens/activate", json={"user_id": "é"}, headers=auth
        )
        for response in (plain, routed, other):
            assert 200 == response.status_code
            assert "application/json" == response.headers["content-type"]
            assert "DENY" == response.headers["x-frame-options"]
        assert set(plain.json()["data"]) == set(routed.json()["data"]) == set(other.json()["data"])
        assert ["a", "b", "é"] == [r.json()["data"]["user_id"] for r in (plain, routed, other)]
        again = client.post("/api/tokens/activate", json={"user_id": "a"}, headers=auth)
        assert plain.json()["data"]["id"] == again.json()["data"]["id"]
        refused = client.post("/api/tokens/activate", json={"user_id": "a"})
        assert (401, "NOAUTH") == error_of(refused)
        wrong = client.post(
            "/api/tokens/activate", json={"user_id": "a"}, headers={"Authorization": "Bearer x"}
        )
        assert (401, "WRONGPASS") == error_of(wrong)
        unknown = client.post(
            "/api/pools/nosuch/tokens/activate", json={"user_id": "a"}, headers=auth
        )
        assert (404, "UNKNOWN") == error_of(unknown)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_large_listing_is_streamed_as_the_whole_listing(workers: str) -> None:
    """Past ``BIG_LISTING`` items a listing is encoded and sent a slice at a time: the
    bytes are the compact JSON of the whole listing (as a small one's), user ids that
    JSON escapes included, and it lists what the pages list."""
    size = 1_300
    with (
        serving("--dsn", "memory", "--size", str(size), "--http-workers", workers) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as client,
    ):
        users = [f'u{n}"\\é{n}' for n in range(size)]
        with redis.Redis(port=server.port) as r:
            pipe = r.pipeline(transaction=False)
            for user in users:
                pipe.execute_command("ACTIVATE", user)
            pipe.execute()
            r.execute_command("POOL", "CREATE", "one", "SIZE", "1", "TTL", "600")
            pipe = r.pipeline(transaction=False)
            for user in users:  # a pool of one: each activation ends the one before
                pipe.execute_command("TP.ACTIVATE", "one", user)
            pipe.execute()
        whole = client.get("/api/tokens")
        assert 200 == whole.status_code
        assert "content-length" not in whole.headers  # streamed
        listed = whole.json()
        assert (
            whole.content == json.dumps(listed, ensure_ascii=False, separators=(",", ":")).encode()
        )
        assert None is listed["next_cursor"]
        assert sorted(users) == sorted(t["current_user_id"] for t in listed["data"])
        paged: list[Any] = []
        cursor = "0"
        while cursor is not None:
            page = client.get("/api/tokens", params={"cursor": cursor, "count": 500}).json()
            paged += page["data"]
            cursor = page["next_cursor"]
        assert paged == listed["data"]

        token = client.get("/api/pools/one/tokens").json()["data"][0]["id"]
        history = client.get(f"/api/pools/one/tokens/{token}/history", params={"limit": 5_000})
        assert 200 == history.status_code
        ended = history.json()["data"]
        assert (
            history.content
            == json.dumps(history.json(), ensure_ascii=False, separators=(",", ":")).encode()
        )
        assert token == ended["token_id"]
        assert list(reversed(users[:-1])) == [u["user_id"] for u in ended["usages"]]
        short = client.get(f"/api/pools/one/tokens/{token}/history", params={"limit": 10})
        assert short.json()["data"]["usages"] == ended["usages"][:10]
