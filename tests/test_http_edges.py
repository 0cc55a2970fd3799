"""The HTTP API's edges (issue 19's wrong answers and bounds), against the real server
process: httpx where a client can say it, raw sockets where the framing is the point."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.test_http import api, error_of, metric, read_events, serving


def raw(port: int, request: bytes, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send ``request`` on a fresh connection: what came back, and whether the server
    closed the connection (``False``: still open after ``wait`` seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(request)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return received, True
                received += chunk
        except TimeoutError:
            return received, False


def chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        part = min(size, total - sent)
        sent += part
        yield b"x" * part


# -- 1. a chunked body past 64 KiB -------------------------------------------------------


def test_a_chunked_body_past_64_kib_is_413_toolarge() -> None:
    with api() as client:
        response = client.post(
            "/api/tokens/activate",
            content=chunks(70 * 1024),
            headers={"content-type": "application/json"},
        )
        assert (413, "TOOLARGE") == error_of(response)


def test_a_chunked_body_within_the_bound_is_read() -> None:
    def body() -> Iterator[bytes]:
        yield b'{"user_id":'
        yield b' "alice"}'

    with api() as client:
        response = client.post(
            "/api/tokens/activate", content=body(), headers={"content-type": "application/json"}
        )
        assert 200 == response.status_code
        assert "alice" == response.json()["data"]["user_id"]


# -- 2. HEAD on the probes ---------------------------------------------------------------


def test_head_answers_on_the_probes_without_a_body() -> None:
    with serving("--dsn", "memory") as server:
        for path in ("/healthz", "/readyz", "/metrics", "/", "/docs", "/redoc"):
            request = f"HEAD {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            received, _ = raw(server.http_port or 0, request.encode())
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            assert b"" == body, path


# -- 3. Content-Length with Transfer-Encoding ---------------------------------------------


def test_content_length_with_transfer_encoding_is_400_and_closed() -> None:
    """h11 reads such a request as chunked and would keep the connection: the server
    refuses it and closes (RFC 9112 §6.1), so nothing after it is read as a request."""
    body = b'{"user_id": "a"}'
    request = (
        b"POST /api/tokens/activate HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), len(body), body)
    )
    with serving("--dsn", "memory") as server:
        received, closed = raw(server.http_port or 0, request)
    assert received.startswith(b"HTTP/1.1 400"), received[:100]
    assert b"BADFRAMING" in received
    assert closed, "the connection was kept: a request after it would be served"


# -- 4. user ids with "/" -------------------------------------------------------------------


def test_a_user_id_with_a_slash_is_read_back_encoded_or_not() -> None:
    with api() as client:
        leased = client.post("/api/tokens/activate", json={"user_id": "team/alice"})
        assert 200 == leased.status_code
        lease_id = leased.json()["data"]["id"]
        for path in ("/api/users/team%2Falice/lease", "/api/users/team/alice/lease"):
            response = client.get(path)
            assert 200 == response.status_code, path
            assert lease_id == response.json()["data"]["id"]
        client.post(f"/api/tokens/{leased.json()['data']['token_id']}/release")
        history = client.get("/api/users/team%2Falice/history")
        assert ["team/alice"] == [u["user_id"] for u in history.json()["data"]["usages"]]


# -- 5. count without a cursor --------------------------------------------------------------


def test_count_without_a_cursor_is_the_first_page() -> None:
    with api("--size", "5") as client:
        page = client.get("/api/tokens", params={"count": 2}).json()
        assert 2 == len(page["data"])
        assert page["next_cursor"] is not None
        every = client.get("/api/tokens").json()
        assert 5 == len(every["data"])
        assert every["next_cursor"] is None


# -- 6. validation messages in words ------------------------------------------------------


def test_a_bad_user_id_is_explained_without_a_pattern() -> None:
    with api() as client:
        response = client.post("/api/tokens/activate", json={"user_id": "a b"})
        assert (422, "INVALID") == error_of(response)
        message = response.json()["error"]["message"]
        assert "no space or control character" in message
        assert "pattern" not in message and "^" not in message


def test_a_body_that_is_not_an_object_is_said_so() -> None:
    with api() as client:
        response = client.post("/api/tokens/activate", json=["alice"])
        assert (422, "INVALID") == error_of(response)
        assert "the body must be a JSON object" == response.json()["error"]["message"]


def test_validation_messages_never_quote_pydantic() -> None:
    with api() as client:
        answers = [
            client.post("/api/tokens/activate", json={"user_id": "a", "wait": -1}),
            client.post("/api/tokens/activate", json={"user_id": "a", "extra": 1}),
            client.post("/api/tokens/activate", json={}),
            client.get("/api/tokens", params={"count": "many"}),
            client.get("/api/tokens/not-a-uuid"),
            client.post("/api/pools", json={"name": "p", "size": 1, "ttl": 1, "when_full": "x"}),
        ]
        messages = [r.json()["error"]["message"] for r in answers]
        assert [422] * len(answers) == [r.status_code for r in answers]
        for message in messages:
            assert "Input should" not in message, message
            assert "pattern" not in message, message
        assert "wait must be at least" in messages[0]
        assert "extra is not a field" in messages[1]
        assert "user_id is required" in messages[2]
        assert "the query parameter count must be a whole number" in messages[3]
        assert "token_id must be a UUID" in messages[4]
        assert "when_full must be one of" in messages[5]


# -- 8. pools named . and .. --------------------------------------------------------------


def test_dot_and_dot_dot_are_not_pool_names() -> None:
    """``/api/pools/../tokens`` is ``/api/tokens`` to a browser: such a pool would show
    the default pool's tokens on the dashboard."""
    with api() as client:
        for name in (".", ".."):
            response = client.post("/api/pools", json={"name": name, "size": 1, "ttl": 10})
            assert (422, "INVALID") == error_of(response), name
            assert "not . or .." in response.json()["error"]["message"]
        dots = client.post("/api/pools", json={"name": "...", "size": 1, "ttl": 10})
        assert 200 == dots.status_code


