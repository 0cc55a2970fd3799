"""``tokenpool serve --http-workers 2``: real worker processes, real signals, real sockets.

(Every HTTP test file also runs through workers with ``TOKENPOOL_HTTP_WORKERS=2`` in the
environment: the option's variable, which the servers the tests start inherit.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.chaos import server as chaos_server
from tests.test_http import free_port, metric


def worker_pids(server: chaos_server.Process) -> dict[str, int]:
    """The workers running now, by name (from the server's log)."""
    started = {e["worker"]: e["pid"] for e in server.log if e.get("event") == "http_worker_started"}
    died = {e["worker"] for e in server.log if e.get("event") == "http_worker_died"}
    return {name: pid for name, pid in started.items() if name not in died}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


@contextmanager
def workers(*args: str, new_session: bool = False) -> Iterator[chaos_server.Process]:
    port = free_port()
    server = chaos_server.start(
        "--dsn",
        "memory",
        "--http-port",
        str(port),
        "--http-workers",
        "2",
        *args,
        new_session=new_session,
    )
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            try:
                server.stop()
            except Exception:
                server.kill()


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_activate_through_workers_then_a_killed_worker_is_replaced_and_resp_never_waits() -> None:
    with workers() as server:
        base = f"http://127.0.0.1:{server.http_port}"
        lease = httpx.post(f"{base}/api/tokens/activate", json={"user_id": "alice"})
        assert 200 == lease.status_code
        assert "alice" == lease.json()["data"]["user_id"]
        before = worker_pids(server)
        assert 2 == len(before)
        expected = min(os.getpriority(os.PRIO_PROCESS, server.pid) + 5, 19)  # the kernel's cap
        # the pools first when both want a core (the server serves once one worker
        # accepts: the other may still be importing, before its os.nice)
        wait_for(
            lambda: all(expected == os.getpriority(os.PRIO_PROCESS, p) for p in before.values())
        )
        victim_name, victim = sorted(before.items())[0]
        r = redis.Redis(port=server.port, socket_timeout=5)
        os.kill(victim, signal.SIGKILL)
        worst = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # the pools are not the worker's: RESP is unmoved
            began = time.monotonic()
            assert r.ping()
            worst = max(worst, time.monotonic() - began)
            time.sleep(0.01)
        assert worst < 0.5
        wait_for(
            lambda: len(worker_pids(server)) == 2 and victim not in worker_pids(server).values()
        )
        assert any(
            e.get("event") == "http_worker_died" and e.get("worker") == victim_name
            for e in server.log
        )
        for _ in range(10):  # whichever worker answers
            with httpx.Client(base_url=base) as client:
                held = client.get("/api/users/alice/lease")
                assert 200 == held.status_code
                assert lease.json()["data"]["id"] == held.json()["data"]["id"]
        r.close()


def test_a_stopped_worker_is_replaced() -> None:
    with workers() as server:
        (name, pid), _ = sorted(worker_pids(server).items())
        time.sleep(1.5)  # it has reported once
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: any(
                    e.get("event") == "http_worker_hung" and e.get("worker") == name
                    for e in server.log
                ),
                timeout=20,
            )
            wait_for(
                lambda: len(worker_pids(server)) == 2 and pid not in worker_pids(server).values()
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert 200 == httpx.get(f"http://127.0.0.1:{server.http_port}/healthz").status_code


class StartStopping:
    """``tokenpool serve`` with 2 HTTP workers, the first ``stop`` of them SIGSTOPped as
    soon as each is started (still importing: before it can accept or report); its
    JSON log lines in ``events``, read by a thread."""

    def __init__(self, stop: int) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tokenpool", "serve", "--port", str(free_port())),
                *("--http-port", str(free_port()), "--http-workers", "2", "--dsn", "memory"),
                *("--log-format", "json"),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.stopped: list[dict[str, Any]] = []
        self._stop = stop
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        import json

        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            event = json.loads(line)
            if event.get("event") == "http_worker_started" and len(self.stopped) < self._stop:
                os.kill(int(event["pid"]), signal.SIGSTOP)
                self.stopped.append(event)
            self.events.append(event)

    def said(self, kind: str, worker: object = None) -> int:
        return sum(
            e.get("event") == kind and worker in (None, e.get("worker")) for e in list(self.events)
        )

    def close(self) -> None:
        for event in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(event["pid"]), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def test_a_worker_stopped_before_its_first_report_is_replaced() -> None:
    """A worker reports once the pools are served: one stopped before that was taken
    for one still waiting for them, for good, and HTTP ran on fewer workers without a
    word. Once the others report, it has HUNG_AFTER to report too. The server's start
    waits for the others READY_SPREAD after one accepts (it waited 30 s for the stopped
    one)."""
    server = StartStopping(1)
    try:
        wait_for(lambda: server.said("listening"), timeout=15)
        wait_for(lambda: server.said("http_worker_hung", server.stopped[0]["worker"]))
        wait_for(lambda: server.said("http_worker_started") >= 3)  # and replaced
    finally:
        server.close()


def test_a_stop_signal_while_the_workers_start_is_acted_on() -> None:
    """SIGTERM while the server waits for its workers to start (both wedged): the wait
    ends, the server stops within its grace. It waited the 30 s out, started, logged
    ``listening`` after ``shutting_down``, then stopped (outside probe: 40 s)."""
    server = StartStopping(2)
    try:
        wait_for(lambda: len(server.stopped) == 2)
        time.sleep(0.5)
        begun = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
        took = time.monotonic() - begun
    finally:
        server.close()
    assert took < 15, f"stopped {took:.1f} s after SIGTERM"
    assert 0 == server.proc.returncode


def test_sigterm_to_the_group_stops_server_and_workers_cleanly() -> None:
    with workers("--shutdown-timeout", "5", new_session=True) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        assert 200 == httpx.post(f"{base}/api/tokens/activate", json={"user_id": "a"}).status_code
        pids = list(worker_pids(server).values())
        assert 2 == len(pids)
        began = time.monotonic()
        server.signal_group(signal.SIGTERM)
        assert 0 == server.wait(timeout=30)
        assert time.monotonic() - began < 5
        wait_for(lambda: not any(alive(p) for p in pids), timeout=5)
        assert not any(e.get("event") == "http_worker_died" for e in server.log)


def test_workers_exit_when_their_parent_is_killed() -> None:
    with workers() as server:
        pids = list(worker_pids(server).values())
        assert 2 == len(pids)
        server.kill()
        wait_for(lambda: not any(alive(p) for p in pids), timeout=15)


def test_a_foreign_host_and_a_cross_site_post_are_refused_through_workers() -> None:
    with workers() as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base) as client:
            rebound = client.get("/api/tokens", headers={"Host": "attacker.example"})
            assert (421, "BADHOST") == (rebound.status_code, rebound.json()["error"]["code"])
            cross = client.post(
                "/api/tokens/clear",
                headers={"Origin": "http://evil.example", "Content-Type": "application/json"},
                content=b"{}",
            )
            assert (403, "CROSSSITE") == (cross.status_code, cross.json()["error"]["code"])
            form = client.post(
                "/api/tokens/activate",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                content=b"user_id=a",
            )
            assert (415, "NOTJSON") == (form.status_code, form.json()["error"]["code"])
            assert "DENY" == client.get("/healthz").headers["x-frame-options"]


