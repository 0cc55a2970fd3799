"""A real ``tokenpool serve`` process for the reliability runs, and its tables afterwards."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import psycopg

from tokenpool._model import to_datetime

from .checker import StoredLease


@attrs.define
class Process:
    """A server the run started: its port, and the process to signal."""

    proc: subprocess.Popen[str]
    port: int
    log: list[dict[str, Any]]
    reader: threading.Thread | None = None
    http_port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close()

    def _close(self) -> None:
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    @property
    def store_pid(self) -> int | None:
        """The store process's pid, from the server's log (``None`` without a store)."""
        for event in list(self.log):
            if event.get("event") == "store_process_started":
                return int(event["pid"])
        return None

    def signal_group(self, signum: int) -> None:
        """Signal the whole process group (the server must have a session of its own)."""
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = 60) -> int:
        """Its exit code once it exits (and its log is read)."""
        code = self.proc.wait(timeout=timeout)
        self._close()
        return code

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; return its exit code once its log is read."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._close()
        return code


def _drain(stream: IO[str], log: list[dict[str, Any]]) -> None:
    for line in stream:
        try:
            log.append(json.loads(line))
        except ValueError:
            log.append({"event": "unparsed", "line": line})


def start(
    *args: str,
    port: int = 0,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    open_files: int | None = None,
    http_default: bool = False,
) -> Process:
    """``python -m tokenpool serve`` with ``args``; returns once it listens.

    HTTP is off unless ``args`` give ``--http-port`` (runs may start several servers).
    ``new_session``: in a process group of its own, to signal the whole group as
    systemd, ``timeout``, Docker and a shell do (``Process.signal_group``).
    ``open_files``: its ``ulimit -n`` (soft and hard), as on a machine set so.
    ``http_default``: HTTP as ``serve`` does by default (worker processes), not in the
    server's process, when ``args`` name no ``--http-workers``.
    """

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    if not any(a.startswith("--http-port") for a in args):
        args = (*args, "--http-port", "0")
    environ = {**os.environ, **(env or {})}
    if http_default:
        environ.pop("TOKENPOOL_HTTP_WORKERS", None)  # serve's own default, whatever the suite's
    elif "TOKENPOOL_HTTP_WORKERS" not in environ:
        # In-process HTTP unless a test (or TOKENPOOL_HTTP_WORKERS=2 make test, for every
        # HTTP test through workers) names the workers: the suite starts hundreds of
        # short-lived servers on shared cores. The default (workers) is tested by name:
        # tests/test_http_workers.py, the attack runs.
        environ["TOKENPOOL_HTTP_WORKERS"] = "0"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tokenpool", "serve", "--port", str(port)),
            *("--log-format", "json", *args),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environ,
        start_new_session=new_session,
        preexec_fn=limit if open_files is not None else None,
    )
    assert proc.stderr is not None
    log: list[dict[str, Any]] = []
    http_port = None
    for line in proc.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        log.append(event)
        if event.get("event") == "http_listening":
            http_port = int(event["port"])
        if event.get("event") == "listening":
            reader = threading.Thread(target=_drain, args=(proc.stderr, log), daemon=True)
            reader.start()
            return Process(proc, int(event["ports"][0]), log, reader, http_port)
    proc.wait(timeout=30)
    raise RuntimeError(f"tokenpool serve did not start: {log[-5:]}")


@contextmanager
def running(*args: str, env: dict[str, str] | None = None) -> Iterator[Process]:
    """A server for the length of the block, stopped with SIGTERM (SIGKILL if it hangs)."""
    server = start(*args, env=env)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            try:
                server.stop()
            except subprocess.TimeoutExpired:
                server.kill()


def stored_leases(dsn: str, pool: str = "default") -> list[StoredLease]:
    """Every lease the store holds for ``pool``: the active ones and the ended ones."""
    pool_id = "(SELECT id FROM pools WHERE name = {p})"
    active = (
        "SELECT lease_id, token_id, user_id, fence, {at} FROM lease_assignments"
        f" WHERE pool_id = {pool_id} AND lease_id IS NOT NULL"
    )
    ended = (
        "SELECT lease_id, token_id, user_id, expiration_reason, {start}, {end}, fence, revision"
        f" FROM usage_history WHERE pool_id = {pool_id}"
    )
    if dsn.startswith("sqlite:///"):
        path = dsn.removeprefix("sqlite:///")
        with sqlite3.connect(path, isolation_level=None) as conn:
            conn.execute("BEGIN")  # one snapshot: a lease ended between the reads is not both
            rows_a = conn.execute(active.format(p="?", at="assigned_us"), (pool,)).fetchall()
            rows_e = conn.execute(
                ended.format(p="?", start="started_us", end="ended_us"), (pool,)
            ).fetchall()
    else:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        schema = query.pop("schema", "tokenpool")
        plain = urlunsplit(parts._replace(query=urlencode(query)))
        with psycopg.connect(plain) as conn:
            # One snapshot for both reads: a lease that ended between them would be read
            # as active and as ended, a "double holder" with itself.
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.execute(f'SET search_path TO "{schema}"'.encode())
            rows_a = conn.execute(
                active.format(p="%s", at="assigned_at").encode(), (pool,)
            ).fetchall()
            rows_e = conn.execute(
                ended.format(p="%s", start="started_at", end="ended_at").encode(), (pool,)
            ).fetchall()
    return [
        StoredLease(str(i), str(t), u, int(f), None, _when(at)) for i, t, u, f, at in rows_a
    ] + [
        StoredLease(str(i), str(t), u, int(f), str(r), _when(s), _when(e), int(rev))
        for i, t, u, r, s, e, f, rev in rows_e
    ]


def _when(value: Any) -> datetime:
    """A stored time (PostgreSQL: datetime; SQLite: ISO text or epoch) as an aware datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int):
        return to_datetime(value)  # SQLite: microseconds since the epoch
    if isinstance(value, float):
        return datetime.fromtimestamp(value, UTC)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (for a server that must keep its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the server's store process)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out
