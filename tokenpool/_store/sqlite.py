"""The embedded SQLite store (stdlib ``sqlite3``): the default for ``tokenpool serve``.

A new user needs no database server. Same model and guarantees as the
PostgreSQL store: one transaction per batch, idempotent rows, an owner epoch
checked by every batch.

Ownership follows the file, not its name: the store process holds an
exclusive ``flock`` on the database file itself, so a second server that
reaches the same file through a symlink or another relative path is
refused (two processes writing one file through two names would also give it
two WAL files), and a file with a second hard link is refused at once: SQLite
keeps the WAL beside the name used, so after a crash another name misses the
changes still in it, and the first name later replays them over newer ones.
The kernel releases the lock when the process dies. Before every batch the
store checks that its path still names the file it locked, so a database
replaced or deleted under it stops it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .._errors import InvalidArgumentError, PoolLockedError, UnavailableError, UnknownPoolError
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
    Reason,
    Usage,
    to_datetime,
)
from . import (
    Batch,
    FencedError,
    KnownUsers,
    RejectedError,
    SlotTokens,
    Snapshot,
    StoreError,
    check_times,
)

T = TypeVar("T")

LOCK_WAIT = 5.0  # seconds to wait for a previous owner's store process to finish

_COUNTERS = tuple(COUNTERS)
_SET_COUNTERS = ", ".join(f"{name} = ?" for name in COUNTERS)


def sqlite_path(url: str) -> Path:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (as SQLAlchemy)."""
    rest = url.removeprefix("sqlite://")
    if not rest.startswith("/") or len(rest) < 2 or "\x00" in rest:
        raise InvalidArgumentError(
            f"a SQLite store URL looks like sqlite:///path/file.db, not {url[:80]!r}"
        )
    return Path(rest[1:])


def _now_us() -> int:
    return time.time_ns() // 1000


