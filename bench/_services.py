"""The processes and databases a benchmark runs against, started and stopped by the bench.

Every server is started on a free port of 127.0.0.1 and stopped afterwards; every
PostgreSQL figure uses a schema of its own on ``TOKENPOOL_BENCH_DSN`` (default: the
local server), dropped afterwards. Nothing here touches the machine's redis on 6379.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import psycopg

from tests.chaos.server import free_port

DSN = os.environ.get("TOKENPOOL_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@attrs.frozen
class Server:
    """A server process the bench started: where it listens and its pid."""

    port: int
    pid: int


@contextmanager
def tokenpool_server(
    *args: str,
    cwd: str | None = None,
    wrap: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``python -m tokenpool serve`` on a free port, stopped with SIGTERM afterwards.

    ``cwd``: run the ``tokenpool`` of that checkout (another version, same interpreter);
    ``wrap``: a command the server runs under (valgrind); ``env``: added to the
    environment (a setting every version takes, as ``TOKENPOOL_HTTP_WORKERS``)."""
    proc = subprocess.Popen(
        [
            *wrap,
            sys.executable,
            "-m",
            "tokenpool",
            "serve",
            "--port",
            "0",
            "--log-format",
            "json",
            "--max-clients",
            "20000",
            *(() if any(a.startswith("--http-port") for a in args) else ("--http-port", "0")),
            *args,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "listening":
            port = int(event["ports"][0])
            break
    if not port:
        proc.kill()
        raise RuntimeError(f"tokenpool serve did not start: {proc.communicate()}")
    # Keep reading its log so a full pipe never stalls it.
    drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
    try:
        yield Server(port, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.wait(timeout=5)


def wait_for_port(port: int, seconds: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def redis_server(appendfsync: str | None = None) -> Iterator[Server]:
    """A redis-server of our own on a free port.

    ``appendfsync`` ``None``: no persistence. ``"everysec"`` / ``"always"``: the
    append-only file on, fsynced every second (what a Redis user runs for the async
    promise) or at every write (the sync promise), in a directory of its own.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (Debian/Ubuntu: apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tokenpool-bench-redis-") as data:
        persistence = (
            ("--appendonly", "no")
            if appendfsync is None
            else ("--appendonly", "yes", "--appendfsync", appendfsync, "--dir", data)
        )
        proc = subprocess.Popen(
            [
                *(binary, "--port", str(port), "--save", "", *persistence),
                *("--bind", "127.0.0.1", "--maxclients", "20000"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port)
            yield Server(port, proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def pg_schema(prefix: str = "bench") -> Iterator[str]:
    """A fresh schema's name on ``DSN``, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def store_url(schema: str) -> str:
    """The tokenpool store URL of a schema on ``DSN``."""
    return f"{DSN}?schema={schema}"


def versions() -> dict[str, str]:
    """The versions of every system a figure names."""
    import psycopg as pg
    import trio

    out = {"python": sys.version.split()[0], "trio": trio.__version__, "psycopg": pg.__version__}
    for tool, argv in (
        ("redis-server", ["redis-server", "--version"]),
        ("redis-benchmark", ["redis-benchmark", "--version"]),
        ("pgbench", ["pgbench", "--version"]),
    ):
        if shutil.which(argv[0]):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            out[tool] = done.stdout.strip().split("\n")[0]
    try:
        with psycopg.connect(DSN, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(row[0]) if row else "?"
    except psycopg.Error as error:
        out["postgresql"] = f"unreachable ({error})"
    return out
