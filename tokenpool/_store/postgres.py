"""The PostgreSQL store: sync psycopg 3 in the writer's thread.

psycopg's async API does not run on trio, so the writer calls these blocking
methods through ``trio.to_thread.run_sync`` with a one-thread limiter: writes
keep their order. Each batch is one transaction sent in pipeline mode with
set-wise statements (``unnest`` of arrays), a handful of round trips whatever
its size. Ownership is a session advisory lock held by the writer's
connection plus an owner epoch in ``pools`` that every batch checks, so a
stale owner can never overwrite a newer one.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import structlog
from psycopg import sql

from .._errors import InvalidArgumentError, PoolLockedError
from .._model import Lease, Reason, Usage
from . import Batch, FencedError, Snapshot, StoreError

log = structlog.get_logger("tokenpool.store")

_SCHEMA_LOCK = 0x746F6B656E706F6F  # "tokenpoo": serialises schema set-up between processes


def _plain(values: list[str]) -> str:
    """An array literal of values that need no quoting (UUIDs, numbers, enum labels)."""
    return "{" + ",".join(values) + "}"


def _texts(values: list[str]) -> str:
    """An array literal of arbitrary text: every element quoted, quotes and backslashes escaped."""
    if not values:
        return "{}"
    raw = "".join(values)
    if "\\" in raw or '"' in raw:
        values = [v.replace("\\", "\\\\").replace('"', '\\"') for v in values]
    return '{"' + '","'.join(values) + '"}'


def _times(values: list[datetime]) -> str:
    """An array literal of timestamps (ISO 8601 with offset: nothing to quote).

    Leases granted in one actor batch share their times, so a batch holds few distinct
    ones: each is formatted once (formatting led the writer's profile).
    """
    text = {v: v.isoformat() for v in dict.fromkeys(values)}
    return "{" + ",".join(map(text.__getitem__, values)) + "}"


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class PostgresStore:
    """A pool's tables in one PostgreSQL schema (``?schema=`` in the URL, default ``tokenpool``)."""

    kind = "postgresql"

    def __init__(self, url: str, *, write_timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.schema = query.pop("schema", "tokenpool")
        if not self.schema.isidentifier():
            raise InvalidArgumentError(f"schema {self.schema!r} is not a plain SQL identifier")
        self._dsn = urlunsplit(parts._replace(query=urlencode(query)))
        self.url = urlunsplit(parts._replace(netloc=parts.hostname or "", query=""))
        self.write_timeout = write_timeout
        self.name = ""
        self.epoch = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._backend_pid: int | None = None
        self._reader: psycopg.Connection[Any] | None = None
        self._reader_lock = threading.Lock()

    # -- connections ----------------------------------------------------------

    def _connect(self, purpose: str) -> psycopg.Connection[Any]:
        timeout_ms = int(self.write_timeout * 1000)
        try:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, int(self.write_timeout)),
                application_name=f"tokenpool {purpose}",
                # A hung server or a dead link must fail a flush, not stall it forever.
                options=f"-c statement_timeout={timeout_ms} -c timezone=UTC"
                f" -c idle_in_transaction_session_timeout={timeout_ms * 2}",
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=2,
                tcp_user_timeout=timeout_ms,
            )
        except psycopg.Error as error:
            raise StoreError(f"cannot connect to PostgreSQL at {self.url}: {error}") from error
        conn.execute(
            sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)),
        )
        return conn

    def _lock_key(self) -> str:
        return f"tokenpool/{self.schema}/{self.name}"

    def _writer(self) -> psycopg.Connection[Any]:
        """The writer's connection, reconnected (and the ownership lock retaken) when needed."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        conn = self._connect("writer")
        try:
            if not self._take_lock(conn):
                raise StoreError(f"pool {self.name!r}: the ownership lock is held elsewhere")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _take_lock(self, conn: psycopg.Connection[Any]) -> bool:
        key = self._lock_key()
        got = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,))
        row = got.fetchone()
        if row and row[0]:
            self._backend_pid = conn.info.backend_pid
            return True
        if self._backend_pid is None:
            return False
        # Our previous session may still be alive on the server (a dropped link it
        # has not noticed): end it so its open transaction can never commit late.
        conn.execute("SELECT pg_terminate_backend(%s)", (self._backend_pid,))
        for _ in range(50):
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
            ).fetchone()
            if row and row[0]:
                self._backend_pid = conn.info.backend_pid
                return True
            threading.Event().wait(0.05)
        return False

    # -- Store ----------------------------------------------------------------

    def open(self, name: str, ttl: float) -> Snapshot:
        self.name = name
        conn = self._connect("writer")
        try:
            self._apply_schema(conn)
            if not self._take_lock(conn):
                raise PoolLockedError(
                    f"pool {name!r} in schema {self.schema!r} of {self.url} is owned by"
                    " another process; stop it first (or give this pool another name)"
                )
            owner = f"{socket.gethostname()}:{os.getpid()}"
            with conn.transaction():
                conn.execute(
                    "INSERT INTO pools (name, ttl_seconds) VALUES (%s, %s)"
                    " ON CONFLICT (name) DO NOTHING",
                    (name, ttl),
                )
                row = conn.execute(
                    "UPDATE pools SET owner_epoch = owner_epoch + 1, owner = %s,"
                    " owned_at = now(), ttl_seconds = %s WHERE name = %s RETURNING owner_epoch",
                    (owner, ttl, name),
                ).fetchone()
                assert row is not None
                self.epoch = int(row[0])
                repaired = conn.execute(
                    "UPDATE tokens t SET available = NOT EXISTS"
                    " (SELECT 1 FROM token_assignments a WHERE a.token_id = t.id)"
                    " WHERE t.pool = %s AND t.retired_at IS NULL AND t.available IS DISTINCT FROM"
                    " NOT EXISTS (SELECT 1 FROM token_assignments a WHERE a.token_id = t.id)"
                    " RETURNING t.id::text",
                    (name,),
                ).fetchall()
            if repaired:
                log.warning(
                    "available_flags_repaired",
                    pool=name,
                    count=len(repaired),
                    tokens=[r[0] for r in repaired[:20]],
                )
            tokens = [
                (str(r[0]), _utc(r[1]))
                for r in conn.execute(
                    "SELECT id, created_at FROM tokens WHERE pool = %s AND retired_at IS NULL"
                    " ORDER BY created_at, id",
                    (name,),
                )
            ]
            leases = [
                Lease(str(r[0]), str(r[1]), r[2], int(r[3]), _utc(r[4]), _utc(r[5]))
                for r in conn.execute(
                    "SELECT id, token_id, user_id, fence, assigned_at, expires_at"
                    " FROM token_assignments WHERE pool = %s ORDER BY assigned_at, fence",
                    (name,),
                )
            ]
            ended = {
                str(r[0]): int(r[1])
                for r in conn.execute(
                    "SELECT expiration_reason::text, count(*) FROM token_usage_history"
                    " WHERE pool = %s GROUP BY 1",
                    (name,),
                )
            }
        except psycopg.Error as error:
            conn.close()
            raise StoreError(f"cannot open pool {name!r} in {self.url}: {error}") from error
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return Snapshot(self.epoch, tokens, leases, len(repaired), ended)

    def _apply_schema(self, conn: psycopg.Connection[Any]) -> None:
        text = resources.files(__package__).joinpath("postgres.sql").read_text()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
            conn.execute(text.encode())

    def write(self, batch: Batch) -> None:
        try:
            conn = self._writer()
            with conn.transaction():
                with conn.pipeline():
                    fence = conn.execute(
                        "UPDATE pools SET written_at = now() WHERE name = %s AND owner_epoch = %s",
                        (self.name, self.epoch),
                    )
                    self._statements(conn, batch)
                if fence.rowcount != 1:  # raising here rolls the whole batch back
                    raise FencedError(
                        f"pool {self.name!r} was taken over by a newer owner"
                        f" (this process has epoch {self.epoch})"
                    )
        except FencedError:
            raise
        except psycopg.Error as error:
            if self._conn is not None and (self._conn.broken or self._conn.closed):
                self._conn = None
            raise StoreError(f"write to {self.url} failed: {error}") from error

    def _statements(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        # Arrays go as text literals built with str.join (C speed), cast on the server:
        # psycopg's array dumpers work element by element in Python, and this thread
        # shares the GIL with the actor, so every microsecond here is one it waits.
        name = self.name
        if batch.tokens_added:
            conn.execute(
                "INSERT INTO tokens (id, pool, created_at)"
                " SELECT u.id, %s, u.at FROM unnest(%s::uuid[], %s::timestamptz[]) AS u(id, at)"
                " ON CONFLICT (id) DO NOTHING",
                (
                    name,
                    _plain([t for t, _ in batch.tokens_added]),
                    _times([at for _, at in batch.tokens_added]),
                ),
            )
        if batch.users:
            conn.execute(
                "INSERT INTO users (id) SELECT unnest(%s::text[]) ON CONFLICT (id) DO NOTHING",
                (_texts(list(batch.users)),),
            )
        if batch.history:
            h = batch.history
            conn.execute(
                "INSERT INTO token_usage_history"
                " (id, token_id, pool, user_id, started_at, ended_at, expiration_reason)"
                " SELECT u.id, u.token_id, %s, u.user_id, u.started_at, u.ended_at, u.reason"
                " FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::timestamptz[],"
                " %s::timestamptz[], %s::expiration_reason[])"
                " AS u(id, token_id, user_id, started_at, ended_at, reason)"
                " ON CONFLICT (id) DO NOTHING",
                (
                    name,
                    _plain([u.id for u in h]),
                    _plain([u.token_id for u in h]),
                    _texts([u.user_id for u in h]),
                    _times([u.started_at for u in h]),
                    _times([u.ended_at for u in h]),
                    _plain([u.reason.value for u in h]),
                ),
            )
        if batch.ended:
            conn.execute(
                "DELETE FROM token_assignments WHERE id = ANY(%s::uuid[])", (_plain(batch.ended),)
            )
        if batch.assignments:
            a = list(batch.assignments.values())
            conn.execute(
                "INSERT INTO token_assignments"
                " (id, token_id, pool, user_id, fence, assigned_at, expires_at)"
                " SELECT u.id, u.token_id, %s, u.user_id, u.fence, u.assigned_at, u.expires_at"
                " FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::bigint[],"
                " %s::timestamptz[], %s::timestamptz[])"
                " AS u(id, token_id, user_id, fence, assigned_at, expires_at)"
                " ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                (
                    name,
                    _plain([x.id for x in a]),
                    _plain([x.token_id for x in a]),
                    _texts([x.user_id for x in a]),
                    _plain([str(x.fence) for x in a]),
                    _times([x.activated_at for x in a]),
                    _times([x.expires_at for x in a]),
                ),
            )
        if batch.available:
            conn.execute(
                "UPDATE tokens t SET available = u.available"
                " FROM unnest(%s::uuid[], %s::boolean[]) AS u(id, available)"
                " WHERE t.id = u.id AND t.available IS DISTINCT FROM u.available",
                (
                    _plain(list(batch.available)),
                    _plain(["t" if v else "f" for v in batch.available.values()]),
                ),
            )
        if batch.tokens_removed:
            conn.execute(
                "UPDATE tokens SET retired_at = now(), available = false"
                " WHERE id = ANY(%s::uuid[]) AND retired_at IS NULL",
                (_plain(batch.tokens_removed),),
            )

    def history(self, token_id: str, limit: int) -> list[Usage]:
        with self._reader_lock:
            try:
                if self._reader is None or self._reader.closed or self._reader.broken:
                    self._reader = self._connect("reader")
                rows = self._reader.execute(
                    "SELECT id, token_id, user_id, started_at, ended_at, expiration_reason::text"
                    " FROM token_usage_history WHERE token_id = %s"
                    " ORDER BY ended_at DESC, started_at DESC LIMIT %s",
                    (token_id, limit),
                ).fetchall()
            except psycopg.Error as error:
                raise StoreError(f"history read from {self.url} failed: {error}") from error
        return [
            Usage(str(r[0]), str(r[1]), r[2], _utc(r[3]), _utc(r[4]), Reason(r[5])) for r in rows
        ]

    def close(self) -> None:
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        self._conn = self._reader = None
