"""The RESP server over real sockets, with real clients (redis-py, redis-cli, raw bytes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

import tokenpool
from tests.chaos import server as chaos_server
from tokenpool._commands import CommandSettings
from tokenpool._resp import encode_command
from tokenpool._server import RespServer, RespSettings

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def running(
    size: int = 5,
    ttl: float = 60,
    ssl_context: ssl.SSLContext | None = None,
    password: str | None = None,
    admin_password: str | None = None,
    auth_delay: float = 0.1,
    auth_rate: float = 10.0,
    auth_burst: int = 20,
    name: str = "default",
    **settings: Any,
) -> AsyncIterator[tuple[RespServer, int]]:
    async with tokenpool.open_pools(
        declared={name: tokenpool.PoolSettings(size=size, ttl=ttl)}
    ) as pools:
        commands = CommandSettings(
            password=password,
            admin_password=admin_password,
            auth_delay=auth_delay,
            auth_rate=auth_rate,
            auth_burst=auth_burst,
            default_pool=name,
        )
        server = RespServer(
            pools,
            RespSettings(port=0, commands=commands, **settings),
            ssl_context=ssl_context,
            config={"size": str(size)},
        )
        async with trio.open_nursery() as nursery:
            (port, *_) = await nursery.start(server.serve)
            yield server, port
            server.shutdown()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


def client(port: int, protocol: int = 2, **kw: Any) -> redis.Redis:
    """A redis-py client that fails at once instead of retrying (the tests want the error)."""
    return redis.Redis(
        port=port, protocol=protocol, decode_responses=True, retry=Retry(NoBackoff(), 0), **kw
    )


async def read_until(stream: trio.abc.Stream, marker: bytes, data: bytes = b"") -> bytes:
    """Receive (after ``data``, what came already) until ``marker`` is in what came."""
    while marker not in data:
        data += await stream.receive_some(65536)
    return data


async def raw(port: int, payload: bytes, *, read_until_close: bool = False) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        data = b""
        with trio.move_on_after(2):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
                if not read_until_close and data.endswith(b"\r\n"):
                    break
    return data


def as_dict(reply: Any) -> dict[str, Any]:
    """A field/value reply as a dict, whether it came as a RESP3 map or a RESP2 flat array."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


@pytest.mark.parametrize("protocol", [2, 3])
async def test_every_command_through_redis_py(protocol: int) -> None:
    async with running(size=3) as (_server, port):

        def scenario() -> None:
            r = client(port, protocol)
            assert r.ping()
            lease = as_dict(r.execute_command("ACTIVATE", "alice"))
            fields = {"id", "token_id", "user_id", "fence", "activated_at", "expires_at"}
            assert fields | {"revision"} == set(lease)
            assert "alice" == lease["user_id"] and lease["expires_at"].endswith("Z")
            held = {k: v for k, v in lease.items() if k != "revision"}
            assert held == as_dict(r.execute_command("LEASE", "alice"))
            assert r.execute_command("LEASE", "nobody") is None
            token = as_dict(r.execute_command("TOKEN", lease["token_id"]))
            assert ("active", "alice") == (token["status"], token["current_user_id"])
            tokens = [as_dict(t) for t in r.execute_command("TOKENS")]
            assert 3 == len(tokens) and {"", "alice"} == {t["current_user_id"] for t in tokens}
            assert 1 == r.execute_command("VALIDATE", lease["token_id"], lease["id"])
            renewed = as_dict(r.execute_command("RENEW", lease["token_id"], lease["id"]))
            assert renewed["expires_at"] >= lease["expires_at"]
            # Mutating replies carry the revision that applied them.
            assert lease["fence"] == lease["revision"]
            assert renewed["revision"] == lease["revision"] + 1
            assert renewed["revision"] + 1 == r.execute_command(
                "RELEASE", lease["token_id"], "alice"
            )
            assert 0 == r.execute_command("VALIDATE", lease["token_id"], lease["id"])
            cursor, entries = r.execute_command("HISTORY", lease["token_id"], "LIMIT", "5")
            (usage,) = [as_dict(u) for u in entries]
            assert (lease["id"], "released", "0") == (usage["id"], usage["reason"], cursor)
            assert usage["revision"] == renewed["revision"] + 1
            cursor, entries = r.execute_command("USERHISTORY", "alice")
            assert [usage["id"]] == [as_dict(u)["id"] for u in entries]
            bob = as_dict(r.execute_command("ACTIVATE", "bob"))
            assert {"cleared": 1, "revision": bob["revision"] + 1} == as_dict(
                r.execute_command("CLEAR")
            )
            stats = as_dict(r.execute_command("STATS"))
            assert (2, 1, 1) == (stats["activations"], stats["releases"], stats["clears"])
            info = r.info()  # redis-py parses the INFO text format
            assert (2, 3, "memory") == (info["activations"], info["size"], info["store"])
            assert 2 == r.info("pool")["activations"]
            assert {"size": "3"} == as_dict(r.execute_command("CONFIG", "GET", "*"))
            assert ["default"] == r.execute_command("POOL", "LIST")
            assert {} == as_dict(r.execute_command("CONFIG", "GET", "save"))
            assert 3 == r.execute_command("DBSIZE")  # the keys SCAN walks: the tokens
            assert r.execute_command("SELECT", "0")
            assert r.client_setname("me") and "me" == r.client_getname()
            assert isinstance(r.client_id(), int)
            assert "x" == r.echo("x")

        await in_thread(scenario)


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (["NOSUCH", "x"], "unknown command 'NOSUCH'"),
        (["ACTIVATE"], "wrong number of arguments for 'activate' command"),
        (["ACTIVATE", "a b"], "INVALID"),
        (["TOKEN", "not-a-uuid"], "INVALID"),
        (["TOKEN", "00000000-0000-4000-8000-000000000000"], "UNKNOWN"),
        (["HISTORY", "00000000-0000-4000-8000-000000000000", "LIMIT", "x"], "INVALID"),
        (["HISTORY", "00000000-0000-4000-8000-000000000000", "LIMIT", "²"], "INVALID"),
        (["HISTORY", "00000000-0000-4000-8000-000000000000", "LIMIT", "9" * 5000], "INVALID"),
        (["HISTORY", "00000000-0000-4000-8000-000000000000", "LIMIT", "٣"], "INVALID"),
        (["HISTORY", "00000000-0000-4000-8000-000000000000", "LIMIT", "1_0"], "INVALID"),
        (["HISTORY", "00000000-0000-4000-8000-000000000000", "BEFORE", "-1"], "INVALID"),
        (["ACTIVATE", "a", "WAIT", "inf"], "INVALID"),
        (["TP.ACTIVATE", "nope", "alice"], "UNKNOWN"),
        (["TP.ACTIVATE", "a/b", "alice"], "UNKNOWN"),
        (["POOL", "USE", "default"], "POOL USE is gone"),
        (["POOL", "CREATE", "a/b", "SIZE", "1", "TTL", "1"], "INVALID"),
        (["POOL", "CREATE", "x", "SIZE", "0", "TTL", "1"], "INVALID"),
        (["POOL", "CREATE", "default", "SIZE", "1", "TTL", "1"], "EXISTS"),
        (["EXEC"], "EXEC without MULTI"),
        (["AUTH", "pw"], "without any password configured"),
        (["CONFIG", "SET", "size", "5"], "not supported"),
        (["SELECT", "1"], "out of range"),
        (["HELLO", "4"], "NOPROTO"),
    ],
)
async def test_errors_name_what_was_wrong_and_keep_the_connection(
    command: list[str], code: str
) -> None:
    async with running() as (_server, port):

        def scenario() -> None:
            r = client(port)
            with pytest.raises(redis.RedisError, match=code):
                r.execute_command(*command)
            assert r.ping()  # same connection still served

        await in_thread(scenario)