def test_metrics_count_http_requests_once_and_the_worker_links_not_as_resp() -> None:
    with workers() as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base) as client:
            for user in ("a", "b", "c"):
                assert (
                    200 == client.post("/api/tokens/activate", json={"user_id": user}).status_code
                )
            assert 422 == client.post("/api/tokens/activate", json={"user_id": "a b"}).status_code
            text = client.get("/metrics").text
        # requests executed (a 422 refused before it is executed is an error, not a command)
        assert 3 == metric(text, "tokenpool_commands_total", transport="http")
        assert 1 <= metric(text, "tokenpool_error_replies_total", transport="http")
        assert 4 == metric(
            text, "tokenpool_request_duration_seconds_count", transport="http", command="activate"
        )
        assert 3 == metric(text, "tokenpool_activations_total", pool="default")
        # the workers' connections to the server are neither RESP clients nor commands
        assert 0 == metric(text, "tokenpool_connected_clients", transport="resp")
        assert 0 == metric(text, "tokenpool_commands_total", transport="resp")


def test_rate_limits_and_passwords_count_each_http_client_not_the_worker() -> None:
    with workers("--requirepass", "secret", "--rate-limit", "2", "--rate-limit-burst", "3") as s:
        base = f"http://127.0.0.1:{s.http_port}"
        good = {"Authorization": "Bearer secret"}
        with httpx.Client(base_url=base) as client:
            assert 401 == client.get("/api/tokens").status_code
            wrong = client.get("/api/tokens", headers={"Authorization": "Bearer nope"})
            assert (401, "WRONGPASS") == (wrong.status_code, wrong.json()["error"]["code"])
            codes = [  # X-Forwarded-For is not trusted: one address, one budget
                client.get(
                    "/api/tokens", headers={**good, "X-Forwarded-For": f"10.0.0.{i}"}
                ).status_code
                for i in range(6)
            ]
            assert 429 in codes and 200 in codes
            text = client.get("/metrics").text
        assert 1 == metric(text, "tokenpool_auth_failures_total", transport="http")
        assert 0 == metric(text, "tokenpool_auth_failures_total", transport="resp")
        assert 1 <= metric(text, "tokenpool_rate_limited_total", transport="http")
        assert 0 == metric(text, "tokenpool_rate_limited_total", transport="resp")


