"""The systems under test, started side by side for one section and driven alike.

Every RESP system (tokenpool in ``async`` and ``sync`` durability with PostgreSQL
as its store, Redis + Lua) takes the same redis-benchmark command line but for the
command itself; the PostgreSQL-only pool takes pgbench. Each run counts what the
system refused (``INFO``'s ``total_error_replies``: tokenpool refuses activations
while its write backlog is full) and leaves it out of the rate, so a figure never
counts refusals as service; a tokenpool run starts only once the backlog left by
the one before has drained.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import attrs

from . import _peers
from ._drivers import RefusedError, Run, pgbench, sized_redis_benchmark
from ._services import DSN, pg_schema, redis_server, store_url, tokenpool_server

TTL = 3600.0  # long enough that nothing expires during a run: every system does the same work


@attrs.frozen
class RespSystem:
    """A system driven by redis-benchmark."""

    name: str
    port: int
    pid: int
    activate: tuple[str, ...]  # redis-benchmark's command; __rand_int__ is the user

    def info(self, section: str) -> dict[str, str]:
        """One INFO section, read over a raw socket (no client library's extra commands)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(f"INFO {section}\r\n".encode())
            data = sock.recv(65536)
            header, _, body = data.partition(b"\r\n")
            size = int(header[1:])
            while len(body) < size:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} closed the connection during INFO")
                body += chunk
        lines = body[:size].decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def errors(self) -> int:
        """Error replies the server has sent so far (INFO's total_error_replies)."""
        return int(self.info("stats")["total_error_replies"])

    def settle(self, seconds: float = 120.0) -> None:
        """Wait until a tokenpool server's write backlog is empty, so runs start alike."""
        deadline = time.monotonic() + seconds
        while int(self.info("persistence").get("backlog", "0")) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the write backlog did not drain in {seconds} s")
            time.sleep(0.1)

    def run(
        self,
        *,
        clients: int,
        pipeline: int,
        users: int,
        seconds: float,
        command: tuple[str, ...] | None = None,
    ) -> Run:
        self.settle()
        before = self.errors()
        try:
            result = sized_redis_benchmark(
                self.port,
                list(command or self.activate),
                clients=clients,
                pipeline=pipeline,
                keyspace=users,
                seconds=seconds,
            )
        except RefusedError:
            # redis-benchmark stops at the first error reply: no rate to report, only
            # that the system refused (tokenpool: its write backlog filled up).
            nan = float("nan")
            return Run(nan, nan, nan, nan, 0, 0.0, refused=max(1, self.errors() - before))
        # Refusals (a full write backlog: the writer's sustained limit) are not service.
        refused = self.errors() - before
        served = max(0.0, 1 - refused / result.requests)
        return attrs.evolve(result, rps=result.rps * served, refused=refused)


@attrs.frozen
class PgSystem:
    """The PostgreSQL-only pool, driven by pgbench."""

    name: str
    schema: str
    synchronous_commit: bool

    def run(self, *, clients: int, users: int, seconds: float, rate: float | None = None) -> Run:
        return pgbench(
            DSN,
            _peers.pg_script(TTL),
            clients=clients,
            seconds=seconds,
            variables={"users": str(users)},
            options=_peers.pg_options(self.schema, self.synchronous_commit),
            rate=rate,
        )


@contextmanager
def tokenpool_resp(
    name: str, size: int, store: str = "postgresql", durability: str = "async"
) -> Iterator[RespSystem]:
    """``tokenpool serve`` of ``size`` tokens on a fresh PostgreSQL schema, a fresh SQLite
    file (``store="sqlite"``: the default store) or in memory."""
    with ExitStack() as stack:
        if store == "memory":
            dsn = "memory"
        elif store == "sqlite":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenpool-bench-"))
            dsn = f"sqlite:///{folder}/pool.db"
        else:
            dsn = store_url(stack.enter_context(pg_schema("bench_tp")))
        server = stack.enter_context(
            tokenpool_server(
                "--dsn", dsn, "--durability", durability, "--size", str(size), "--ttl", str(TTL)
            )
        )
        yield RespSystem(name, server.port, server.pid, ("ACTIVATE", "__rand_int__"))


REDIS_NAMES = {
    None: "redis+lua",
    "everysec": "redis+lua aof everysec",
    "always": "redis+lua aof always",
}


@contextmanager
def redis_lua(size: int, appendfsync: str | None = None) -> Iterator[RespSystem]:
    """A redis-server of our own holding the Redis + Lua pool of ``size`` tokens
    (with the append-only file fsynced ``appendfsync``, or no persistence)."""
    with redis_server(appendfsync) as server:
        sha = _peers.redis_pool(server.port, size)
        yield RespSystem(
            REDIS_NAMES[appendfsync],
            server.port,
            server.pid,
            tuple(_peers.redis_activate(sha, TTL)),
        )


@contextmanager
def pg_only(size: int) -> Iterator[tuple[PgSystem, PgSystem]]:
    """The PostgreSQL-only pool of ``size`` tokens, at synchronous_commit on and off."""
    with pg_schema("bench_pgonly") as schema:
        _peers.pg_pool(schema, size)
        yield (
            PgSystem("postgresql-only (sync commit on)", schema, True),
            PgSystem("postgresql-only (sync commit off)", schema, False),
        )


def pg_max_clients() -> int:
    """How many pgbench clients the server takes (its max_connections, less some slack)."""
    import psycopg

    with psycopg.connect(DSN) as conn:
        row = conn.execute("SHOW max_connections").fetchone()
    return int(row[0]) - 10 if row else 90