async def test_a_wrong_subcommand_is_redis_err_and_names_what_was_wrong() -> None:
    """Redis answers ERR to an unknown subcommand or a wrong count in every family; a
    client name is printable ASCII without spaces (it would split a line listing
    clients); COMMAND LIST FILTERBY filters."""
    async with running() as (_server, port):
        for command in (b"POOL DROP", b"POOL INFO a b", b"POOL NOSUCH", b"CLIENT NOSUCH"):
            reply = await raw(port, command + b"\r\n")
            assert reply.startswith(b"-ERR unknown subcommand or wrong number"), (command, reply)

        def scenario() -> None:
            r = client(port)
            for name in ("a b", "a\nb", "caf\u00e9", "x" * 129):
                with pytest.raises(redis.ResponseError, match=r"[Cc]lient name"):
                    r.client_setname(name)
                with pytest.raises(redis.ResponseError, match=r"[Cc]lient name"):
                    r.execute_command("HELLO", "2", "SETNAME", name)
            assert r.client_getname() is None  # nothing refused was kept
            assert r.client_setname("worker-7:" + "x" * 119)
            assert "worker-7:" + "x" * 119 == r.client_getname()
            listed = r.command_list(pattern="tp.*")
            assert listed and all(name.startswith("tp.") for name in listed)
            assert "tp.activate" in listed and "ping" not in listed
            assert [] == r.command_list(module="json")
            assert len(r.command_list()) > len(listed)

        # (raw: redis-py's reply callback would parse COMMAND's error as a list)
        reply = await raw(port, b"COMMAND LIST FILTERBY NAME x\r\n")
        assert reply.startswith(b"-ERR COMMAND LIST FILTERBY takes MODULE, ACLCAT or PATTERN")

        await in_thread(scenario)


async def test_holder_errors() -> None:
    async with running(size=1) as (_server, port):

        def scenario() -> None:
            r = client(port)
            lease = as_dict(r.execute_command("ACTIVATE", "a"))
            with pytest.raises(redis.ResponseError, match=r"^NOTHOLDER"):
                r.execute_command("RELEASE", lease["token_id"], "b")
            r.execute_command("RELEASE", lease["token_id"])
            with pytest.raises(redis.ResponseError, match=r"^NOTACTIVE"):
                r.execute_command("RELEASE", lease["token_id"])
            with pytest.raises(redis.ResponseError, match=r"^NOTHOLDER"):
                r.execute_command("RENEW", lease["token_id"], lease["id"])

        await in_thread(scenario)


async def test_info_counts_every_error_reply() -> None:
    """Benchmarks read total_error_replies to tell refusals from served requests."""
    async with running(size=1) as (_server, port):

        def scenario() -> None:
            r = client(port)
            for command in (["NOSUCH"], ["ACTIVATE", "a b"], ["RELEASE", str(uuid.uuid4())]):
                with pytest.raises(redis.ResponseError):
                    r.execute_command(*command)
            r.execute_command("ACTIVATE", "a")
            assert 3 == r.info("stats")["total_error_replies"]

        await in_thread(scenario)


async def test_a_pipeline_is_one_trip_through_the_actor() -> None:
    async with running(size=10) as (server, port):
        before = server.pools.get("default").statistics().actor.requests
        payload = b"".join(b"ACTIVATE user-%d\r\n" % i for i in range(100)) + b"PING\r\n"
        reply = await raw(port, payload)
        assert 100 == reply.count(b"$7\r\nuser_id\r\n")
        assert reply.endswith(b"+PONG\r\n")
        assert 1 == server.pools.get("default").statistics().actor.requests - before


async def test_pipelined_hello_and_auth_take_effect_in_order() -> None:
    async with running(password="s3cret") as (_server, port):
        reply = await raw(
            port,
            b"ACTIVATE a\r\nAUTH wrong\r\nAUTH s3cret\r\nHELLO 3\r\nLEASE nobody\r\nQUIT\r\n",
            read_until_close=True,
        )
        assert reply.startswith(b"-NOAUTH ")
        assert b"-WRONGPASS " in reply
        assert b"+OK\r\n%7\r\n" in reply  # AUTH ok, then HELLO's reply as a RESP3 map
        assert reply.endswith(b"_\r\n+OK\r\n")  # RESP3 null after HELLO 3, then QUIT's OK


@pytest.mark.parametrize("protocol", [2, 3])
async def test_password_through_redis_py(protocol: int) -> None:
    async with running(password="s3cret") as (_server, port):

        def scenario() -> None:
            with pytest.raises(redis.AuthenticationError):
                client(port, protocol, password="wrong").ping()
            with pytest.raises(redis.RedisError, match=r"Authentication required|authenticated"):
                client(port, protocol).execute_command("ACTIVATE", "a")
            r = client(port, protocol, password="s3cret")  # RESP3: HELLO 3 AUTH default s3cret
            assert "a" == as_dict(r.execute_command("ACTIVATE", "a"))["user_id"]

        await in_thread(scenario)


async def test_tls() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    async with running(ssl_context=server_ctx, idle_timeout=1) as (_server, port):

        def scenario() -> None:
            with ca.cert_pem.tempfile() as ca_file:
                r = client(port, ssl=True, ssl_ca_certs=ca_file)
                assert "a" == as_dict(r.execute_command("ACTIVATE", "a"))["user_id"]
            with pytest.raises(redis.ConnectionError):
                client(port, ssl=True).ping()  # untrusted: the default CAs do not know ours
            with pytest.raises(redis.ConnectionError):
                client(port, socket_timeout=3).ping()  # plaintext to a TLS port

        await in_thread(scenario)