# -- 9. HTTP clients counted once ------------------------------------------------------------


def test_an_event_stream_is_one_http_client_in_metrics() -> None:
    with api() as client:
        alone = metric(client.get("/metrics").text, "tokenpool_connected_clients", transport="http")
        with client.stream("GET", "/api/events") as stream:
            lines = stream.iter_lines()
            assert lines.__next__().startswith("retry:")
            assert lines.__next__().startswith(": events of pool")
            time.sleep(1.1)  # past the one-second render cache
            text = client.get("/metrics").text
        assert alone + 1 == metric(text, "tokenpool_connected_clients", transport="http")


# -- 10. Last-Event-ID not a revision ------------------------------------------------------


def test_a_last_event_id_that_is_not_a_revision_is_422() -> None:
    with api() as client:
        response = client.get("/api/events", headers={"last-event-id": "abc"})
        assert (422, "INVALID") == error_of(response)


# -- 11. resuming past the server's revision ------------------------------------------------


@pytest.mark.parametrize("offset", [-1_000_000, 50])
def test_resuming_past_a_restarted_memory_server_says_compacted(offset: int) -> None:
    """A memory-only server keeps no events across a restart. A revision of the server
    before it (below this one's first: its revisions start at the wall clock's
    microseconds), or one ahead of it (the clock was set back), is answered
    ``compacted`` with the oldest revision to resume from, never replayed as if it
    were a place in this server's history."""
    with api() as client:
        current = client.post("/api/tokens/activate", json={"user_id": "a"}).json()["data"]
        since = str(current["revision"] + offset)
        with client.stream("GET", "/api/events", headers={"last-event-id": since}) as stream:
            (message,) = read_events(stream, 1)
        assert "compacted" == message.get("event")
        # below: resume from the oldest event held (this server's first); ahead: after
        # the server's current revision
        assert current["revision"] + (offset > 0) == message["data"]["oldest"]


# -- 12. bounds ----------------------------------------------------------------------------------