def _connect(path: Path, write_timeout: float, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=write_timeout, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the indexes' hot pages stay in memory
    conn.execute("PRAGMA temp_store = MEMORY")
    # Checkpoint every 64 MiB of WAL, not SQLite's 4 MiB: a checkpoint runs in the
    # committing connection and copies every page changed since the last one, and the
    # history's index pages change in every batch. At 4 MiB the store process spent its
    # time copying the same hot pages, and the 60 s sustained run filled the backlog
    # (800 refusals); at 64 MiB it kept up (0 refusals, 17.5k activations/s).
    conn.execute("PRAGMA wal_autocheckpoint = 16384")
    # After a checkpoint, keep at most this much WAL on disk (SQLite keeps all of it).
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    return conn


JOURNAL_SIZE_LIMIT = 64 << 20
WAL_FLOOR = 1 << 20  # below this the WAL is never checkpointed for want of room


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database and truncate it to nothing: a WAL grown to fill a
    small disk otherwise fails every write with "database or disk is full" for good,
    across restarts (SQLite checkpoints on its own only every 64 MiB)."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error:
        pass  # a reader holds the WAL or the disk is still full: the retry tries again


def _check_history(conn: sqlite3.Connection, pool_id: int, rows: list[tuple[Any, ...]]) -> None:
    """A retried batch found some of its history rows stored: each must be the same lease
    (the earlier attempt committed), never another one (a collision with history)."""
    for row in rows:
        got = conn.execute(
            "SELECT lease_id FROM token_usage_history WHERE pool_id = ? AND revision = ?",
            (pool_id, row[1]),
        ).fetchone()
        if got is not None and got[0] != row[2]:
            raise RejectedError(
                f"history revision {row[1]} already holds lease {got[0]}, not {row[2]}:"
                " the store's history is ahead of this pool's revision"
            )


class SqliteStore:
    """Every pool of one SQLite file, owned by this store process."""

    kind = "sqlite"

    def __init__(
        self,
        url: str,
        *,
        write_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        lock_wait: float = LOCK_WAIT,
    ) -> None:
        self.url = url
        self.lock_wait = lock_wait
        self.path = sqlite_path(url)
        self.write_timeout = write_timeout
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pools: dict[int, tuple[str, int]] = {}
        self._users = KnownUsers()
        # pool id -> each slot's tokens.no (slots as the server numbers them: the live
        # tokens in (created, id) order, then those added since): 8 bytes a token.
        self._numbers: dict[int, array[int]] = {}

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            self._check_identity()
            return self._conn
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise UnavailableError(
                f"cannot open the SQLite file {path}: {error.strerror}"
                " (is its directory writable? pass --dsn to use another)"
            ) from None
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A crashed server's store process may still be writing what it held:
                # it exits (and frees the lock) once done. Wait a little for it.
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise PoolLockedError(
                        f"the SQLite file {path} is in use by another tokenpool process"
                        " (through this path or another link to it); stop it first"
                    ) from None
                time.sleep(0.05)
        links = os.fstat(fd).st_nlink
        if links > 1:
            # SQLite keeps the write-ahead log beside the NAME it opens: opened by another
            # name after a crash, the file misses the committed changes still in the log
            # (fences go back, leases vanish), and a later open by the first name replays
            # them over newer ones. One name only.
            os.close(fd)
            raise PoolLockedError(
                f"the SQLite file {path} has {links} names (hard links): SQLite keeps its"
                " write-ahead log beside the name used, so another name may miss or replay"
                " committed changes; remove the other links (keep the name it was used by)"
            )
        self._lock_fd = fd
        try:
            conn = _connect(path, self.write_timeout, self.synchronous)
            old = conn.execute("SELECT name FROM pragma_table_info('pools')").fetchall()
            if old and ("id",) not in old:
                raise StoreError(
                    f"the SQLite file {path} holds tokenpool's version 1 tables; this version"
                    " needs version 2: use another file"
                )
            _checkpoint(conn)  # a WAL left by a disk that filled up: free its room first
            conn.executescript(resources.files(__package__).joinpath("sqlite.sql").read_text())
        except sqlite3.Error as error:
            self._release()
            hint = ""
            if "unable to open" in str(error):  # the file opened: its WAL or SHM did not
                hint = " (is its directory writable? SQLite makes its -wal and -shm files there)"
            raise StoreError(f"cannot open the SQLite file {path}: {error}{hint}") from error
        except StoreError:
            self._release()
            raise
        self._conn = conn
        return conn

    def _check_identity(self) -> None:
        assert self._lock_fd is not None
        held = os.fstat(self._lock_fd)
        try:
            now = os.stat(self.path)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise FencedError(
                f"the SQLite file {self.path} was removed or replaced;"
                " this process no longer owns it"
            )

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def open_pool(self, name: str, settings: dict[str, Any], create: bool) -> Snapshot:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                taken = self._take(conn, name, settings, create)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return self._load(conn, name, *taken)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open pool {name!r} in {self.path}: {error}") from error

    def open_pools(self, names: list[str]) -> list[Snapshot]:
        """``open_pool`` for many stored pools at once (restore at start): ownership of
        all of them taken in ONE transaction (one commit), then each one loaded. Raises
        as ``open_pool`` does; then no pool of the batch is taken."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                taken = [self._take(conn, name, None, False) for name in names]
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return [self._load(conn, name, *t) for name, t in zip(names, taken, strict=True)]
        except sqlite3.Error as error:
            raise StoreError(f"cannot open {len(names)} pools in {self.path}: {error}") from error

    def _take(
        self, conn: sqlite3.Connection, name: str, settings: dict[str, Any] | None, create: bool
    ) -> tuple[Any, bool, Any]:
        """In the caller's transaction: make the pool if asked (``settings``), bump its
        owner epoch above everything stored; the row before, whether it was made, and
        the row after."""
        made = False
        row = conn.execute(
            "SELECT id, dropped_us IS NOT NULL, owner FROM pools WHERE name = ?", (name,)
        ).fetchone()
        if row is None or row[1]:
            if not create or settings is None:
                raise UnknownPoolError(f"no pool {name!r} in {self.path}")
            made = True
            values = (
                settings["size"],
                settings["ttl"],
                settings["when_full"],
                settings["min_hold"],
                settings["max_lifetime"],
            )
            if row is None:
                conn.execute(
                    "INSERT INTO pools (name, size, ttl_seconds, when_full, min_hold_seconds,"
                    " max_lifetime_seconds, created_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, *values, _now_us()),
                )
            else:
                conn.execute(
                    "UPDATE pools SET dropped_us = NULL, size = ?, ttl_seconds = ?,"
                    " when_full = ?, min_hold_seconds = ?, max_lifetime_seconds = ?"
                    " WHERE name = ?",
                    (*values, name),
                )
        top_revision, top_us = self._high_water(conn, name)
        conn.execute(
            "UPDATE pools SET revision = max(revision, ?), clock_us = max(clock_us, ?),"
            " owner_epoch = max(owner_epoch + 1, (max(revision, ?) >> 40) + 1),"
            " owner = ?, owned_us = ? WHERE name = ?",
            (
                top_revision,
                top_us,
                top_revision,
                f"{socket.gethostname()}:{os.getpid()}",
                _now_us(),
                name,
            ),
        )
        got = conn.execute(
            "SELECT id, owner_epoch, revision, clock_us, size, ttl_seconds, when_full,"
            " min_hold_seconds, max_lifetime_seconds, "
            + ", ".join(_COUNTERS)
            + " FROM pools WHERE name = ?",
            (name,),
        ).fetchone()
        return row, made, got

    def _load(
        self, conn: sqlite3.Connection, name: str, row: Any, made: bool, got: Any
    ) -> Snapshot:
        """The snapshot of a pool ``_take`` took: its tokens and leases read now."""
        pool_id = int(got[0])
        rows = conn.execute(
            "SELECT id, created_us, no FROM tokens WHERE pool_id = ? AND retired_us IS NULL"
            " ORDER BY created_us, id",
            (pool_id,),
        ).fetchall()
        self._numbers[pool_id] = array("q", [r[2] for r in rows])
        tokens = [(r[0], r[1]) for r in rows]
        leases = conn.execute(
            "SELECT a.lease_id, t.id, a.user_id, a.fence, a.assigned_us, a.expires_us"
            " FROM token_assignments a JOIN tokens t ON t.no = a.token_no"
            " WHERE a.pool_id = ? AND a.lease_id IS NOT NULL ORDER BY a.assigned_us, a.fence",
            (pool_id,),
        ).fetchall()
        epoch = int(got[1])
        self._pools[pool_id] = (name, epoch)
        stored = {
            "size": int(got[4]),
            "ttl": float(got[5]),
            "when_full": got[6],
            "min_hold": float(got[7]),
            "max_lifetime": None if got[8] is None else float(got[8]),
        }
        counters = {k: int(v) for k, v in zip(_COUNTERS, got[9:], strict=True)}
        clock_us = max(
            int(got[3]),
            max((r[4] for r in leases), default=0),
            max((t[1] for t in tokens), default=0),
        )
        return Snapshot(
            pool_id,
            epoch,
            int(got[2]),
            clock_us,
            stored,
            counters,
            [(t[0], int(t[1])) for t in tokens],
            [(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5])) for r in leases],
            made,
            unclean=row is not None and not row[1] and row[2] is not None,
        )

    def _bound_wal(self, conn: sqlite3.Connection) -> None:
        """Checkpoint (and truncate) the WAL once it is as big as the room left on its
        disk, so it never takes more than half of what was free: a WAL that fills the
        disk cannot be checkpointed any more (the database must grow first), and SQLite
        would checkpoint on its own only at 64 MiB. Two system calls a batch."""
        try:
            wal = os.stat(f"{self.path}-wal").st_size
            if wal < WAL_FLOOR:
                return
            disk = os.statvfs(self.path)
        except OSError:
            return
        if wal >= disk.f_bavail * disk.f_frsize:
            _checkpoint(conn)

    def _high_water(self, conn: sqlite3.Connection, name: str) -> tuple[int, int]:
        """The highest revision and time the pool's rows hold, whatever its ``pools`` row
        says (a row restored from an older backup must not restart fences below them):
        the newest history row (by the primary key: one probe) and every assignment.
        Refuses (``InvalidArgumentError``) a time no reply could show."""
        pool_id = conn.execute("SELECT id FROM pools WHERE name = ?", (name,)).fetchone()[0]
        newest = conn.execute(
            "SELECT revision, ended_us, started_us FROM token_usage_history WHERE pool_id = ?"
            " ORDER BY revision DESC LIMIT 1",
            (pool_id,),
        ).fetchone()
        held = conn.execute(
            "SELECT max(fence), max(assigned_us), min(assigned_us), max(expires_us),"
            " min(expires_us) FROM token_assignments WHERE pool_id = ?",
            (pool_id,),
        ).fetchone()
        clock = conn.execute("SELECT clock_us FROM pools WHERE id = ?", (pool_id,)).fetchone()
        check_times(
            f"pool {name!r} in {self.path}",
            {
                "pools.clock_us": clock[0],
                "newest token_usage_history.ended_us": None if newest is None else newest[1],
                "newest token_usage_history.started_us": None if newest is None else newest[2],
                "latest token_assignments.assigned_us": held[1],
                "earliest token_assignments.assigned_us": held[2],
                "latest token_assignments.expires_us": held[3],
                "earliest token_assignments.expires_us": held[4],
            },
        )
        revision = max(0 if newest is None else int(newest[0]), int(held[0] or 0))
        at = max(0 if newest is None else int(newest[1]), int(held[1] or 0))
        return revision, at

    def prove(self) -> dict[int, str]:
        """The flock is held and the path still names the locked file; else every pool
        is lost (the file is the unit of ownership)."""
        if self._conn is None or self._lock_fd is None:
            return {}
        try:
            self._check_identity()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours: a no-op
        except (FencedError, OSError) as error:
            return {pool_id: str(error) for pool_id in self._pools}
        return {}

    def write(self, pool_id: int, batch: Batch, tokens: SlotTokens, retry: bool) -> None:
        name, epoch = self._pools[pool_id]
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                c = batch.counters
                fenced = (
                    conn.execute(
                        "UPDATE pools SET written_us = ?, revision = max(revision, ?),"
                        f" clock_us = max(clock_us, ?), {_SET_COUNTERS}"
                        " WHERE id = ? AND owner_epoch = ?",
                        (
                            _now_us(),
                            batch.revision,
                            batch.clock_us,
                            *(c.get(k, 0) for k in _COUNTERS),
                            pool_id,
                            epoch,
                        ),
                    ).rowcount
                    != 1
                )
                if fenced:
                    raise FencedError(f"pool {name!r} was taken over by a newer owner")
                users = self._users.unknown(batch.users)
                self._statements(conn, pool_id, batch, tokens, users, retry)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._users.committed(users)
            self._bound_wal(conn)
        except sqlite3.IntegrityError as error:
            raise RejectedError(f"write to {self.path} refused: {error}") from error
        except sqlite3.Error as error:
            if error.sqlite_errorcode == sqlite3.SQLITE_FULL:
                _checkpoint(conn)  # the WAL may be what fills the disk: the retry finds room
            elif conn.in_transaction:  # a COMMIT that failed leaves its transaction open
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise StoreError(f"write to {self.path} failed: {error}") from error

    def _statements(
        self,
        conn: sqlite3.Connection,
        pool_id: int,
        batch: Batch,
        tokens: SlotTokens,
        users: list[str],
        retry: bool,
    ) -> None:
        numbers = self._numbers.setdefault(pool_id, array("q"))
        if batch.tokens_added:
            for slot, token, at in batch.tokens_added:
                # Always asked (a token row rolled back with a failed batch is made again,
                # one committed before gives its number back): adding tokens is rare.
                row = conn.execute(
                    "INSERT INTO tokens (id, pool_id, created_us) VALUES (?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET id = excluded.id RETURNING no",
                    (token, pool_id, at),
                ).fetchone()
                if slot >= len(numbers):
                    numbers.extend([-1] * (slot + 1 - len(numbers)))
                numbers[slot] = int(row[0])
            conn.executemany(
                "INSERT OR IGNORE INTO token_assignments (token_no, pool_id) VALUES (?, ?)",
                [(numbers[slot], pool_id) for slot, _, _ in batch.tokens_added],
            )
        if users:
            conn.executemany("INSERT OR IGNORE INTO users (id) VALUES (?)", [(u,) for u in users])
        if batch.history:
            rows = [
                (
                    pool_id,
                    r[REV],
                    r[ID],
                    numbers[r[SLOT]],
                    r[FENCE],
                    r[START],
                    r[STOP],
                    r[REASON],
                    r[USER],
                )
                for r in batch.history
            ]
            insert = (
                " INTO token_usage_history (pool_id, revision, lease_id, token_no,"
                " fence, started_us, ended_us, expiration_reason, user_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            )
            if not retry:  # a collision with history is an IntegrityError: refused, reported
                conn.executemany("INSERT" + insert, rows)
            elif conn.executemany("INSERT OR IGNORE" + insert, rows).rowcount != len(rows):
                _check_history(conn, pool_id, rows)
        if batch.final:
            free = (None, None, None, None, None)
            conn.executemany(
                "UPDATE token_assignments SET lease_id = ?, user_id = ?, fence = ?,"
                " assigned_us = ?, expires_us = ? WHERE token_no = ?",
                [
                    (
                        *(free if r is None else (r[ID], r[USER], r[FENCE], r[START], r[STOP])),
                        numbers[slot],
                    )
                    for slot, r in batch.final.items()
                ],
            )
        if batch.tokens_retired:
            conn.executemany(
                "UPDATE tokens SET retired_us = ? WHERE no = ? AND retired_us IS NULL",
                [(at, numbers[slot]) for slot, at in batch.tokens_retired],
            )

    def list_pools(self) -> list[str]:
        try:
            rows = (
                self._connection()
                .execute("SELECT name FROM pools WHERE dropped_us IS NULL ORDER BY id")
                .fetchall()
            )
        except sqlite3.Error as error:
            raise StoreError(f"listing pools in {self.path} failed: {error}") from error
        return [r[0] for r in rows]

    def save_settings(self, pool_id: int, settings: dict[str, Any]) -> None:
        _name, epoch = self._pools[pool_id]
        try:
            self._connection().execute(
                "UPDATE pools SET size = ?, ttl_seconds = ?, when_full = ?, min_hold_seconds = ?,"
                " max_lifetime_seconds = ? WHERE id = ? AND owner_epoch = ?",
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
        except sqlite3.Error as error:
            raise StoreError(f"saving settings to {self.path} failed: {error}") from error

    def drop_pool(self, pool_id: int) -> None:
        _name, epoch = self._pools.pop(pool_id)
        try:
            self._connection().execute(
                "UPDATE pools SET dropped_us = ?, owner = NULL WHERE id = ? AND owner_epoch = ?",
                (_now_us(), pool_id, epoch),
            )
        except sqlite3.Error as error:
            raise StoreError(f"dropping a pool in {self.path} failed: {error}") from error

    def release_pool(self, pool_id: int) -> None:
        entry = self._pools.pop(pool_id, None)
        if entry is None:
            return
        with contextlib.suppress(sqlite3.Error, StoreError):
            self._connection().execute(
                "UPDATE pools SET owner = NULL WHERE id = ? AND owner_epoch = ?",
                (pool_id, entry[1]),
            )

    def close(self) -> None:
        """Mark each pool released (the next owner need not wait out our validity), but
        only in the file we still own, then free the lock."""
        if self._conn is not None and self._pools:
            with contextlib.suppress(sqlite3.Error, FencedError):
                self._check_identity()
                self._conn.executemany(
                    "UPDATE pools SET owner = NULL WHERE id = ? AND owner_epoch = ?",
                    [(pool_id, epoch) for pool_id, (_name, epoch) in self._pools.items()],
                )
        self._release()


_HISTORY_COLUMNS = (
    "h.lease_id, t.id, h.user_id, h.fence, h.started_us, h.ended_us, h.revision,"
    " h.expiration_reason"
)
_HISTORY_FROM = "token_usage_history h JOIN tokens t ON t.no = h.token_no"


def _usage(row: tuple[Any, ...]) -> Usage:
    """A history row (``_HISTORY_COLUMNS``) as a ``Usage``."""
    lease_id, token_id, user_id, fence, started, ended, revision, reason = row
    return Usage(
        lease_id,
        token_id,
        user_id,
        to_datetime(started),
        to_datetime(ended),
        Reason(reason),
        int(revision),
        int(fence),
    )


class SqliteReader:
    """History reads for the server: its own read-only connection, on a thread of its own.

    CPython's sqlite3 can crash when a connection is touched from several
    threads, even one at a time, so every call runs on the reader's one thread.
    """

    def __init__(self, url: str, *, write_timeout: float = 5.0) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self.write_timeout = write_timeout
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenpool-sqlite")

    def _on_thread(self, fn: Callable[..., T], *args: object) -> T:
        return self._thread.submit(fn, *args).result()

    def _read(self, query: str, args: tuple[Any, ...]) -> list[Usage]:
        def run() -> list[Usage]:
            if self._conn is None:
                self._conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro",
                    uri=True,
                    timeout=self.write_timeout,
                    check_same_thread=False,
                )
            return [_usage(row) for row in self._conn.execute(query, args).fetchall()]

        try:
            return self._on_thread(run)
        except sqlite3.Error as error:
            raise StoreError(f"history read from {self.path} failed: {error}") from error

    def history(self, pool: str, token_id: str, before: int, limit: int) -> list[Usage]:
        return self._read(
            f"SELECT {_HISTORY_COLUMNS} FROM {_HISTORY_FROM}"
            " WHERE h.token_no = (SELECT no FROM tokens WHERE id = ?)"
            " AND h.revision < ? ORDER BY h.revision DESC LIMIT ?",
            (token_id, before, limit),
        )

    def user_history(self, pool: str, user_id: str, before: int, limit: int) -> list[Usage]:
        return self._read(
            f"SELECT {_HISTORY_COLUMNS} FROM {_HISTORY_FROM} WHERE h.pool_id ="
            " (SELECT id FROM pools WHERE name = ?) AND h.user_id = ? AND h.revision < ?"
            " ORDER BY h.revision DESC LIMIT ?",
            (pool, user_id, before, limit),
        )

    def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._on_thread(run)
        self._thread.shutdown()