async def test_a_slow_tls_handshake_is_cut_off() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    async with running(ssl_context=server_ctx, idle_timeout=0.5) as (_server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        await stream.send_all(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        with trio.fail_after(5):
            while await stream.receive_some(100):
                pass
        assert trio.current_time() - started < 3
        await stream.aclose()


async def test_quit_closes_after_ok() -> None:
    async with running() as (_server, port):
        assert b"+PONG\r\n$2\r\nhi\r\n+OK\r\n" == await raw(
            port, b"PING\r\nPING hi\r\nQUIT\r\nPING\r\n", read_until_close=True
        )


async def test_many_concurrent_clients() -> None:
    async with running(size=50) as (server, port):
        replies: list[bytes] = []

        async def one(i: int) -> None:
            replies.append(await raw(port, b"ACTIVATE u%d\r\n" % i))

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
        assert 300 == sum(1 for r in replies if b"user_id" in r)
        stats = await server.pools.get("default").stats()
        assert (300, 50) == (stats.activations, stats.active)


@pytest.mark.parametrize(
    "garbage",
    [
        b"*3\r\n$3\r\nSET\r\n:1\r\n",
        b"*1\r\n$-7\r\n",
        b"*1\r\n$2\r\n\xff\xfe\r\n",
        b"*99999999\r\n",
        b"\x00\x01\x02" * 30000,
    ],
)
async def test_protocol_errors_close_only_that_connection(garbage: bytes) -> None:
    async with running() as (_server, port):
        other = await trio.open_tcp_stream("127.0.0.1", port)
        reply = await raw(port, garbage, read_until_close=True)
        assert reply.startswith(b"-ERR Protocol error: ")
        await other.send_all(b"PING\r\n")
        assert b"+PONG\r\n" == await other.receive_some(100)
        await other.aclose()


async def test_http_on_the_resp_port_is_refused_without_harm() -> None:
    async with running() as (_server, port):
        reply = await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", read_until_close=True)
        assert reply.startswith(b"-ERR unknown command 'GET'")
        assert b"+PONG\r\n" == await raw(port, b"PING\r\n")
        # A cross-protocol POST (a form aimed at the port) ends at its first line, before
        # the command its body smuggles runs, and the connection is closed.
        form = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nFLUSH\r\n"
        reply = await raw(port, form, read_until_close=True)
        assert reply.endswith(b"-ERR Protocol error: an HTTP request on the RESP port\r\n")
        assert b"FLUSH" not in reply
        assert b"+PONG\r\n" == await raw(port, b"PING\r\n")


async def test_a_stalled_half_command_is_dropped_after_the_idle_timeout() -> None:
    async with running(idle_timeout=0.3) as (_server, port):
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        reply = await raw(port, b"*2\r\n$8\r\nACTIVATE\r\n", read_until_close=True)
        assert b"" == reply
        assert trio.current_time() - started < 1.5
        await trio.sleep(0.5)
        await idle.send_all(b"PING\r\n")  # an idle connection with nothing pending stays
        assert b"+PONG\r\n" == await idle.receive_some(100)
        await idle.aclose()


async def test_a_half_command_after_a_reply_is_dropped_after_the_idle_timeout() -> None:
    """A half command, then its rest with the start of another: the reply to the first
    must not lift the deadline of the second (a reply resets the write's deadline)."""
    async with running(idle_timeout=0.5) as (_server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"*1\r\n$4\r\nPI")
        await trio.sleep(0.2)  # the server saw the half command: its deadline is armed
        await stream.send_all(b"NG\r\n*1\r\n$4\r\nPI")  # the rest, and half of another
        assert b"+PONG\r\n" == await stream.receive_some(100)
        with trio.fail_after(3):  # then nothing more: dropped within the idle timeout
            assert b"" == await stream.receive_some(100)
        await stream.aclose()


async def test_max_clients() -> None:
    async with running(max_clients=2) as (_server, port):
        a = await trio.open_tcp_stream("127.0.0.1", port)
        b = await trio.open_tcp_stream("127.0.0.1", port)
        await a.send_all(b"PING\r\n")
        await a.receive_some(10)
        await b.send_all(b"PING\r\n")
        await b.receive_some(10)
        assert b"-ERR max number of clients reached\r\n" == await raw(
            port, b"", read_until_close=True
        )
        await a.aclose()
        await trio.sleep(0.05)
        assert b"+PONG\r\n" == await raw(port, b"PING\r\n")
        await b.aclose()


async def test_a_client_that_never_reads_is_dropped() -> None:
    async with running(size=100, idle_timeout=0.5) as (server, port):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sent = 0
        with trio.move_on_after(5):
            while True:
                try:
                    sent += sock.send(b"TOKENS\r\n" * 100)
                except BlockingIOError:
                    await trio.sleep(0.01)
                except OSError:
                    break  # the server closed it
                if server.clients == 0:
                    break
        assert 0 == server.clients
        sock.close()


# -- the real process, as a user starts it -----------------------------------


def start_server(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tokenpool", "serve", "--port", "0", "--http-port", "0"),
            *("--log-format", "json", *args),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line)
        if event["event"] == "listening":
            return proc, int(event["ports"][0])
        if event.get("level") == "error":
            proc.kill()
            proc.communicate()
            raise AssertionError(line)
    proc.communicate()
    raise AssertionError(f"the server exited: {proc.returncode}")


def stop_server(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=15)  # drains and closes stderr
    return proc.returncode


def test_end_to_end_subprocess_sigterm_keeps_everything(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/pool.db"
    proc, port = start_server("--dsn", store, "--size", "3")
    try:
        r = client(port)
        granted = [as_dict(r.execute_command("ACTIVATE", f"u{i}")) for i in range(5)]
        leases = [{k: v for k, v in g.items() if k != "revision"} for g in granted]
        r.close()
    finally:
        assert 0 == stop_server(proc)
    proc, port = start_server("--dsn", store, "--size", "3")
    try:
        r = client(port)
        for lease in leases[2:]:
            assert lease == as_dict(r.execute_command("LEASE", lease["user_id"]))
        stats = as_dict(r.execute_command("STATS"))
        assert (5, 2, "sqlite") == (stats["activations"], stats["evictions"], stats["store"])
        r.close()
    finally:
        assert 0 == stop_server(proc)


@pytest.mark.skipif(
    shutil.which("redis-cli") is None and os.environ.get("CI") != "true",
    reason="redis-cli is not installed",
)
def test_redis_cli(tmp_path: Path) -> None:
    proc, port = start_server("--dsn", "memory", "--requirepass", "pw")
    try:
        cli = ["redis-cli", "-p", str(port), "--no-auth-warning", "-a", "pw"]
        out = subprocess.run(
            [*cli, "ACTIVATE", "carol"], capture_output=True, text=True, check=True
        )
        assert "carol" in out.stdout.split("\n")
        info = subprocess.run([*cli, "INFO"], capture_output=True, text=True, check=True)
        assert "activations:1" in info.stdout
        wrong = subprocess.run(
            ["redis-cli", "-p", str(port), "ACTIVATE", "x"], capture_output=True, text=True
        )
        assert "NOAUTH" in wrong.stdout + wrong.stderr
        # Commands on its standard input, as typed at its prompt: redis-cli first reads
        # COMMAND DOCS for its hints, and aborts if a flag is not a simple string.
        for extra in ([], ["-c"]):
            typed = subprocess.run(
                [*cli, *extra],
                input="PING\nTP.ACTIVATE default dave\nTP.LEASE default dave\n",
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert 0 == typed.returncode, typed.stderr
            assert "PONG" in typed.stdout and typed.stdout.count("dave") == 2, typed.stdout
    finally:
        assert 0 == stop_server(proc)


def test_no_password_ever_reaches_the_log() -> None:
    """Neither the configured password nor a wrong guess appears in any log line."""
    with chaos_server.running(
        "--dsn", "memory", env={"TOKENPOOL_PASSWORD": "s3cret-Pw-9"}
    ) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"AUTH guess-Pw-123\r\n")
            assert sock.recv(100).startswith(b"-WRONGPASS")
            sock.sendall(b"AUTH s3cret-Pw-9\r\n")
            assert b"+OK\r\n" == sock.recv(100)
        assert 0 == server.stop()
    text = json.dumps(server.log)
    assert "auth_failed" in text
    assert "s3cret-Pw-9" not in text and "guess-Pw-123" not in text


async def test_failed_auth_attempts_are_slowed() -> None:
    async with running(password="pw", auth_delay=0.2) as (_server, port):

        def scenario() -> float:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                started = time.monotonic()
                for _ in range(3):
                    sock.sendall(b"AUTH wrong\r\n")
                    assert sock.recv(100).startswith(b"-WRONGPASS")
                return time.monotonic() - started

        assert await in_thread(scenario) >= 3 * 0.2


def test_non_loopback_bind_without_password_is_refused() -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "tokenpool", "serve", "--host", "0.0.0.0", "--dsn", "memory"),
            *("--http-port", "0"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 2 == out.returncode
    assert "--requirepass" in out.stderr


# -- hardening: cost before work, order, auth, secrets ---------------------------------


async def worst_ping(port: int, rounds: int, pause: float) -> float:
    """The slowest of ``rounds`` PINGs on a connection of its own, ``pause`` apart."""
    worst = 0.0
    other = await trio.open_tcp_stream("127.0.0.1", port)
    async with other:
        for _ in range(rounds):
            started = trio.current_time()
            await other.send_all(b"PING\r\n")
            assert b"+PONG\r\n" == await other.receive_some(100)
            worst = max(worst, trio.current_time() - started)
            await trio.sleep(pause)
    return worst


async def test_a_flood_of_large_replies_never_stalls_another_client() -> None:
    """The hardening issue's defect 1: 1,024 TOKENS on a pool of 10,000 in one small
    pipeline, from a client that reads slowly; another client's PING stays quick."""
    async with running(size=10_000, idle_timeout=20) as (_server, port):
        flood = await trio.open_tcp_stream("127.0.0.1", port)
        await flood.send_all(b"TOKENS\r\n" * 1024)
        received = 0
        async with trio.open_nursery() as nursery:

            async def slow_reader() -> None:
                nonlocal received
                while received < 30_000_000:
                    chunk = await flood.receive_some(65536)
                    if not chunk:
                        return
                    received += len(chunk)
                    await trio.sleep(0.001)

            nursery.start_soon(slow_reader)
            worst = await worst_ping(port, 40, 0.02)
            nursery.cancel_scope.cancel()
        await flood.aclose()
    assert received > 1_000_000  # the flood was being served meanwhile
    assert worst < 0.1, f"a PING waited {worst * 1000:.0f} ms behind the flood"


async def test_a_client_that_keeps_its_pipe_full_never_stalls_another() -> None:
    """A connection's bytes are read at once when they are there already (no wait, no
    stream layers), yet the loop still gets its turns: a client whose pipe is never empty
    (PINGs sent and replies drained by threads) does not hold another client up."""
    async with running(size=10) as (_server, port):
        stop = threading.Event()
        answered = 0
        flood = socket.create_connection(("127.0.0.1", port))
        flood.settimeout(10)

        def send() -> None:
            with suppress(OSError):  # the socket is shut down at the end
                while not stop.is_set():
                    flood.sendall(b"PING\r\n" * 64)

        def drain() -> None:
            nonlocal answered
            with suppress(OSError):
                while not stop.is_set():
                    answered += flood.recv(1 << 20).count(b"+PONG")

        threads = [threading.Thread(target=send), threading.Thread(target=drain)]
        for thread in threads:
            thread.start()
        try:
            await trio.sleep(0.2)
            worst = await worst_ping(port, 20, 0.01)
        finally:
            stop.set()
            flood.shutdown(socket.SHUT_RDWR)
            for thread in threads:
                await trio.to_thread.run_sync(thread.join)
            flood.close()
    assert answered > 10_000  # the flood was being served meanwhile
    assert worst < 0.1, f"a PING waited {worst * 1000:.0f} ms behind a full pipe"


async def test_a_transaction_is_bounded_before_it_runs() -> None:
    """MULTI/EXEC (redis-py's default pipeline) must not get round defect 1's bounds:
    an EXEC whose replies would be too large is refused before any of it runs, and a
    MULTI queues a bounded number of commands."""
    async with running(size=10_000, idle_timeout=20) as (server, port):

        def scenario() -> None:
            r = client(port)
            pipe = r.pipeline()
            pipe.execute_command("ACTIVATE", "a")
            for _ in range(64):
                pipe.execute_command("TOKENS")
            with pytest.raises(redis.exceptions.ExecAbortError, match=r"at most 262,144"):
                pipe.execute()
            assert r.execute_command("LEASE", "a") is None  # nothing of it ran
            pipe = r.pipeline()
            for _ in range(1025):
                pipe.execute_command("PING")
            with pytest.raises(redis.ResponseError, match=r"at most 1024 commands|EXECABORT"):
                pipe.execute()
            pipe = r.pipeline()  # a paged listing fits
            pipe.execute_command("TOKENS", "CURSOR", "0", "COUNT", "100")
            pipe.execute_command("ACTIVATE", "b")
            (cursor, page), lease = pipe.execute()
            assert cursor != "0"
            assert 100 == len(page) and as_dict(lease)["user_id"] == "b"

        await in_thread(scenario)
        assert 1 == server.pools.get("default").statistics().stats.active


async def test_tokens_of_a_huge_pool_is_refused_and_pages_instead() -> None:
    async with running(size=20_000) as (_server, port):

        def scenario() -> None:
            r = client(port)
            with pytest.raises(redis.ResponseError, match="page with TOKENS CURSOR"):
                r.execute_command("TOKENS")
            seen: list[str] = []
            cursor = "0"
            while True:
                cursor, page = r.execute_command("TOKENS", "CURSOR", cursor, "COUNT", "1000")
                seen += [as_dict(t)["id"] for t in page]
                if cursor == "0":
                    break
            assert 20_000 == len(set(seen))
            assert 20_000 == sum(1 for _ in r.scan_iter(count=1000))  # redis-cli --scan works

        await in_thread(scenario)


async def test_every_reply_in_a_pipeline_reflects_the_state_at_its_place() -> None:
    """The hardening issue's defect 5: HISTORY, TOKEN, ACTIVATE bob on a pool of one
    token held by alice: neither read may see bob's eviction of alice."""
    async with running(size=1) as (_server, port):

        def scenario() -> None:
            r = client(port)
            alice = as_dict(r.execute_command("ACTIVATE", "alice"))
            pipe = r.pipeline(transaction=False)
            pipe.execute_command("HISTORY", alice["token_id"])
            pipe.execute_command("TOKEN", alice["token_id"])
            pipe.execute_command("ACTIVATE", "bob")
            pipe.execute_command("HISTORY", alice["token_id"])
            history, token, bob, after = pipe.execute()
            assert ["0", []] == history
            assert "alice" == as_dict(token)["current_user_id"]
            assert "bob" == as_dict(bob)["user_id"]
            assert ["alice"] == [as_dict(u)["user_id"] for u in after[1]]

        await in_thread(scenario)


async def test_every_failed_auth_in_a_pipeline_is_slowed() -> None:
    """The hardening issue's defect 6: a pipeline of wrong passwords is answered one
    attempt per delay, not all at once."""
    async with running(password="pw", auth_delay=0.05, auth_rate=1000, auth_burst=1000) as (
        _server,
        port,
    ):
        started = trio.current_time()
        reply = await raw(port, b"AUTH wrong\r\n" * 20 + b"PING\r\n", read_until_close=False)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"AUTH wrong\r\n" * 20 + b"AUTH pw\r\nPING\r\n")
            data = b""
            while not data.endswith(b"+PONG\r\n"):
                data += await stream.receive_some(65536)
            await stream.aclose()
        assert 20 == data.count(b"-WRONGPASS")
        assert trio.current_time() - started >= 20 * 0.05
        del reply


async def test_guesses_are_bounded_per_client_address_not_per_connection() -> None:
    async with running(password="pw", auth_delay=0.0, auth_rate=1, auth_burst=5) as (server, port):

        async def guess(n: int) -> bytes:
            return await raw(port, b"AUTH guess-%d\r\n" % n)

        replies = [await guess(n) for n in range(10)]
        assert all(r.startswith(b"-WRONGPASS") for r in replies)
        # Past the address's budget even the right password is not checked for a while.
        assert (await raw(port, b"AUTH pw\r\n")).startswith(b"-WRONGPASS")
        assert server.commands.gate.auth_failures["resp"] >= 10


def test_secrets_never_show_in_config_or_info() -> None:
    """The hardening issue's defect 7: the DSN's password and the AUTH password."""
    dsn = "postgresql://user:hunter2@127.0.0.1:1/db?password=hunter3&connect_timeout=1"
    from tokenpool._store import redact

    shown = redact(dsn)
    assert "hunter" not in shown and "127.0.0.1:1" in shown and "user@" in shown
    assert "***" in redact("host=db password=hunter2 user=x")
    assert "hunter2" not in redact("host=db password=hunter2 user=x")


def test_a_store_falling_behind_slows_activations_before_refusing_them(tmp_path: Path) -> None:
    """A write stall: past half of ``max_backlog`` the server delays activations (longer
    as the backlog grows), counted in INFO; a full backlog is still refused at once."""
    args = ("--dsn", f"sqlite:///{tmp_path}/stall.db", "--size", "100", "--max-backlog", "20")
    with chaos_server.running(*args) as server:
        client = redis.Redis(port=server.port)
        client.execute_command("ACTIVATE", "warm")
        while int(client.info("persistence")["backlog"]):
            time.sleep(0.01)
        store = server.store_pid
        assert store is not None
        os.kill(store, signal.SIGSTOP)  # the store stops taking writes: the backlog grows
        try:
            took: list[float] = []
            refusal = ""
            for i in range(40):
                began = time.monotonic()
                try:
                    client.execute_command("ACTIVATE", f"user-{i}")
                except redis.ResponseError as error:
                    refusal = str(error)
                    break
                took.append(time.monotonic() - began)
            info = client.info("persistence")
        finally:
            os.kill(store, signal.SIGCONT)
        assert refusal.startswith("UNAVAILABLE"), refusal
        stalls, stalled = int(info["write_stalls"]), float(info["write_stall_seconds"])
        # backlog 11 to 19 is stalled, 10 to 90 ms each (a refusal for lost ownership may
        # come first: the store process also stopped proving it owns the store)
        assert 3 <= stalls <= 9 and stalled >= 0.02, info
        assert max(took[:9]) < 0.05 <= max(took[10:]), took
        assert sum(took[10:]) >= stalled * 0.9
        assert 0 == server.stop()


def test_a_store_password_never_shows_in_config_info_or_the_log(pg_url: str) -> None:
    """End to end: a real server on PostgreSQL (trust auth takes any password) given a
    DSN with a password in both places a URL can hold one."""
    assert "postgres@" in pg_url
    dsn = pg_url.replace("postgres@", "postgres:hunter2@", 1) + "&password=hunter3"
    with chaos_server.running("--dsn", dsn) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"CONFIG GET store\r\nCONFIG GET *\r\nINFO\r\n")
            data = b""
            while data.count(b"\r\n\r\n") < 1 or b"# Server" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert b"store" in data and b"postgres@" in data
        assert b"hunter" not in data
        assert 0 == server.stop()
        assert not any("hunter" in str(event) for event in server.log)


def test_a_password_from_the_environment_is_not_on_the_command_line(tmp_path: Path) -> None:
    with chaos_server.running("--dsn", "memory", env={"TOKENPOOL_PASSWORD": "env-Pw-7"}) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100).startswith(b"-NOAUTH")
            sock.sendall(b"AUTH env-Pw-7\r\nCONFIG GET *\r\n")
            data = sock.recv(65536)
            assert data.startswith(b"+OK") and b"env-Pw-7" not in data
            cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
            assert b"env-Pw-7" not in cmdline
        assert 0 == server.stop()