def test_a_body_sent_a_byte_a_second_is_dropped_within_the_idle_timeout() -> None:
    with (
        serving("--dsn", "memory", "--idle-timeout", "2") as server,
        socket.create_connection(("127.0.0.1", server.http_port or 0), timeout=10) as sock,
    ):
        sock.sendall(
            b"POST /api/tokens/activate HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        started = time.monotonic()
        received = b""
        for _ in range(8):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(1.0)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            received += chunk
            if received.endswith(b"}") or not chunk:
                break
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408"), received[:100]
    assert elapsed < 5


def test_h2c_upgrade_is_ignored() -> None:
    """HTTP/1.1 only: an ``Upgrade: h2c`` is answered in HTTP/1.1 (no 101), and a
    connection that starts with the HTTP/2 preface is refused."""
    with serving("--dsn", "memory") as server:
        port = server.http_port or 0
        upgrade = (
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        received, _ = raw(port, upgrade, wait=2)
        assert received.startswith(b"HTTP/1.1 200"), received[:100]
        preface, _ = raw(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", wait=2)
        assert not preface.startswith(b"\x00"), "an HTTP/2 SETTINGS frame came back"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert 200 == client.get("/healthz").status_code


# -- a stuck event-stream reader --------------------------------------------------------


def test_an_event_stream_whose_reader_stops_reading_ends_and_frees_its_slot() -> None:
    """hypercorn's writes are shielded, so the stuck send itself stays until the client
    reads or goes; the stream's slot and its subscription in the pool are given back."""
    import socket

    import redis

    def subscribers(client: httpx.Client) -> float:
        return metric(client.get("/metrics").text, "tokenpool_event_subscribers", pool="default")

    with serving("--dsn", "memory", "--size", "1", "--idle-timeout", "1") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            stuck = socket.create_connection(("127.0.0.1", server.http_port))
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # never read
            time.sleep(1.2)
            assert 1 == subscribers(client)
            r = redis.Redis(port=server.port)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pipe = r.pipeline(transaction=False)
                for i in range(2_000):  # each evicts: an ended and a granted event
                    pipe.execute_command("ACTIVATE", f"u{i}")
                pipe.execute()
                time.sleep(1.2)  # past --idle-timeout and the metrics cache
                if subscribers(client) == 0:
                    break
            stuck.close()
            r.close()
            assert 0 == subscribers(client), "a reader that stopped reading kept its subscription"


# -- heads, Host and JSON, as a reviewer sent them ------------------------------------------


def test_a_head_past_16_kib_in_one_write_is_431_and_two_hosts_are_400() -> None:
    """Both HTTP servers: a head (target and headers) that arrives whole in one read is
    held to the same 16 KiB as one that trickles in; more than one Host is a 400 (a proxy
    routing on another one than the check reads would make the Host check moot)."""
    with serving("--dsn", "memory") as server:
        port = server.http_port or 0
        for head in (
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: %s\r\n\r\n" % (b"a" * 20_000),
            b"GET /healthz?q=%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (b"b" * 20_000),
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"c" * 60) for i in range(300))
            + b"\r\n",
        ):
            received, _ = raw(port, head, wait=2.0)
            assert received.startswith(b"HTTP/1.1 431"), received[:100]
            assert b"HEADTOOLARGE" in received
        two = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n"
        received, _ = raw(port, two, wait=2.0)
        assert received.startswith(b"HTTP/1.1 400"), received[:100]  # h11 refuses it itself
        fine = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Ok: %s\r\n\r\n" % (b"d" * 8000)
        received, _ = raw(port, fine, wait=1.0)
        assert received.startswith(b"HTTP/1.1 200"), received[:100]


def test_a_body_that_is_not_json_is_said_so_in_words() -> None:
    with api() as client:
        for body in (b'{"user_id":', b'{"user_id": "x", '):
            response = client.post(
                "/api/tokens/activate",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert (422, "INVALID") == error_of(response)
            message = response.json()["error"]["message"]
            assert message.startswith("the body is not valid JSON at character"), message


def test_a_body_nested_past_the_parsers_depth_is_refused_not_a_server_error() -> None:
    """2 KB of nested arrays blew Python's JSON parser's recursion in the fast path in
    front of FastAPI: a 500 with an empty body. It is the same 422 as any bad body."""
    body = b'{"user_id": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with api() as client:
        response = client.post(
            "/api/tokens/activate", content=body, headers={"content-type": "application/json"}
        )
        assert (422, "INVALID") == error_of(response)
        assert 200 == client.post("/api/tokens/activate", json={"user_id": "a"}).status_code


def test_a_path_that_is_not_utf8_is_refused_not_read_as_another_user() -> None:
    """``%ff`` in a path was decoded to U+FFFD, so ``/api/users/%ff/lease`` read the
    lease of the user called "\\ufffd". As RESP refuses an argument that is not UTF-8,
    such a path is 422; the user "\\ufffd" itself, sent as its UTF-8, is still served."""
    with api() as client:
        lease = client.post("/api/tokens/activate", json={"user_id": "\ufffd"}).json()["data"]
        assert (422, "INVALID") == error_of(client.get("/api/users/%ff/lease"))
        assert (422, "INVALID") == error_of(client.get("/api/users/%fe%fd/history"))
        mine = client.get("/api/users/%EF%BF%BD/lease")
        assert 200 == mine.status_code and lease["id"] == mine.json()["data"]["id"]


@pytest.mark.parametrize(
    "bad",
    [
        {"size": "1_000", "ttl": 60},
        {"size": " 4", "ttl": 60},
        {"size": True, "ttl": 60},
        {"size": 4, "ttl": True},
        {"size": 4, "ttl": "1_0"},
        {"size": 4, "ttl": 60, "min_hold": "1e1"},
    ],
)
def test_numbers_in_a_body_are_json_numbers(bad: dict[str, object]) -> None:
    """Pydantic's lax mode made "1_000", " 4", "1e1" and true numbers; every other way
    in (flags, environment, the file, RESP) refuses them: so does a body now."""
    with api() as client:
        assert (422, "INVALID") == error_of(client.post("/api/pools", json={"name": "p", **bad}))
        assert 404 == client.get("/api/pools/p").status_code  # nothing was made
        refused = client.post("/api/tokens/activate", json={"user_id": "w", "wait": "1_0"})
        assert (422, "INVALID") == error_of(refused)
        made = client.post("/api/pools", json={"name": "p", "size": 4, "ttl": 60.5})
        assert made.status_code in (200, 201), made.text
