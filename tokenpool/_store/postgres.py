"""The PostgreSQL store: sync psycopg 3 in the store process, and a reader for the server.

Each batch is one transaction on the store process's connection: the owner
epoch check (which also saves the counters and high-water marks), the history
rows by binary ``COPY`` (built here with ``struct``: no datetime or UUID
objects), and each touched token's assignment replaced (delete, then ``COPY``
of the final leases). A retry after an ambiguous failure (the commit may
have happened) goes through a staging table with ``ON CONFLICT DO NOTHING``.

Ownership: the connection holds a session advisory lock per pool, and every
batch checks the pool's owner epoch in its transaction, so a stale owner can
never overwrite a newer one.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
from psycopg import sql

from .._errors import InvalidArgumentError, PoolLockedError, UnknownPoolError
from .._model import (
    COUNTERS,
    FENCE,
    ID,
    REASON,
    REV,
    SLOT,
    START,
    STOP,
    USER,
    EndRecord,
    LeaseRecord,
    Reason,
    Usage,
    to_datetime,
    to_us,
)
from . import (
    MAX_TIME_US,
    MIN_TIME_US,
    Batch,
    FencedError,
    KnownUsers,
    RejectedError,
    SlotTokens,
    Snapshot,
    StoreError,
    redact,
)

LOCK_WAIT = 5.0  # seconds to wait for a previous owner's store process to finish
TAKE_OVER_WAIT = 0.5  # cluster mode: seconds before a stale holder's session is ended
_SCHEMA_LOCK = 0x746F6B656E706F6F  # "tokenpoo": serialises schema set-up between processes
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01, PostgreSQL's zero for timestamps
_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_TRAILER = struct.pack(">h", -1)
_HISTORY_ROW = struct.Struct(">hiiiqi16si16siqiqiq")
_LEASE_ROW = struct.Struct(">hi16si16siqiqiq")
_FREE_ROW = struct.Struct(">hi16siiiii")
_REASON = {r.value: struct.pack(">i", len(r.value)) + r.value.encode() for r in Reason}
_COUNTERS = tuple(COUNTERS)
_SET_COUNTERS = ", ".join(f"{name} = %s" for name in COUNTERS)


def _uuid(text: str) -> bytes:
    return bytes.fromhex(text.replace("-", ""))


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">i", len(data)) + data


def history_copy(pool_id: int, rows: list[EndRecord], tokens: SlotTokens) -> bytes:
    """END records as a binary COPY stream for ``token_usage_history``."""
    pack = _HISTORY_ROW.pack
    reason = _REASON
    out = [_HEADER]
    for r in rows:
        out.append(
            pack(
                9,
                4,
                pool_id,
                8,
                r[REV],
                16,
                _uuid(r[ID]),
                16,
                tokens.raw(r[SLOT]),
                8,
                r[FENCE],
                8,
                r[START] - _PG_EPOCH_US,
                8,
                r[STOP] - _PG_EPOCH_US,
            )
        )
        out.append(reason[r[REASON]])
        out.append(_text(r[USER]))
    out.append(_TRAILER)
    return b"".join(out)


def leases_copy(final: dict[int, LeaseRecord | None], tokens: SlotTokens) -> bytes:
    """Each touched token's lease (or NULLs) as a binary COPY stream for ``staged_leases``."""
    pack = _LEASE_ROW.pack
    free = _FREE_ROW.pack
    out = [_HEADER]
    for slot, r in final.items():
        if r is None:
            out.append(free(6, 16, tokens.raw(slot), -1, -1, -1, -1, -1))
            continue
        out.append(
            pack(
                6,
                16,
                tokens.raw(slot),
                16,
                _uuid(r[ID]),
                8,
                r[FENCE],
                8,
                r[START] - _PG_EPOCH_US,
                8,
                r[STOP] - _PG_EPOCH_US,
            )
        )
        out.append(_text(r[USER]))
    out.append(_TRAILER)
    return b"".join(out)


def _dsn_and_schema(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "tokenpool")
    if not schema.isidentifier() or not schema.isascii():
        raise InvalidArgumentError(f"schema {schema!r} is not a plain SQL identifier")
    # Only the query changes: urlunsplit would turn postgresql:///db (a socket) into postgresql:/db.
    base = url.partition("?")[0]
    return (f"{base}?{urlencode(query)}" if query else base), schema