async def test_multi_exec_is_one_atomic_batch_as_redis_py_sends_it() -> None:
    async with running(size=1) as (server, port):

        def scenario() -> None:
            r = client(port)
            pipe = r.pipeline()  # redis-py's default: MULTI ... EXEC
            pipe.execute_command("ACTIVATE", "a")
            pipe.execute_command("ACTIVATE", "b")
            pipe.execute_command("LEASE", "a")
            a, b, a_after = pipe.execute()
            assert as_dict(a)["token_id"] == as_dict(b)["token_id"]
            assert a_after is None
            with pytest.raises(redis.ResponseError, match=r"EXECABORT|wrong number of arguments"):
                bad = r.pipeline()
                bad.execute_command("ACTIVATE")  # wrong arity: queued with an error
                bad.execute_command("ACTIVATE", "c")
                bad.execute()
            assert r.execute_command("LEASE", "c") is None  # nothing of it ran

        before = server.pools.get("default").statistics().actor.requests
        await in_thread(scenario)
        assert server.pools.get("default").statistics().actor.requests - before <= 4

        reply = await raw(port, b"MULTI\r\nACTIVATE x\r\nDISCARD\r\nLEASE x\r\n")
        assert reply == b"+OK\r\n+QUEUED\r\n+OK\r\n$-1\r\n"