def test_events_stream_through_a_worker() -> None:
    with workers("--size", "1") as server:
        base = f"http://127.0.0.1:{server.http_port}"
        with (
            httpx.Client(base_url=base, timeout=10) as client,
            client.stream("GET", "/api/events") as stream,
        ):
            client.post("/api/tokens/activate", json={"user_id": "a"})
            client.post("/api/tokens/activate", json={"user_id": "b"})  # evicts a
            seen: list[str] = []
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    seen.append(line)
                if len(seen) == 3:
                    break
        assert ['"granted"', '"ended"', '"granted"'] == [
            line.split('"kind": ', 1)[1].split(",", 1)[0] for line in seen
        ]


def test_an_event_stream_through_a_worker_ends_when_its_pool_is_dropped() -> None:
    """As in-process: the stream of a dropped pool ends (through a worker it stayed open
    for good, its RESP subscription outliving the pool, and delivered a pool created
    again under the name as if it were the same)."""
    with workers() as server:
        r = redis.Redis(port=server.port, socket_timeout=10)
        r.execute_command("POOL", "CREATE", "gone", "SIZE", "2", "TTL", "60")
        base = f"http://127.0.0.1:{server.http_port}"
        with (
            httpx.Client(base_url=base, timeout=10) as client,
            client.stream("GET", "/api/pools/gone/events") as stream,
        ):
            client.post("/api/pools/gone/tokens/activate", json={"user_id": "a"})
            lines = stream.iter_lines()
            while not next(lines).startswith("data:"):  # the grant: the stream follows
                pass
            r.execute_command("POOL", "DROP", "gone")
            began = time.monotonic()
            rest = list(lines)  # to the end of the response (the client's timeout: 10 s)
            took = time.monotonic() - began
        assert took < 5, f"the stream ended {took:.1f} s after the drop"
        kinds = [line for line in rest if line.startswith("data:")]
        assert 1 == len(kinds) and '"ended"' in kinds[0], rest  # the drop's clear, then the end


@pytest.mark.parametrize("size", [17 * 1024])
def test_a_request_head_past_16_kib_is_refused(size: int) -> None:
    with workers() as server, socket.create_connection(("127.0.0.1", server.http_port or 0)) as s:
        s.settimeout(10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * size)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        assert received.startswith(b"HTTP/1.1 431")