def connect(url: str, purpose: str, write_timeout: float) -> psycopg.Connection[Any]:
    """A connection with deadlines on everything: a hung server fails a call, never stalls it."""
    dsn, schema = _dsn_and_schema(url)
    timeout_ms = int(write_timeout * 1000)
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, int(write_timeout)),
            application_name=f"tokenpool {purpose}",
            options=f"-c statement_timeout={timeout_ms} -c timezone=UTC"
            f" -c idle_in_transaction_session_timeout={timeout_ms * 2}",
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            tcp_user_timeout=timeout_ms,
        )
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    except psycopg.Error as error:
        raise StoreError(
            f"cannot connect to PostgreSQL at {redact(url)}: {_first_line(error)}"
        ) from error
    return conn


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _permanent(error: psycopg.Error) -> bool:
    """Errors retrying cannot fix: the data itself was refused (classes 22 and 23)."""
    state = getattr(error, "sqlstate", None) or ""
    return state.startswith(("22", "23"))


class PostgresStore:
    """The pools of one PostgreSQL schema, owned by this store process."""

    kind = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        write_timeout: float = 5.0,
        lock_wait: float = LOCK_WAIT,
        take_over: bool = False,
    ) -> None:
        self.take_over = take_over
        self.url = redact(url)
        self._url = url
        self.lock_wait = lock_wait
        _, self.schema = _dsn_and_schema(url)
        self.write_timeout = write_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._backend_pid: int | None = None
        self._pools: dict[int, tuple[str, int]] = {}  # pool id -> (name, epoch)
        self._lost: dict[int, str] = {}  # cluster mode: pools whose lock was not retaken
        self._users = KnownUsers()
        self._schema_done = False

    # -- connections ----------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """The connection, reconnected (every ownership lock retaken) when needed."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        conn = connect(self._url, "writer", self.write_timeout)
        try:
            if not self._schema_done:
                self._apply_schema(conn)
            if self.take_over:
                self._retake_each(conn)
            else:
                for pool_id, (name, _epoch) in self._pools.items():
                    if not self._take_lock(conn, name):
                        raise FencedError(
                            f"pool {name!r} (id {pool_id}): its lock is held elsewhere"
                        )
            self._backend_pid = conn.info.backend_pid
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _retake_each(self, conn: psycopg.Connection[Any]) -> None:
        """Cluster mode, after a reconnection: end our previous session if it is still
        there (so nothing it had in flight commits late), then retake each pool's lock
        once. A pool whose lock another node holds now (its slot was taken over while
        this node was cut off or paused) is lost alone, not every pool of the process."""
        old = self._backend_pid
        if old is not None and old != conn.info.backend_pid:
            conn.execute("SELECT pg_terminate_backend(%s)", (old,))
            for _ in range(50):
                alive = conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (old,))
                if alive.fetchone() is None:
                    break
                threading.Event().wait(0.05)
        query = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
        for pool_id, (name, _epoch) in self._pools.items():
            if pool_id in self._lost:
                continue
            row = conn.execute(query, (f"tokenpool/{self.schema}/{name}",)).fetchone()
            if not (row and row[0]):
                self._lost[pool_id] = f"pool {name!r} (id {pool_id}): taken over by another node"

    def _take_lock(self, conn: psycopg.Connection[Any], name: str) -> bool:
        key = f"tokenpool/{self.schema}/{name}"
        query = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
        row = conn.execute(query, (key,)).fetchone()
        if row and row[0]:
            return True
        if self._backend_pid is None or self._backend_pid == conn.info.backend_pid:
            return False
        # Our previous session may still be alive on the server (a dropped link it
        # has not noticed): end it so its open transaction can never commit late.
        conn.execute("SELECT pg_terminate_backend(%s)", (self._backend_pid,))
        for _ in range(50):
            row = conn.execute(query, (key,)).fetchone()
            if row and row[0]:
                return True
            threading.Event().wait(0.05)
        return False

    def _apply_schema(self, conn: psycopg.Connection[Any]) -> None:
        text = resources.files(__package__).joinpath("postgres.sql").read_text()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
            old = conn.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = %s"
                " AND table_name = 'pools' AND column_name = 'name'"
                " AND NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = %s"
                " AND table_name = 'pools' AND column_name = 'id')",
                (self.schema, self.schema),
            ).fetchone()
            if old:
                raise StoreError(
                    f"schema {self.schema!r} of {self.url} holds tokenpool's version 1 tables;"
                    " this version needs version 2: use another ?schema= (or migrate: README)"
                )
            conn.execute(text.encode())
        self._schema_done = True

    # -- Store ----------------------------------------------------------------

    def open_pool(self, name: str, settings: dict[str, Any], create: bool) -> Snapshot:
        try:
            conn = self._connection()
            self._lock_or_wait(conn, name)
            owner = f"{socket.gethostname()}:{os.getpid()}"
            with conn.transaction():
                made = False
                row = conn.execute(
                    "SELECT id, dropped_at IS NOT NULL, owner FROM pools WHERE name = %s", (name,)
                ).fetchone()
                if row is None or row[1]:
                    if not create:
                        self._unlock(conn, name)
                        raise UnknownPoolError(f"no pool {name!r} in {self.url}")
                    made = True
                if row is None:
                    conn.execute(
                        "INSERT INTO pools (name, size, ttl_seconds, when_full, min_hold_seconds,"
                        " max_lifetime_seconds) VALUES (%s, %s, %s, %s, %s, %s)",
                        (
                            name,
                            settings["size"],
                            settings["ttl"],
                            settings["when_full"],
                            settings["min_hold"],
                            settings["max_lifetime"],
                        ),
                    )
                elif row[1]:
                    conn.execute(
                        "UPDATE pools SET dropped_at = NULL, size = %s, ttl_seconds = %s,"
                        " when_full = %s, min_hold_seconds = %s, max_lifetime_seconds = %s"
                        " WHERE name = %s",
                        (
                            settings["size"],
                            settings["ttl"],
                            settings["when_full"],
                            settings["min_hold"],
                            settings["max_lifetime"],
                            name,
                        ),
                    )
                top_revision, top_us = self._high_water(conn, name)
                got = conn.execute(
                    "UPDATE pools SET revision = greatest(revision, %s),"
                    " clock_us = greatest(clock_us, %s),"
                    " owner_epoch = greatest(owner_epoch + 1, (greatest(revision, %s) >> 40) + 1),"
                    " owner = %s, owned_at = now() WHERE name = %s RETURNING id, owner_epoch,"
                    " revision, clock_us, size, ttl_seconds, when_full, min_hold_seconds,"
                    " max_lifetime_seconds, " + ", ".join(_COUNTERS),
                    (top_revision, top_us, top_revision, owner, name),
                ).fetchone()
                assert got is not None
            pool_id = int(got[0])
            tokens = [
                (str(r[0]), to_us(r[1]))
                for r in conn.execute(
                    "SELECT id, created_at FROM tokens WHERE pool_id = %s AND retired_at IS NULL"
                    " ORDER BY created_at, id",
                    (pool_id,),
                )
            ]
            leases = [
                (str(r[0]), str(r[1]), r[2], int(r[3]), to_us(r[4]), to_us(r[5]))
                for r in conn.execute(
                    "SELECT lease_id, token_id, user_id, fence, assigned_at, expires_at"
                    " FROM token_assignments WHERE pool_id = %s AND lease_id IS NOT NULL"
                    " ORDER BY assigned_at, fence",
                    (pool_id,),
                )
            ]
        except psycopg.Error as error:
            self._drop_broken()
            raise StoreError(
                f"cannot open pool {name!r} in {self.url}: {_first_line(error)}"
            ) from error
        unclean = row is not None and not row[1] and row[2] is not None
        snapshot = self._snapshot(got, tokens, leases, unclean, made)
        self._pools[pool_id] = (name, snapshot.epoch)
        self._lost.pop(pool_id, None)  # owned again, a new epoch: an earlier loss is over
        return snapshot

    def _lock_or_wait(self, conn: psycopg.Connection[Any], name: str) -> None:
        deadline = time.monotonic() + (
            min(self.lock_wait, TAKE_OVER_WAIT) if self.take_over else self.lock_wait
        )
        ended = False
        while not self._take_lock(conn, name):
            if self.take_over and not ended and time.monotonic() >= deadline:
                self._end_holder(conn, name)  # once: a holder that comes back is refused
                ended = True
                deadline = time.monotonic() + self.lock_wait
            if time.monotonic() < deadline:
                # A crashed server's store process may still be writing: it exits
                # (and frees the lock) once done. Wait a little for it.
                time.sleep(0.05)
                continue
            raise PoolLockedError(
                f"pool {name!r} in schema {self.schema!r} of {self.url} is owned by"
                " another process; stop it first (or give this pool another name)"
            )

    def _end_holder(self, conn: psycopg.Connection[Any], name: str) -> None:
        """Cluster mode: this node holds the lease on the pool's slot, so a session
        still holding the pool's lock belongs to an owner whose lease ran out (a paused
        node's store process): end it, so nothing it has in flight can commit late."""
        key = f"tokenpool/{self.schema}/{name}"
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            " AND granted AND objsubid = 1 AND pid <> pg_backend_pid()"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0)",
            (key,),
        )

    def open_pools(self, names: list[str]) -> list[Snapshot]:
        """``open_pool`` for many stored pools at once (restore at start): every lock
        tried in one query, then ONE transaction of set-wise statements (the rows, the
        high-water marks, the epoch bump, the tokens, the leases), whatever the number
        of pools. Raises as ``open_pool`` does; then no pool of the batch is taken."""
        if not names:
            return []
        conn: psycopg.Connection[Any] | None = None
        locked: list[str] = []
        try:
            conn = self._connection()
            keys = [f"tokenpool/{self.schema}/{name}" for name in names]
            tried = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(k, 0)) FROM"
                " unnest(%s::text[]) WITH ORDINALITY AS u(k, i) ORDER BY i",
                (keys,),
            ).fetchall()
            for name, (got_lock,) in zip(names, tried, strict=True):
                if not got_lock:
                    self._lock_or_wait(conn, name)  # a previous owner finishing: wait for it
                locked.append(name)
            snapshots = self._load_many(conn, names)
        except psycopg.Error as error:
            self._drop_broken()
            raise StoreError(
                f"cannot open {len(names)} pools in {self.url}: {_first_line(error)}"
            ) from error
        except BaseException:
            if conn is not None and not conn.closed and not conn.broken:
                for name in locked:
                    self._unlock(conn, name)
            raise
        for snapshot, name in zip(snapshots, names, strict=True):
            self._pools[snapshot.pool_id] = (name, snapshot.epoch)
            self._lost.pop(snapshot.pool_id, None)  # (as in open_pool)
        return snapshots

    def _load_many(self, conn: psycopg.Connection[Any], names: list[str]) -> list[Snapshot]:
        owner = f"{socket.gethostname()}:{os.getpid()}"
        epoch_us = "(extract(epoch FROM {0}) * 1000000)::numeric"
        with conn.transaction():
            rows = {
                r[1]: r
                for r in conn.execute(
                    "SELECT id, name, dropped_at IS NOT NULL, owner FROM pools"
                    " WHERE name = ANY(%s)",
                    (names,),
                )
            }
            for name in names:
                if name not in rows or rows[name][2]:
                    raise UnknownPoolError(f"no pool {name!r} in {self.url}")
            ids = [int(rows[name][0]) for name in names]
            newest = {
                int(r[0]): r[1:]
                for r in conn.execute(
                    "SELECT p.id, h.revision, h.ended, h.started FROM unnest(%s::integer[]) AS"
                    " p(id) JOIN LATERAL (SELECT revision, "
                    + epoch_us.format("ended_at")
                    + " AS ended, "
                    + epoch_us.format("started_at")
                    + " AS started FROM token_usage_history WHERE pool_id = p.id"
                    " ORDER BY revision DESC LIMIT 1) h ON true",
                    (ids,),
                )
            }
            held = {
                int(r[0]): r[1:]
                for r in conn.execute(
                    "SELECT pool_id, max(fence), "
                    + ", ".join(
                        f"{f}({epoch_us.format(c)})"
                        for c in ("assigned_at", "expires_at")
                        for f in ("max", "min")
                    )
                    + " FROM token_assignments WHERE pool_id = ANY(%s) GROUP BY pool_id",
                    (ids,),
                )
            }
            tops: list[int] = []
            ats: list[int] = []
            for name, pool_id in zip(names, ids, strict=True):
                revision, at = self._check_high_water(
                    name, newest.get(pool_id), held.get(pool_id, (None,) * 5)
                )
                tops.append(revision)
                ats.append(at)
            got = {
                int(r[0]): r
                for r in conn.execute(
                    "UPDATE pools p SET revision = greatest(p.revision, v.rev),"
                    " clock_us = greatest(p.clock_us, v.at),"
                    " owner_epoch = greatest(p.owner_epoch + 1,"
                    " (greatest(p.revision, v.rev) >> 40) + 1),"
                    " owner = %s, owned_at = now()"
                    " FROM unnest(%s::integer[], %s::bigint[], %s::bigint[]) AS v(id, rev, at)"
                    " WHERE p.id = v.id RETURNING p.id, p.owner_epoch, p.revision, p.clock_us,"
                    " p.size, p.ttl_seconds, p.when_full, p.min_hold_seconds,"
                    " p.max_lifetime_seconds, " + ", ".join(f"p.{c}" for c in _COUNTERS),
                    (owner, ids, tops, ats),
                )
            }
        tokens: dict[int, list[tuple[str, int]]] = {pool_id: [] for pool_id in ids}
        for r in conn.execute(
            "SELECT pool_id, id, created_at FROM tokens WHERE pool_id = ANY(%s)"
            " AND retired_at IS NULL ORDER BY pool_id, created_at, id",
            (ids,),
        ):
            tokens[int(r[0])].append((str(r[1]), to_us(r[2])))
        leases: dict[int, list[tuple[str, str, str, int, int, int]]] = {i: [] for i in ids}
        for r in conn.execute(
            "SELECT pool_id, lease_id, token_id, user_id, fence, assigned_at, expires_at"
            " FROM token_assignments WHERE pool_id = ANY(%s) AND lease_id IS NOT NULL"
            " ORDER BY pool_id, assigned_at, fence",
            (ids,),
        ):
            leases[int(r[0])].append(
                (str(r[1]), str(r[2]), r[3], int(r[4]), to_us(r[5]), to_us(r[6]))
            )
        snapshots = []
        for name, pool_id in zip(names, ids, strict=True):
            snapshots.append(
                self._snapshot(
                    got[pool_id],
                    tokens[pool_id],
                    leases[pool_id],
                    rows[name][3] is not None,  # not dropped (checked above): owned before?
                )
            )
        return snapshots

    @staticmethod
    def _snapshot(
        got: Any,
        tokens: list[tuple[str, int]],
        leases: list[tuple[str, str, str, int, int, int]],
        unclean: bool,
        made: bool = False,
    ) -> Snapshot:
        """A snapshot from the ``pools`` row after the epoch bump (``got``: id, epoch,
        revision, clock, the settings, the counters) and the pool's tokens and leases;
        ``unclean``: its previous owner did not release it. The one place both
        ``open_pool`` and ``open_pools`` read that row."""
        pool_id, epoch, revision, clock_us = int(got[0]), int(got[1]), int(got[2]), int(got[3])
        stored = {
            "size": int(got[4]),
            "ttl": float(got[5]),
            "when_full": got[6],
            "min_hold": float(got[7]),
            "max_lifetime": None if got[8] is None else float(got[8]),
        }
        counters = {k: int(v) for k, v in zip(_COUNTERS, got[9:], strict=True)}
        clock_us = max(
            clock_us,
            max((lease[4] for lease in leases), default=0),
            max((t[1] for t in tokens), default=0),
        )
        return Snapshot(
            pool_id, epoch, revision, clock_us, stored, counters, tokens, leases, made, unclean
        )

    def _check_high_water(self, name: str, newest: Any, held: Any) -> tuple[int, int]:
        """The highest revision and time from the newest history row (revision, ended,
        started; or ``None``) and the assignments' (max fence, max/min assigned, max/min
        expires); refuses (``InvalidArgumentError``) a time no reply could show."""
        times = {
            "newest token_usage_history.ended_at": None if newest is None else newest[1],
            "newest token_usage_history.started_at": None if newest is None else newest[2],
            "latest token_assignments.assigned_at": held[1],
            "earliest token_assignments.assigned_at": held[2],
            "latest token_assignments.expires_at": held[3],
            "earliest token_assignments.expires_at": held[4],
        }
        for what, value in times.items():
            if value is not None and not MIN_TIME_US <= value <= MAX_TIME_US:
                raise InvalidArgumentError(
                    f"pool {name!r} in {self.url} holds a time outside years 1 to 9999"
                    f" ({what}): fix or remove that row, then start again"
                )
        revision = max(0 if newest is None else int(newest[0]), int(held[0] or 0))
        at = max(0 if newest is None else int(newest[1]), int(held[1] or 0))
        return revision, at

    def _high_water(self, conn: psycopg.Connection[Any], name: str) -> tuple[int, int]:
        """The highest revision and time the pool's rows hold, whatever its ``pools`` row
        says (one restored from an older backup must not restart fences below them): the
        newest history row (one probe of the primary key) and every assignment. Refuses
        (``InvalidArgumentError``) a time no reply could show, before anything loads it."""
        epoch_us = "(extract(epoch FROM {0}) * 1000000)::numeric"
        newest = conn.execute(
            "SELECT revision, "
            + epoch_us.format("ended_at")
            + ", "
            + epoch_us.format("started_at")
            + " FROM token_usage_history WHERE pool_id = (SELECT id FROM pools WHERE name = %s)"
            " ORDER BY revision DESC LIMIT 1",
            (name,),
        ).fetchone()
        held = conn.execute(
            "SELECT max(fence), "
            + ", ".join(
                f"{f}({epoch_us.format(c)})"
                for c in ("assigned_at", "expires_at")
                for f in ("max", "min")
            )
            + " FROM token_assignments WHERE pool_id = (SELECT id FROM pools WHERE name = %s)",
            (name,),
        ).fetchone()
        assert held is not None
        return self._check_high_water(name, newest, held)

    def prove(self) -> dict[int, str]:
        """The session holding the advisory locks is alive (a reconnection retakes them
        all, or is fenced) and every pool's ``owner_epoch`` is still ours."""
        if not self._pools:
            return {}
        try:
            conn = self._connection()
            rows = conn.execute(
                "SELECT id, owner_epoch FROM pools WHERE id = ANY(%s)", (list(self._pools),)
            ).fetchall()
        except psycopg.Error as error:
            self._drop_broken()
            raise StoreError(
                f"ownership check on {self.url} failed: {_first_line(error)}"
            ) from error
        epochs = {int(r[0]): int(r[1]) for r in rows}
        lost = {
            pool_id: f"pool {name!r} was taken over by a newer owner (ours was epoch {epoch})"
            for pool_id, (name, epoch) in self._pools.items()
            if epochs.get(pool_id) != epoch
        }
        lost.update(self._lost)
        return lost

    def _unlock(self, conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute(
            "SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
            (f"tokenpool/{self.schema}/{name}",),
        )

    def write(self, pool_id: int, batch: Batch, tokens: SlotTokens, retry: bool) -> None:
        name, epoch = self._pools[pool_id]
        if pool_id in self._lost:
            raise FencedError(self._lost[pool_id])
        try:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                c = batch.counters
                cur.execute(
                    "UPDATE pools SET written_at = now(), revision = greatest(revision, %s),"
                    f" clock_us = greatest(clock_us, %s), {_SET_COUNTERS}"
                    " WHERE id = %s AND owner_epoch = %s",
                    (
                        batch.revision,
                        batch.clock_us,
                        *(c.get(k, 0) for k in _COUNTERS),
                        pool_id,
                        epoch,
                    ),
                )
                if cur.rowcount != 1:  # raising here rolls the whole batch back
                    raise FencedError(
                        f"pool {name!r} was taken over by a newer owner"
                        f" (this process has epoch {epoch})"
                    )
                users = self._users.unknown(batch.users)
                self._statements(cur, pool_id, batch, tokens, retry, users)
            self._users.committed(users)
        except (FencedError, RejectedError):
            raise
        except psycopg.Error as error:
            self._drop_broken()
            message = f"write to {self.url} failed: {_first_line(error)}"
            if _permanent(error):
                raise RejectedError(message) from error
            raise StoreError(message) from error

    def _statements(
        self,
        cur: psycopg.Cursor[Any],
        pool_id: int,
        batch: Batch,
        tokens: SlotTokens,
        retry: bool,
        users: list[str],
    ) -> None:
        if batch.tokens_added:
            ids = [t for _, t, _ in batch.tokens_added]
            cur.execute(
                "INSERT INTO tokens (id, pool_id, created_at)"
                " SELECT u.id, %s, timestamptz 'epoch' + u.at * interval '1 microsecond'"
                " FROM unnest(%s::uuid[], %s::bigint[]) AS u(id, at) ON CONFLICT (id) DO NOTHING",
                (pool_id, ids, [a for _, _, a in batch.tokens_added]),
            )
            cur.execute(
                "INSERT INTO token_assignments (token_id, pool_id) SELECT unnest(%s::uuid[]), %s"
                " ON CONFLICT (token_id) DO NOTHING",
                (ids, pool_id),
            )
        if users:
            cur.execute(
                "INSERT INTO users (id) SELECT unnest(%s::text[]) ON CONFLICT (id) DO NOTHING",
                (users,),
            )
        if batch.history:
            data = history_copy(pool_id, batch.history, tokens)
            if retry:
                cur.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS staged_history"
                    " (LIKE token_usage_history) ON COMMIT DELETE ROWS"
                )
                with cur.copy("COPY staged_history FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(data)
                cur.execute(
                    "INSERT INTO token_usage_history SELECT * FROM staged_history"
                    " ON CONFLICT DO NOTHING"
                )
                # What was there must be the same lease (the earlier attempt committed),
                # never another one: a collision with history is refused, not ignored.
                cur.execute(
                    "SELECT s.revision, h.lease_id, s.lease_id FROM staged_history s"
                    " JOIN token_usage_history h USING (pool_id, revision)"
                    " WHERE h.lease_id <> s.lease_id LIMIT 1"
                )
                clash = cur.fetchone()
                if clash is not None:
                    raise RejectedError(
                        f"history revision {clash[0]} already holds lease {clash[1]}, not"
                        f" {clash[2]}: the store's history is ahead of this pool's revision"
                    )
            else:
                with cur.copy(
                    "COPY token_usage_history (pool_id, revision, lease_id, token_id, fence,"
                    " started_at, ended_at, expiration_reason, user_id) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.write(data)
        if batch.final:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS staged_leases (token_id uuid, lease_id uuid,"
                " fence bigint, assigned_at timestamptz, expires_at timestamptz, user_id text)"
                " ON COMMIT DELETE ROWS"
            )
            with cur.copy("COPY staged_leases FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(leases_copy(batch.final, tokens))
            cur.execute(
                "UPDATE token_assignments a SET lease_id = s.lease_id, user_id = s.user_id,"
                " fence = s.fence, assigned_at = s.assigned_at, expires_at = s.expires_at"
                " FROM staged_leases s WHERE a.token_id = s.token_id"
            )
        if batch.tokens_retired:
            cur.execute(
                "UPDATE tokens"
                " SET retired_at = timestamptz 'epoch' + u.at * interval '1 microsecond'"
                " FROM unnest(%s::uuid[], %s::bigint[]) AS u(id, at)"
                " WHERE tokens.id = u.id AND retired_at IS NULL",
                (
                    [tokens[s] for s, _ in batch.tokens_retired],
                    [a for _, a in batch.tokens_retired],
                ),
            )

    def list_pools(self) -> list[str]:
        try:
            rows = (
                self._connection()
                .execute("SELECT name FROM pools WHERE dropped_at IS NULL ORDER BY id")
                .fetchall()
            )
        except psycopg.Error as error:
            self._drop_broken()
            raise StoreError(f"listing pools in {self.url} failed: {_first_line(error)}") from error
        return [r[0] for r in rows]

    def save_settings(self, pool_id: int, settings: dict[str, Any]) -> None:
        name, epoch = self._pools[pool_id]
        try:
            conn = self._connection()
            conn.execute(
                "UPDATE pools SET size = %s, ttl_seconds = %s, when_full = %s,"
                " min_hold_seconds = %s, max_lifetime_seconds = %s"
                " WHERE id = %s AND owner_epoch = %s",
                (
                    settings["size"],
                    settings["ttl"],
                    settings["when_full"],
                    settings["min_hold"],
                    settings["max_lifetime"],
                    pool_id,
                    epoch,
                ),
            )
        except psycopg.Error as error:
            self._drop_broken()
            raise StoreError(
                f"saving pool {name!r} settings failed: {_first_line(error)}"
            ) from error

    def drop_pool(self, pool_id: int) -> None:
        name, epoch = self._pools.pop(pool_id)
        self._lost.pop(pool_id, None)
        try:
            conn = self._connection()
            conn.execute(
                "UPDATE pools SET dropped_at = now(), owner = NULL"
                " WHERE id = %s AND owner_epoch = %s",
                (pool_id, epoch),
            )
            self._unlock(conn, name)
        except psycopg.Error as error:
            self._drop_broken()
            raise StoreError(f"dropping pool {name!r} failed: {_first_line(error)}") from error

    def release_pool(self, pool_id: int) -> None:
        entry = self._pools.pop(pool_id, None)
        if entry is None or self._lost.pop(pool_id, None) is not None:
            return
        name, epoch = entry
        try:
            conn = self._connection()
            conn.execute(
                "UPDATE pools SET owner = NULL WHERE id = %s AND owner_epoch = %s",
                (pool_id, epoch),
            )
            self._unlock(conn, name)
        except (psycopg.Error, StoreError):  # fenced or cut: the next owner finds out
            self._drop_broken()

    def _drop_broken(self) -> None:
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            self._conn = None

    def close(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken and self._pools:
            try:  # released: the next owner need not wait out our validity
                for pool_id, (_name, epoch) in self._pools.items():
                    conn.execute(
                        "UPDATE pools SET owner = NULL WHERE id = %s AND owner_epoch = %s",
                        (pool_id, epoch),
                    )
            except psycopg.Error:
                pass
        if conn is not None:
            conn.close()
        self._conn = None


def _record(row: tuple[Any, ...]) -> Usage:
    """A history row (``_HISTORY_COLUMNS``) as a ``Usage``."""
    lease_id, token_id, user_id, fence, started, ended, revision, reason = row
    return Usage(
        str(lease_id),
        str(token_id),
        user_id,
        to_datetime(to_us(started)),  # in UTC whatever the session's time zone
        to_datetime(to_us(ended)),
        Reason(reason),
        int(revision),
        int(fence),
    )


_HISTORY_COLUMNS = (
    "lease_id, token_id, user_id, fence, started_at, ended_at, revision, expiration_reason::text"
)


class PostgresReader:
    """History reads for the server, on a connection of their own (one at a time)."""

    def __init__(self, url: str, *, write_timeout: float = 5.0) -> None:
        self._url = url
        self.url = redact(url)
        self.write_timeout = write_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _read(self, query: str, args: tuple[Any, ...]) -> list[Usage]:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = connect(self._url, "reader", self.write_timeout)
                rows = self._conn.execute(query, args).fetchall()
            except psycopg.Error as error:
                raise StoreError(
                    f"history read from {self.url} failed: {_first_line(error)}"
                ) from error
        return [_record(r) for r in rows]

    def history(self, pool: str, token_id: str, before: int, limit: int) -> list[Usage]:
        return self._read(
            f"SELECT {_HISTORY_COLUMNS} FROM token_usage_history WHERE token_id = %s"
            " AND revision < %s ORDER BY revision DESC LIMIT %s",
            (token_id, before, limit),
        )

    def user_history(self, pool: str, user_id: str, before: int, limit: int) -> list[Usage]:
        return self._read(
            f"SELECT {_HISTORY_COLUMNS} FROM token_usage_history WHERE pool_id ="
            " (SELECT id FROM pools WHERE name = %s) AND user_id = %s AND revision < %s"
            " ORDER BY revision DESC LIMIT %s",
            (pool, user_id, before, limit),
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