async def test_any_command_refused_while_queuing_aborts_the_transaction() -> None:
    """Not only a wrong arity: a bad argument, a command the user may not run, each
    refused while queuing makes EXEC answer EXECABORT, and nothing queued runs (an
    ACTIVATE queued before them was granted). INFO inside MULTI is answered at EXEC
    (it once closed the connection); RESET inside MULTI discards the transaction."""
    async with running(size=3, admin_password="root") as (_server, port):

        def scenario() -> None:
            r = client(port)
            for bad in (
                ("TP.ACTIVATE", "default", "b1", "WAIT", "-1"),  # an argument out of range
                ("TP.ACTIVATE", "default", "b2", "WAIT"),  # an option without its value
                ("TP.CLEAR", "default"),  # NOPERM: not the admin
            ):
                pipe = r.pipeline()  # MULTI ... EXEC
                pipe.execute_command("TP.ACTIVATE", "default", "queued")
                pipe.execute_command(*bad)
                with pytest.raises(redis.ResponseError):  # (redis-py names the first error)
                    pipe.execute()
                assert r.execute_command("TP.LEASE", "default", "queued") is None, bad
            pipe = r.pipeline()
            pipe.execute_command("INFO", "server")
            pipe.execute_command("TP.ACTIVATE", "default", "x")
            info, lease = pipe.execute()
            assert "tokenpool_version" in str(info) or "redis_version" in str(info)
            assert "x" == as_dict(lease)["user_id"]

        await in_thread(scenario)
        reply = await raw(
            port,
            b"MULTI\r\nTP.ACTIVATE default y\r\nRESET\r\nEXEC\r\nTP.LEASE default y\r\nQUIT\r\n",
            read_until_close=True,
        )
        assert b"+OK\r\n+QUEUED\r\n+RESET\r\n-ERR EXEC without MULTI\r\n$-1\r\n+OK\r\n" == reply
        reply = await raw(
            port,
            b"MULTI\r\nTP.ACTIVATE default z\r\nTP.CLEAR default\r\nEXEC\r\nQUIT\r\n",
            read_until_close=True,
        )
        assert reply.startswith(b"+OK\r\n+QUEUED\r\n-NOPERM ") and reply.endswith(
            b"-EXECABORT Transaction discarded because of previous errors.\r\n+OK\r\n"
        )


