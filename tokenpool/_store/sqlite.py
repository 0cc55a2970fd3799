"""The embedded SQLite store (stdlib ``sqlite3``): the default for ``tokenpool serve``.

A new user needs no database server. Same model and guarantees as the
PostgreSQL store: one transaction per batch, idempotent rows, an owner epoch
checked by every batch; ownership is an exclusive ``flock`` on a lock file
beside the database, which the kernel releases if the process dies.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import IO, TypeVar

from .._errors import InvalidArgumentError, PoolLockedError
from .._model import Lease, Reason, Usage
from . import Batch, FencedError, Snapshot, StoreError

T = TypeVar("T")

_NOW = "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')"


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


def sqlite_path(url: str) -> Path:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (as SQLAlchemy)."""
    rest = url.removeprefix("sqlite://")
    if not rest.startswith("/") or len(rest) < 2:
        raise InvalidArgumentError(
            f"a SQLite store URL looks like sqlite:///path/file.db, not {url!r}"
        )
    return Path(rest[1:])


class SqliteStore:
    """Every pool of one SQLite file.

    All SQLite calls run on one thread of the store's own: CPython's sqlite3
    can crash when a connection is touched from several threads, even one at
    a time (a cursor finalised on another thread), so the public methods hand
    their work to that thread and wait for it.
    """

    kind = "sqlite"

    def __init__(
        self, url: str, *, write_timeout: float = 5.0, synchronous: str = "NORMAL"
    ) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self.write_timeout = write_timeout
        self.synchronous = synchronous
        self.name = ""
        self.epoch = 0
        self._conn: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenpool-sqlite")

    def _on_thread(self, fn: Callable[..., T], *args: object) -> T:
        return self._thread.submit(fn, *args).result()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.write_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    def open(self, name: str, ttl: float) -> Snapshot:
        return self._on_thread(self._open, name, ttl)

    def _open(self, name: str, ttl: float) -> Snapshot:
        self.name = name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f"{self.path.name}.{name}.lock")
        lock_file = open(lock_path, "ab")  # noqa: SIM115 - held open for the pool's life
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise PoolLockedError(
                f"pool {name!r} in {self.path} is owned by another process; stop it first"
            ) from None
        self._lock_file = lock_file
        try:
            conn = self._connect()
            conn.executescript(resources.files(__package__).joinpath("sqlite.sql").read_text())
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO pools (name, ttl_seconds) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, ttl),
            )
            conn.execute(
                "UPDATE pools SET owner_epoch = owner_epoch + 1, owner = ?, ttl_seconds = ?,"
                f" owned_at = {_NOW} WHERE name = ?",
                (f"{socket.gethostname()}:{os.getpid()}", ttl, name),
            )
            (epoch,) = conn.execute(
                "SELECT owner_epoch FROM pools WHERE name = ?", (name,)
            ).fetchone()
            flags = "(NOT EXISTS (SELECT 1 FROM token_assignments a WHERE a.token_id = tokens.id))"
            repaired = conn.execute(
                f"UPDATE tokens SET available = {flags} WHERE pool = ? AND retired_at IS NULL"
                f" AND available IS NOT {flags} RETURNING id",
                (name,),
            ).fetchall()
            conn.execute("COMMIT")
            tokens = [
                (r[0], _dt(r[1]))
                for r in conn.execute(
                    "SELECT id, created_at FROM tokens WHERE pool = ? AND retired_at IS NULL"
                    " ORDER BY created_at, id",
                    (name,),
                )
            ]
            leases = [
                Lease(r[0], r[1], r[2], int(r[3]), _dt(r[4]), _dt(r[5]))
                for r in conn.execute(
                    "SELECT id, token_id, user_id, fence, assigned_at, expires_at"
                    " FROM token_assignments WHERE pool = ? ORDER BY assigned_at, fence",
                    (name,),
                )
            ]
            ended = dict(
                conn.execute(
                    "SELECT expiration_reason, count(*) FROM token_usage_history"
                    " WHERE pool = ? GROUP BY 1",
                    (name,),
                ).fetchall()
            )
        except sqlite3.Error as error:
            self._close()
            raise StoreError(f"cannot open pool {name!r} in {self.path}: {error}") from error
        self._conn = conn
        self.epoch = int(epoch)
        if repaired:
            import structlog

            structlog.get_logger("tokenpool.store").warning(
                "available_flags_repaired", pool=name, count=len(repaired)
            )
        return Snapshot(self.epoch, tokens, leases, len(repaired), ended)

    def write(self, batch: Batch) -> None:
        self._on_thread(self._write, batch)

    def _write(self, batch: Batch) -> None:
        conn = self._conn
        if conn is None:
            raise StoreError("the SQLite store is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                fenced = (
                    conn.execute(
                        f"UPDATE pools SET written_at = {_NOW} WHERE name = ? AND owner_epoch = ?",
                        (self.name, self.epoch),
                    ).rowcount
                    != 1
                )
                if fenced:
                    raise FencedError(f"pool {self.name!r} was taken over by a newer owner")
                self._statements(conn, batch)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            raise StoreError(f"write to {self.path} failed: {error}") from error

    def _statements(self, conn: sqlite3.Connection, batch: Batch) -> None:
        name = self.name
        if batch.tokens_added:
            conn.executemany(
                "INSERT INTO tokens (id, pool, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                [(t, name, _ts(at)) for t, at in batch.tokens_added],
            )
        if batch.users:
            conn.executemany(
                "INSERT INTO users (id) VALUES (?) ON CONFLICT (id) DO NOTHING",
                [(u,) for u in batch.users],
            )
        if batch.history:
            conn.executemany(
                "INSERT INTO token_usage_history"
                " (id, token_id, pool, user_id, started_at, ended_at, expiration_reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [
                    (
                        u.id,
                        u.token_id,
                        name,
                        u.user_id,
                        _ts(u.started_at),
                        _ts(u.ended_at),
                        u.reason.value,
                    )
                    for u in batch.history
                ],
            )
        if batch.ended:
            conn.executemany(
                "DELETE FROM token_assignments WHERE id = ?", [(i,) for i in batch.ended]
            )
        if batch.assignments:
            conn.executemany(
                "INSERT INTO token_assignments"
                " (id, token_id, pool, user_id, fence, assigned_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at",
                [
                    (
                        x.id,
                        x.token_id,
                        name,
                        x.user_id,
                        x.fence,
                        _ts(x.activated_at),
                        _ts(x.expires_at),
                    )
                    for x in batch.assignments.values()
                ],
            )
        if batch.available:
            conn.executemany(
                "UPDATE tokens SET available = ? WHERE id = ?",
                [(int(flag), t) for t, flag in batch.available.items()],
            )
        if batch.tokens_removed:
            conn.executemany(
                "UPDATE tokens SET available = 0,"
                f" retired_at = {_NOW}"
                " WHERE id = ? AND retired_at IS NULL",
                [(t,) for t in batch.tokens_removed],
            )

    def history(self, token_id: str, limit: int) -> list[Usage]:
        return self._on_thread(self._history, token_id, limit)

    def _history(self, token_id: str, limit: int) -> list[Usage]:
        if self._conn is None:
            raise StoreError("the SQLite store is closed")
        rows = self._conn.execute(
            "SELECT id, token_id, user_id, started_at, ended_at, expiration_reason"
            " FROM token_usage_history WHERE token_id = ?"
            " ORDER BY ended_at DESC, started_at DESC LIMIT ?",
            (token_id, limit),
        ).fetchall()
        return [Usage(r[0], r[1], r[2], _dt(r[3]), _dt(r[4]), Reason(r[5])) for r in rows]

    def close(self) -> None:
        self._on_thread(self._close)
        self._thread.shutdown()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