def test_stalled_http_clients_are_dropped_and_never_delay_resp() -> None:
    """300 connections that send half a request head and stop: RESP answers meanwhile,
    and the workers close them once the head's deadline (5 s) passes."""
    with workers() as server:
        stalled = []
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.http_port or 0))
            s.sendall(b"POST /api/tokens/activate HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            stalled.append(s)
        r = redis.Redis(port=server.port, socket_timeout=5)
        worst = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            began = time.monotonic()
            assert r.ping()
            worst = max(worst, time.monotonic() - began)
            time.sleep(0.01)
        assert worst < 0.25
        assert 200 == httpx.get(f"http://127.0.0.1:{server.http_port}/healthz").status_code

        def closed(s: socket.socket) -> bool:
            s.settimeout(0.01)
            try:
                return s.recv(1) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        wait_for(lambda: all(closed(s) for s in stalled), timeout=15)
        for s in stalled:
            s.close()
        r.close()


def test_https_through_workers(tmp_path: Path) -> None:
    """``--tls-cert`` makes the workers' HTTP HTTPS (uvicorn's TLS), as in-process."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with workers("--tls-cert", str(cert_file), "--tls-key", str(key_file)) as server:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with httpx.Client(base_url=f"https://localhost:{server.http_port}", verify=context) as c:
            lease = c.post("/api/tokens/activate", json={"user_id": "tls"})
            assert 200 == lease.status_code
            assert "tls" == lease.json()["data"]["user_id"]


def test_a_reader_that_stops_reading_is_cut_off_past_the_idle_timeout() -> None:
    """An event stream through a worker whose reader never reads: once its responses sit
    unread past --idle-timeout, the worker cuts the connection (as nginx's send_timeout),
    so the request ends and its fd and slot come back before shutdown."""
    with workers("--size", "1", "--idle-timeout", "1") as server:
        base = f"http://127.0.0.1:{server.http_port}"

        def http_clients() -> float:  # requests in progress, this scrape one of them
            with httpx.Client(base_url=base, timeout=10) as api:
                text = api.get("/metrics").text
            return metric(text, "tokenpool_connected_clients", transport="http")

        stuck = socket.create_connection(("127.0.0.1", server.http_port or 0))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # never read
        time.sleep(1.5)
        assert http_clients() >= 2
        r = redis.Redis(port=server.port)
        deadline = time.monotonic() + 60
        seen = http_clients()
        try:
            while time.monotonic() < deadline:
                pipe = r.pipeline(transaction=False)
                for i in range(2_000):  # each evicts: an ended and a granted event
                    pipe.execute_command("ACTIVATE", f"u{i}")
                pipe.execute()
                time.sleep(2.5)  # past --idle-timeout and the figures' age
                seen = http_clients()  # judged once: a second scrape's figures may lag
                if seen <= 1:
                    break
            assert seen <= 1, "the worker kept a reader that stopped reading"
        finally:
            r.close()
            stuck.close()


def test_serve_answers_http_from_workers_by_default() -> None:
    """With no ``--http-workers``, HTTP is served by worker processes, one per core this
    process may use (at most 4); RESP and HTTP both answer."""
    port = free_port()
    server = chaos_server.start("--dsn", "memory", "--http-port", str(port), http_default=True)
    try:
        expected = min(len(os.sched_getaffinity(server.pid)), 4)
        wait_for(lambda: len(worker_pids(server)) == expected)
        lease = httpx.post(f"http://127.0.0.1:{port}/api/tokens/activate", json={"user_id": "a"})
        assert 200 == lease.status_code
        with redis.Redis(port=server.port) as r:
            assert r.execute_command("LEASE", "a")
    finally:
        server.stop()


def test_healthz_through_a_worker_says_whether_the_server_answers() -> None:
    """A worker's ``/healthz`` asks its server: 200 while the server's loop answers, 503
    with the reason while the server is stopped (SIGSTOP: a wedged server), 200 again
    once it runs."""
    with workers() as server:
        base = f"http://127.0.0.1:{server.http_port}"
        assert 200 == httpx.get(f"{base}/healthz").status_code
        os.kill(server.pid, signal.SIGSTOP)
        try:
            down = httpx.get(f"{base}/healthz", timeout=10)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert 503 == down.status_code
        assert "down" == down.json()["status"]
        assert "did not answer a PING" in down.json()["reason"]
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, timeout=10)
        assert 200 == httpx.head(f"{base}/healthz").status_code


def test_a_streamed_listing_gives_its_slot_back_when_its_reader_hangs_up() -> None:
    """A worker has 2 slots for large listings: readers that take a streamed listing's
    first bytes and hang up give theirs back at once (the third, fourth... listing is
    200 without waiting for --idle-timeout)."""
    port = free_port()
    server = chaos_server.start(
        *("--dsn", "memory", "--size", "2000", "--http-port", str(port)),
        *("--http-workers", "1", "--idle-timeout", "30"),
    )
    try:
        with redis.Redis(port=server.port) as r:
            pipe = r.pipeline(transaction=False)
            for n in range(2_000):
                pipe.execute_command("ACTIVATE", f"user-{n}")
            pipe.execute()
        request = b"GET /api/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for _ in range(6):  # three times the slots
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        whole = httpx.get(f"http://127.0.0.1:{port}/api/tokens", timeout=30)
        assert 200 == whole.status_code and 2_000 == len(whole.json()["data"])
        assert time.monotonic() - began < 10  # not a slot's wait for --idle-timeout (30 s)
    finally:
        server.stop()


def _responses(sock: socket.socket, until: float) -> list[bytes]:
    """The status lines of the responses read from ``sock`` until it closes or ``until``."""
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() < until:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", data)


def test_a_pipelined_request_s_body_is_timed_from_its_own_turn() -> None:
    """A request pipelined behind another, its body never sent: the first is answered
    first (its own 200, never a 408 meant for the other), then the second gets 408 within
    --idle-timeout of its turn and the connection closes."""
    with (
        workers("--idle-timeout", "1") as server,
        socket.create_connection(("127.0.0.1", server.http_port or 0), timeout=10) as sock,
    ):
        first = b'{"user_id": "alice"}'
        sock.sendall(
            b"POST /api/tokens/activate HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            b"POST /api/tokens/activate HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 20\r\n\r\n" % (len(first), first)
        )
        started = time.monotonic()
        statuses = _responses(sock, started + 6)
        elapsed = time.monotonic() - started
    assert [b"HTTP/1.1 200 OK", b"HTTP/1.1 408 Request Timeout"] == statuses
    assert elapsed < 4, elapsed


def test_a_pipelined_request_s_body_deadline_starts_when_the_one_before_is_answered() -> None:
    """The request before takes longer than --idle-timeout (an activation waiting for a
    token); the pipelined one's body comes within --idle-timeout of its turn: both are
    answered, in order, with no 408."""
    with workers("--idle-timeout", "1", "--size", "1", "--when-full", "wait") as server:
        port = server.http_port or 0
        base = f"http://127.0.0.1:{port}"
        held = httpx.post(f"{base}/api/tokens/activate", json={"user_id": "holder"}).json()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            slow = b'{"user_id": "bob", "wait": 5}'
            second = b'{"user_id": "bob"}'  # (the lease bob holds by then)
            sock.sendall(
                b"POST /api/tokens/activate HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                b"POST /api/tokens/activate HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (len(slow), slow, len(second))
            )
            time.sleep(1.5)  # the first waits; the second's body is not sent yet
            token = held["data"]["token_id"]
            released = httpx.post(f"{base}/api/tokens/{token}/release", json={"user_id": "holder"})
            assert 200 == released.status_code, released.text
            time.sleep(0.3)
            sock.sendall(second)
            statuses = _responses(sock, time.monotonic() + 3)
    assert [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"] == statuses


async def test_an_unreachable_server_is_503_without_the_private_sockets_path(
    tmp_path: Path,
) -> None:
    """While the server is down (a restart), a worker answers 503 UNAVAILABLE saying so,
    without the path of the private socket it reaches the server through."""
    from tokenpool._commands import ListPools
    from tokenpool._errors import UnavailableError
    from tokenpool._http.remote import open_remote_backend

    path = f"{tmp_path}/private-workers.sock"
    async with open_remote_backend(f"unix://tokenpool-worker:pw@{path}", "default") as backend:
        caller = await backend.caller("127.0.0.1:5", None)
        with pytest.raises(UnavailableError) as raised:
            await backend.execute(ListPools(), caller)
    message = str(raised.value)
    assert "not reachable now" in message and "retry shortly" in message
    assert "private-workers" not in message and str(tmp_path) not in message


def test_a_start_removes_the_private_directories_of_servers_killed_before() -> None:
    """A server killed with SIGKILL leaves its private directory (no cleanup runs); the
    next start removes those of processes gone, and only those: a live process's, one
    holding anything else, and a link are left alone."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as root:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        stale = Path(root, f"tokenpool-{gone.pid}-x1")
        alive = Path(root, f"tokenpool-{os.getpid()}-x2")
        other = Path(root, f"tokenpool-{gone.pid}-x3")
        for made in (stale, alive, other):
            made.mkdir()
            (made / "workers.sock").touch()
        (other / "notes.txt").touch()
        Path(root, f"tokenpool-{gone.pid}-x4").symlink_to(other)
        env = {**os.environ, "TMPDIR": root}
        server = chaos_server.start(
            "--dsn", "memory", "--http-port", str(free_port()), "--http-workers", "1", env=env
        )
        try:
            assert not stale.exists()
        finally:
            assert 0 == server.stop()  # (its own directory removed: a clean stop)
        left = {p.name for p in Path(root).iterdir()}
        assert {alive.name, other.name, f"tokenpool-{gone.pid}-x4"} == left
        assert (other / "notes.txt").exists() and (other / "workers.sock").exists()