async def test_commands_without_a_pool_use_the_flags_pool_and_reset_ends_admin() -> None:
    async with running(size=2, name="gpu", admin_password="root") as (_server, port):

        def scenario() -> None:
            r = client(port)
            assert "a" == as_dict(r.execute_command("ACTIVATE", "a"))["user_id"]
            assert r.execute_command("AUTH", "admin", "root")
            assert "OK" == r.execute_command("POOL", "CREATE", "x", "SIZE", "1", "TTL", "5")
            assert "b" == as_dict(r.execute_command("TP.ACTIVATE", "x", "b"))["user_id"]
            assert r.execute_command("LEASE", "b") is None  # not in gpu: the command names x
            assert "RESET" == r.execute_command("RESET")
            assert as_dict(r.execute_command("LEASE", "a"))["user_id"] == "a"  # gpu
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.execute_command("POOL", "DROP", "x")  # RESET ended the admin session

        await in_thread(scenario)


async def test_inline_commands_take_redis_quotes() -> None:
    async with running(size=1) as (_server, port):
        reply = await raw(port, b'ECHO "a b"\r\n')
        assert b"$3\r\na b\r\n" == reply
        reply = await raw(port, b'ECHO "a b\r\n', read_until_close=True)
        assert reply.startswith(b"-ERR Protocol error: unbalanced quotes")


async def test_named_pools_over_resp_with_an_admin_user() -> None:
    async with running(size=2, password="pw", admin_password="root") as (_server, port):

        def scenario() -> None:
            user = client(port, password="pw")
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command("POOL", "CREATE", "gpu", "SIZE", "1", "TTL", "60")
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command("CLEAR")
            admin = client(port, username="admin", password="root")
            assert "OK" == admin.execute_command(
                "POOL", "CREATE", "gpu", "SIZE", "1", "TTL", "60", "WHEN-FULL", "reject"
            )
            for reshape in (["ALTER", "gpu", "SIZE", "3"], ["DROP", "gpu"]):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    user.execute_command("POOL", *reshape)
            with pytest.raises(redis.ResponseError, match=r"^EXISTS"):
                admin.execute_command("POOL", "CREATE", "gpu", "SIZE", "1", "TTL", "60")
            assert ["default", "gpu"] == user.execute_command("POOL", "LIST")
            assert "a" == as_dict(user.execute_command("TP.ACTIVATE", "gpu", "a"))["user_id"]
            with pytest.raises(redis.ResponseError, match=r"^FULL"):
                user.execute_command("TP.ACTIVATE", "gpu", "b")
            info = as_dict(user.execute_command("POOL", "INFO", "gpu"))
            assert ("reject", 1, 1) == (info["when_full"], info["size"], info["refusals"])
            assert admin.execute_command("POOL", "ALTER", "gpu", "SIZE", "2", "WHEN-FULL", "wait")
            assert "b" == as_dict(user.execute_command("TP.ACTIVATE", "gpu", "b"))["user_id"]
            assert 2 == as_dict(admin.execute_command("POOL", "INFO", "gpu"))["size"]
            # A command that names no pool uses the pool 'default'.
            assert 2 == as_dict(admin.execute_command("STATS"))["size"]
            assert admin.execute_command("POOL", "DROP", "gpu")
            with pytest.raises(redis.ResponseError, match=r"^UNKNOWN"):
                user.execute_command("TP.ACTIVATE", "gpu", "c")  # its pool is gone

        await in_thread(scenario)


async def test_admin_password_alone_lets_anyone_lease_and_only_admin_reshape() -> None:
    async with running(size=2, admin_password="root") as (_server, port):

        def scenario() -> None:
            anyone = client(port)
            assert "a" == as_dict(anyone.execute_command("ACTIVATE", "a"))["user_id"]
            for command in (["POOL", "CREATE", "x", "SIZE", "1", "TTL", "5"], ["CLEAR"]):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    anyone.execute_command(*command)
            admin = client(port, username="admin", password="root")
            assert "OK" == admin.execute_command("POOL", "CREATE", "x", "SIZE", "1", "TTL", "5")

        await in_thread(scenario)


async def test_history_pages_over_resp_with_before_each_row_once() -> None:
    async with running(size=1) as (server, port):
        pool = server.pools.get("default")
        await pool.activate_many([f"u{i}" for i in range(250)])
        token = (await pool.tokens())[0].id

        def scenario() -> list[str]:
            r = client(port)
            seen: list[str] = []
            cursor, page = r.execute_command("HISTORY", token, "LIMIT", "100")
            seen += [as_dict(u)["user_id"] for u in page]
            while cursor != "0":
                cursor, page = r.execute_command("HISTORY", token, "LIMIT", "100", "BEFORE", cursor)
                seen += [as_dict(u)["user_id"] for u in page]
            return seen

        assert [f"u{i}" for i in range(248, -1, -1)] == await in_thread(scenario)


async def test_activate_wait_blocks_only_its_own_connection() -> None:
    async with running(size=1) as (server, port):
        pools = server.pools
        await pools.alter("default", when_full="wait")
        holder = await pools.get("default").activate("holder")
        waiter = await trio.open_tcp_stream("127.0.0.1", port)
        await waiter.send_all(b"ACTIVATE w WAIT 30\r\nPING\r\n")
        await trio.sleep(0.2)
        assert b"+PONG\r\n" == await raw(port, b"PING\r\n")  # others are served meanwhile
        await pools.get("default").release(holder.token_id)
        data = b""
        with trio.fail_after(5):
            while not data.endswith(b"+PONG\r\n"):
                data += await waiter.receive_some(65536)
        assert b"$1\r\nw\r\n" in data  # the lease, then the PING after it
        await waiter.aclose()
        reply = await raw(port, b"ACTIVATE late WAIT 0.2\r\n")
        assert reply.startswith(b"-FULL")


async def test_subscribe_delivers_events_as_redis_pubsub() -> None:
    async with running(size=1) as (_server, port):

        def scenario() -> list[dict[str, Any]]:
            r = client(port)
            pubsub = r.pubsub()
            pubsub.subscribe("events:default")
            assert "subscribe" == pubsub.get_message(timeout=2)["type"]
            other = client(port)
            lease = as_dict(other.execute_command("ACTIVATE", "a"))
            other.execute_command("ACTIVATE", "b")
            got = []
            while len(got) < 3:
                message = pubsub.get_message(timeout=2)
                assert message is not None
                got.append(json.loads(message["data"]))
            assert lease["fence"] == got[0]["revision"]
            pubsub.close()
            return got

        events = await in_thread(scenario)
        assert ["granted", "ended", "granted"] == [e["kind"] for e in events]
        assert "evicted" == events[1]["reason"]


async def test_resp3_subscribers_get_push_messages() -> None:
    async with running(size=1) as (server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"HELLO 3\r\nSUBSCRIBE events:default\r\n")
        with trio.fail_after(5):
            data = await read_until(stream, b">3\r\n$9\r\nsubscribe")
            await server.pools.get("default").activate("a")
            data = await read_until(stream, b"granted", data)
        frame = data[data.index(b">3\r\n$7\r\nmessage") :]
        assert frame.startswith(b">3\r\n$7\r\nmessage\r\n$14\r\nevents:default\r\n$")
        payload = json.loads(frame.split(b"\r\n")[6])
        assert ("granted", "a") == (payload["kind"], payload["user_id"])
        await stream.aclose()


async def test_a_subscriber_resumes_after_a_revision() -> None:
    async with running(size=1) as (server, port):
        pool = server.pools.get("default")
        a = await pool.activate("a")
        await pool.activate("b")

        def scenario() -> list[dict[str, Any]]:
            r = client(port)
            pubsub = r.pubsub()
            pubsub.psubscribe("events:*")
            pubsub.subscribe(f"events:default@{a.fence}")
            got = []
            for _ in range(6):
                message = pubsub.get_message(timeout=1)
                if message and message["type"] == "message":
                    got.append(json.loads(message["data"]))
            pubsub.close()
            return got

        replayed = await in_thread(scenario)
        assert ["ended", "granted"] == [e["kind"] for e in replayed]
        assert a.id == replayed[0]["lease_id"]


async def test_a_subscription_outlives_its_pool_as_in_redis() -> None:
    """A channel subscribed before its pool exists delivers once it is created, and again
    after it was dropped and created anew; so does a pattern. Every event of the new pool
    is delivered, even an activation sent in the same write as the POOL CREATE (before
    the server's forwarder for the subscription got to run: CI once lost it so)."""
    async with running(size=1) as (_server, port):

        def granted(pubsub: Any, kind: str) -> list[str]:
            got = []
            for _ in range(20):
                message = pubsub.get_message(timeout=0.5)
                if message and message["type"] == kind:
                    got.append(json.loads(message["data"])["user_id"])
                if len(got) == 1:
                    break
            return got

        def scenario() -> None:
            r = client(port)
            channel, pattern = r.pubsub(), r.pubsub()
            channel.subscribe("events:later")
            pattern.psubscribe("events:lat*")
            for _ in range(2):
                channel.get_message(timeout=1)
                pattern.get_message(timeout=1)
            for round_ in ("first", "second", "third", "fourth"):
                pipe = r.pipeline(transaction=False)
                pipe.execute_command("POOL", "CREATE", "later", "SIZE", "1", "TTL", "60")
                pipe.execute_command("TP.ACTIVATE", "later", round_)
                pipe.execute()
                assert [round_] == granted(channel, "message"), round_
                assert [round_] == granted(pattern, "pmessage"), round_
                r.execute_command("POOL", "DROP", "later")
                for sub in (channel, pattern):  # the drop's "ended" (cleared) event, then
                    got = []  # one message saying the pool was dropped, and its last revision
                    while message := sub.get_message(timeout=0.3):
                        got.append(json.loads(message["data"]))
                    assert ["ended", "dropped"] == [e["kind"] for e in got], got
                    assert ("later", got[0]["revision"]) == (got[1]["pool"], got[1]["revision"])
            channel.close()
            pattern.close()

        await in_thread(scenario)


async def test_a_slow_subscriber_follows_a_pool_dropped_and_created_again() -> None:
    """A subscriber still being sent a dropped pool's events when a pool of that name is
    created anew: its channel and its pattern both deliver the new pool's events. (The
    forwarder, busy sending the old pool's backlog, once took the new pool for a server
    shutdown: the channel's subscription ended without a word and the pattern never
    followed the new pool.)"""
    async with running(size=1) as (server, port):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the reader is slow
        await sock.connect(("127.0.0.1", port))
        async with trio.SocketStream(sock) as slow:
            await slow.send_all(b"SUBSCRIBE events:later\r\nPSUBSCRIBE events:lat*\r\n")
            with trio.fail_after(5):
                data = await read_until(slow, b"events:lat*")
            assert b"+OK" in await raw(port, b"POOL CREATE later SIZE 1 TTL 60\r\n")
            for start in range(0, 2_000, 500):  # ~4,000 events waiting for the slow reader
                await server.pools.get("later").activate_many(
                    [f"u{n}" for n in range(start, start + 500)]
                )
            admin = await trio.open_tcp_stream("127.0.0.1", port)
            await admin.send_all(
                encode_command("POOL", "DROP", "later")
                + encode_command("POOL", "CREATE", "later", "SIZE", "1", "TTL", "60")
                + encode_command("TP.ACTIVATE", "later", "marker")
            )
            with trio.fail_after(5):
                await read_until(admin, b"marker")
            await admin.aclose()
            parser = hiredis.Reader()
            parser.feed(data)
            marked: set[bytes] = set()
            with trio.fail_after(10):
                while len(marked) < 2:
                    frame = parser.gets()
                    if frame is False:
                        chunk = await slow.receive_some(65536)
                        assert chunk, "the server closed the subscriber's connection"
                        parser.feed(chunk)
                    elif frame[0] in (b"message", b"pmessage"):
                        event = json.loads(frame[-1])
                        assert event["kind"] not in ("overflow", "compacted"), event
                        if event.get("user_id") == "marker":
                            marked.add(frame[0])
    assert {b"message", b"pmessage"} == marked


@pytest.mark.parametrize(
    ("subscribe", "end", "confirmation"),
    [
        ("SUBSCRIBE events:default", "UNSUBSCRIBE", [b"unsubscribe", b"events:default", 0]),
        ("PSUBSCRIBE events:d*", "PUNSUBSCRIBE", [b"punsubscribe", b"events:d*", 0]),
        ("SUBSCRIBE events:default", "RESET", b"RESET"),
    ],
)
async def test_unsubscribing_a_subscriber_that_is_behind_never_cuts_a_message(
    subscribe: str, end: str, confirmation: Any
) -> None:
    """A subscriber thousands of events behind (the server blocked writing a batch of
    messages to it) unsubscribes: what it reads is whole messages, then the confirmation,
    then the PING's answer. Cancelling the forwarder in the middle of its write once
    left half a message on the wire, and every reply after it was read as its rest."""
    async with running(size=1) as (server, port):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the reader is slow
        await sock.connect(("127.0.0.1", port))
        async with trio.SocketStream(sock) as slow:
            await slow.send_all(subscribe.encode() + b"\r\n")
            with trio.fail_after(5):
                data = await read_until(slow, b"subscribe")
            for start in range(0, 3_000, 500):  # ~6,000 events the reader does not read
                await server.pools.get("default").activate_many(
                    [f"u{n}" for n in range(start, start + 500)]
                )
            await trio.sleep(0.3)  # the forwarder fills the socket's buffers and blocks
            await slow.send_all(end.encode() + b"\r\nPING\r\n")
            parser = hiredis.Reader()
            parser.feed(data)
            frames: list[Any] = []
            with trio.fail_after(10):
                while b"PONG" not in frames:
                    frame = parser.gets()
                    if frame is False:
                        chunk = await slow.receive_some(65536)
                        assert chunk, "the server closed the connection"
                        parser.feed(chunk)
                    else:
                        frames.append(frame)
    messages = [f for f in frames if isinstance(f, list) and f[0] in (b"message", b"pmessage")]
    assert messages  # (thousands more were waiting: they are dropped with the subscription)
    for message in messages:
        assert json.loads(message[-1])["kind"] in ("granted", "ended")  # each one whole
    at = frames.index(confirmation)
    assert frames[at + 1 :] == [b"PONG"]  # nothing of the subscription after it
    assert frames[: at + 1] == [frames[0], *messages, confirmation]


async def test_a_subscribed_resp2_connection_may_send_only_pubsub_commands() -> None:
    async with running(size=1) as (_server, port):
        reply = await raw(port, b"SUBSCRIBE events:default\r\nACTIVATE a\r\nPING\r\n")
        assert b"subscribe" in reply
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"SUBSCRIBE events:default\r\nACTIVATE a\r\nPING\r\n")
        with trio.fail_after(5):
            data = await read_until(stream, b"pong")
        await stream.aclose()
        assert b"only (P|S)SUBSCRIBE" in data


async def test_a_waiter_that_hangs_up_is_never_granted() -> None:
    async with running(size=1) as (server, port):
        pools = server.pools
        await pools.alter("default", when_full="wait")
        pool = pools.get("default")
        holder = await pool.activate("holder")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"ACTIVATE ghost WAIT 60\r\n")
        with trio.fail_after(5):
            while (await pool.stats()).waiting != 1:
                await trio.sleep(0.01)
        await stream.aclose()  # hangs up while waiting
        with trio.fail_after(5):
            while (await pool.stats()).waiting != 0:
                await trio.sleep(0.01)
        await pool.release(holder.token_id)
        assert await pool.lease_of("ghost") is None
        assert 1 == (await pool.stats()).available


async def test_commands_sent_while_a_command_waits_run_after_it_without_more_bytes() -> None:
    """What a client sends while its ACTIVATE ... WAIT waits is run once the wait ends,
    without waiting for further bytes (redis-cli -r N ACTIVATE u WAIT hung)."""
    async with running(size=1) as (server, port):
        pools = server.pools
        await pools.alter("default", when_full="wait")
        pool = pools.get("default")
        await pool.activate("holder")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"ACTIVATE w WAIT 0.5\r\n")
        with trio.fail_after(5):
            while (await pool.stats()).waiting != 1:
                await trio.sleep(0.01)
        await stream.send_all(b"PING\r\nECHO after\r\n")  # arrives while it waits
        with trio.fail_after(5):
            data = await read_until(stream, b"after\r\n")
        assert data.startswith(b"-FULL")
        assert b"+PONG\r\n$5\r\nafter\r\n" in data
        await stream.aclose()


async def test_a_waiter_granted_a_token_can_release_it_in_the_same_write() -> None:
    """ACTIVATE ... WAIT then RELEASE in one write on a full wait pool: every reply comes."""
    async with running(size=1) as (server, port):
        pools = server.pools
        await pools.alter("default", when_full="wait")
        pool = pools.get("default")
        holder = await pool.activate("holder")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"ACTIVATE w WAIT 30\r\n")
        with trio.fail_after(5):
            while (await pool.stats()).waiting != 1:
                await trio.sleep(0.01)
        await stream.send_all(b"LEASE w\r\nPING\r\n")
        await trio.sleep(0.05)
        await pool.release(holder.token_id)
        with trio.fail_after(5):
            data = await read_until(stream, b"+PONG\r\n")
        assert data.count(b"$1\r\nw\r\n") >= 2  # granted, then LEASE w shows it
        await stream.aclose()


async def test_clear_of_many_leases_replies_with_them_all() -> None:
    """A CLEAR past END_STEP leases runs in steps but answers the total, as one command."""
    async with running(size=5_000) as (server, port):
        pool = server.pools.get("default")
        await pool.activate_many([f"u{n}" for n in range(5_000)])
        reply = await raw(port, b"CLEAR\r\n")
        assert reply.startswith(b"*4\r\n$7\r\ncleared\r\n:5000\r\n"), reply
        assert 0 == (await pool.stats()).active


async def test_subscriptions_per_connection_are_bounded() -> None:
    """1,000 channels and patterns per connection; a SUBSCRIBE past it is refused whole."""
    async with running(size=1) as (_server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        for start in range(0, 1_000, 25):  # a command holds at most 32 arguments
            names = [f"events:p{n}" for n in range(start, start + 25)]
            await stream.send_all(encode_command("SUBSCRIBE", *names))
        with trio.fail_after(10):
            await read_until(stream, b"events:p999\r\n:1000\r\n")
            await stream.send_all(b"PSUBSCRIBE events:x* events:y*\r\n")
            data = await read_until(stream, b"\r\n")
        assert data.startswith(b"-") and b"at most 1,000" in data, data
        await stream.aclose()


@given(
    channel=st.text(min_size=1, max_size=20),
    pattern=st.none() | st.text(min_size=1, max_size=20),
    shard=st.booleans(),
    proto=st.sampled_from([2, 3]),
    payloads=st.lists(st.text(max_size=40), min_size=1, max_size=5),
)
def test_a_batch_of_messages_is_each_message_s_frame(
    channel: str, pattern: str | None, shard: bool, proto: int, payloads: list[str]
) -> None:
    """The forwarder's batched frames (a head made once, a payload each) are the bytes
    of each message encoded alone."""
    from tokenpool._server.server import _encode_push, _framed, _message_head, _Push

    head = _message_head(channel, pattern, shard and pattern is None, proto)
    kind = ["pmessage", pattern] if pattern is not None else ["smessage" if shard else "message"]
    alone = [_encode_push(_Push([*kind, channel, p]), proto) for p in payloads]
    assert alone == [_framed(head, p.encode()) for p in payloads]


async def test_a_subscriber_that_stops_reading_gets_its_events_in_order_then_overflow() -> None:
    """A RESP subscriber that reads nothing while 15,000 activations (29,999 events) pass:
    what it reads afterwards is the events in revision order, in batched writes, then one
    ``overflow`` message naming how many it missed, then the ``unsubscribe`` push that
    ends the subscription; nothing follows on that channel."""
    async with running(size=1) as (server, port):
        pool = server.pools.get("default")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"SUBSCRIBE events:default\r\n")
        with trio.fail_after(5):
            data = await read_until(stream, b"subscribe")
        for start in range(0, 15_000, 1_000):  # 2,000 events a batch: the forwarder lags
            await pool.activate_many([f"u{n}" for n in range(start, start + 1_000)])
        parser = hiredis.Reader()
        parser.feed(data)
        got: list[dict[str, Any]] = []
        with trio.fail_after(30):
            while not got or got[-1]["kind"] != "overflow":
                frame = parser.gets()
                if frame is False:
                    parser.feed(await stream.receive_some(65536))
                elif frame[0] == b"message":
                    got.append(json.loads(frame[2]))
        with trio.move_on_after(0.5):
            parser.feed(await stream.receive_some(65536))
        # The subscription ended: one unsubscribe push says so (redis-py then drops the
        # channel and leaves subscribed mode), and nothing else follows.
        assert [b"unsubscribe", b"events:default", 0] == parser.gets()
        assert parser.gets() is False
        await stream.send_all(b"PING\r\n")  # no longer subscribed: a plain answer
        with trio.fail_after(5):
            parser.feed(await read_until(stream, b"PONG"))
        assert b"PONG" == parser.gets()
        await stream.aclose()
    events, last = got[:-1], got[-1]
    assert events and last["missed"] > 0
    assert len(events) + last["missed"] == 2 * 15_000 - 1  # the first evicts no one
    revisions = [e["revision"] for e in events]
    assert revisions == sorted(revisions)
    assert [e["kind"] for e in events[:2]] == ["granted", "ended"]  # u0, then u1 evicts it


async def test_a_pattern_too_long_to_match_cheaply_is_refused_before_any_work() -> None:
    """Python's glob translation costs the square of a pattern's ``[``: 30,000 of them
    in one MATCH held every client for 12 s. SCAN's MATCH, CONFIG GET and PSUBSCRIBE
    take patterns of at most 1,024 characters, and say so; one of 1,024 still works."""
    async with running(size=3) as (_server, port):

        def scenario() -> None:
            r = client(port)
            long = "[" * 1025
            for command in (
                ("TP.SCAN", "default", "0", "MATCH", long),
                ("CONFIG", "GET", long),
                ("PSUBSCRIBE", "events:*", long),
            ):
                with pytest.raises(redis.ResponseError, match=r"at most 1,024 characters") as e:
                    r.execute_command(*command)
                assert "1,025" in str(e.value)
            _cursor, ids = r.execute_command("TP.SCAN", "default", "0", "MATCH", "[" * 1024)
            assert [] == ids
            assert r.ping()  # the connection is still good

        await in_thread(scenario)
