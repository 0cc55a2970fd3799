"""Persistent stores: what the store process needs, and the choice by URL.

A store is blocking code (sync psycopg, stdlib sqlite3) run in the store
process (``child.py``), never in the server: its Python work stays off the
server's GIL. ``Batch`` folds a run of change records into the few set-wise
writes a transaction needs: the history rows, and each touched token's final
assignment (a lease, or none), so a token leased and re-leased many times in
one batch is written once.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import attrs

from .._errors import InvalidArgumentError, UnavailableError
from .._ids import uuid_bytes, uuid_text
from .._model import (
    ADD,
    CREATED,
    END,
    GRANT,
    KIND,
    RENEW,
    RETIRE,
    SLOT,
    TOKENS,
    USER,
    EndRecord,
    LeaseRecord,
    Record,
    Usage,
    added_tokens,
    record_revision,
)
from .._settings import parse_int

EPOCH_SHIFT = 40
"""Revisions are ``epoch << 40 | n``: each new owner's start above every older one's."""

OWNERSHIP_INTERVAL = 1.0
"""Seconds between the proofs a store link asks of its store process: SQLite, the flock
is held and the path still names the locked file; PostgreSQL, the session holding the
advisory locks is alive and every pool's ``owner_epoch`` is still ours."""
OWNERSHIP_VALIDITY = 2.0
"""Seconds a proof vouches for ownership, counted on the server's monotonic clock from
when the proof was SENT (never from when the answer came). Past it a pool answers
nothing that vouches for a lease until a proof succeeds again. A new owner that finds
its predecessor did not release the store (``Snapshot.unclean``) vouches for nothing
until this long after it took over, so the two validities never overlap."""

MAX_BATCH_RECORDS = 20_000
"""The most change records one transaction carries, and one write frame the server
sends: after an outage the backlog is written in transactions of bounded size (each
within the write timeout, with ownership proofs answered between them), never as one
that grows on every retry and never fits, or that holds a proof past its validity."""

MIN_TIME_US = -62_135_596_800_000_000
"""0001-01-01T00:00:00Z in microseconds since the Unix epoch: Python's first datetime."""
MAX_TIME_US = 253_402_300_799_999_999
"""9999-12-31T23:59:59.999999Z: Python's last datetime. A stored time outside these
bounds cannot be shown; the store is refused at start (``check_times``)."""


def check_times(where: str, times: dict[str, int | None]) -> None:
    """Refuse a store holding a time no reply could show (``InvalidArgumentError``, one
    line naming what and where): every connection reading it would fail."""
    for what, value in times.items():
        if value is not None and not MIN_TIME_US <= value <= MAX_TIME_US:
            raise InvalidArgumentError(
                f"{where} holds a time outside years 1 to 9999 ({what} = {value} microseconds"
                " since 1970): fix or remove that row, then start again"
            )


class LinkState(enum.StrEnum):
    """A pool's link to its store, as statistics, ``INFO``, readiness and the
    ``tokenpool_store_link{state=...}`` metric show it. The values are the wire values."""

    UP = "up"
    """Writes commit."""
    RETRYING = "retrying"
    """A write failed (or none committed for longer than ``write_timeout``): retrying."""
    DOWN = "down"
    """Several retries in a row failed; still retrying, with a longer backoff."""
    FENCED = "fenced"
    """A newer owner took the pool over: this process stops writing it, for good."""
    FAILED = "failed"
    """The store process exited: nothing more is written, for good."""

    @property
    def lost(self) -> bool:
        """Fenced or failed: the link never comes back; activations are refused."""
        return self is LinkState.FENCED or self is LinkState.FAILED


class StoreError(UnavailableError):
    """The store could not carry out a write (connection lost, timeout): retry later."""


class RejectedError(StoreError):
    """The database refused a write for good (a constraint, a bad value): retrying cannot help."""


class FencedError(StoreError):
    """Another owner took this pool over (a newer owner epoch): this process must stop writing."""

    code = "LOCKED"


class SlotTokens:
    """A pool's token ids by slot, as the store process keeps them: 16 bytes a token in
    one bytearray (slots are dense, from 0, in order of addition). A dict of texts cost
    about 170 bytes a token, 170 MB for a pool of a million."""

    __slots__ = ("_blob",)

    def __init__(self, token_ids: Iterable[str] = ()) -> None:
        self._blob = bytearray()
        for token in token_ids:
            self._blob += uuid_bytes(token, "token_id")

    def __len__(self) -> int:
        return len(self._blob) // 16

    def raw(self, slot: int) -> bytes:
        """The slot's token id as 16 UUID bytes."""
        if not 0 <= slot < len(self):
            raise KeyError(slot)
        return bytes(self._blob[16 * slot : 16 * slot + 16])

    def __getitem__(self, slot: int) -> str:
        return uuid_text(self.raw(slot))

    def add(self, slot: int, raw: bytes) -> None:
        """Learn a new token's id: its slot is the next one (or one already known)."""
        if slot < len(self):
            self._blob[16 * slot : 16 * slot + 16] = raw
        elif slot == len(self):
            self._blob += raw
        else:
            raise ValueError(f"slot {slot} added before slot {len(self)}")


@attrs.frozen
class Snapshot:
    """What recovery loads for one pool.

    ``tokens`` in their stable order (created, id); ``leases`` oldest first as
    (lease_id, token_id, user_id, fence, activated_us, expires_us); the pool's
    settings, counters and high-water marks as the store last saw them.
    """

    pool_id: int
    epoch: int
    revision: int
    clock_us: int
    settings: dict[str, Any]
    counters: dict[str, int]
    tokens: list[tuple[str, int]]
    leases: list[tuple[str, str, str, int, int, int]]
    created: bool = False
    unclean: bool = False
    """The previous owner did not release the pool (its store process was killed, its
    file replaced, its session cut): it may still vouch for a while."""


class KnownUsers:
    """User ids this store has committed to ``users``: a batch inserts only the others
    (a load test cycles through the same users, and an ``INSERT OR IGNORE`` of a known
    one still costs an index probe per row). Bounded: forgotten when full.

    The one such cache: each store (SQLite, PostgreSQL) keeps one, since ``users`` is
    shared by every pool of the store, and fills it only once a transaction commits.
    """

    LIMIT = 1_000_000

    def __init__(self) -> None:
        self._known: set[str] = set()

    def unknown(self, users: dict[str, None]) -> list[str]:
        known = self._known
        return [u for u in users if u not in known]

    def committed(self, users: list[str]) -> None:
        if len(self._known) + len(users) > self.LIMIT:
            self._known.clear()
        self._known.update(users)


@attrs.define
class Batch:
    """One pool's changes folded into set-wise writes, applied in ONE transaction."""

    tokens_added: list[tuple[int, str, int]] = attrs.Factory(list)  # slot, token id, created
    tokens_retired: list[tuple[int, int]] = attrs.Factory(list)  # slot, at
    history: list[EndRecord] = attrs.Factory(list)
    final: dict[int, LeaseRecord | None] = attrs.Factory(dict)  # slot -> lease now, or None
    users: dict[str, None] = attrs.Factory(dict)
    records: int = 0
    counters: dict[str, int] = attrs.Factory(dict)
    clock_us: int = 0
    revision: int = 0

    def add(self, records: list[Record], counters: dict[str, int], clock_us: int) -> None:
        """Fold ``records`` (in the order the pool made them) into the batch."""
        final = self.final
        history = self.history
        users = self.users
        for record in records:
            kind = record[KIND]
            if kind == END:
                history.append(record)
                final[record[SLOT]] = None
            elif kind == GRANT:
                final[record[SLOT]] = record
                users[record[USER]] = None
            elif kind == RENEW:  # a renewal's user is known already
                final[record[SLOT]] = record
            elif kind == ADD:
                created = record[CREATED]
                self.tokens_added += [
                    (slot, uuid_text(raw), created) for slot, raw in added_tokens(record)
                ]
            elif kind == RETIRE:
                self.tokens_retired += [(slot, record[CREATED]) for slot in record[TOKENS]]
                for slot in record[TOKENS]:
                    final[slot] = None
        self.records += len(records)
        if records:
            self.revision = max(self.revision, record_revision(records[-1]))
        self.counters = counters
        self.clock_us = max(self.clock_us, clock_us)

    def __bool__(self) -> bool:
        return self.records > 0 or bool(self.counters)


class Store(Protocol):
    """A persistent store, run in the store process. Every method blocks."""

    kind: str
    url: str

    def open_pool(self, name: str, settings: dict[str, Any], create: bool) -> Snapshot:
        """Take ownership of pool ``name`` (bumping its owner epoch) and load it.

        ``create``: make the pool (with ``settings``) if it does not exist. Raises
        ``PoolLockedError`` when another process owns it, ``UnknownPoolError`` when
        it does not exist and ``create`` is false.
        """

    def open_pools(self, names: list[str]) -> list[Snapshot]:
        """``open_pool`` (``create`` false) for many pools in one transaction, in a number
        of statements that does not grow with the pools (restore at start). Raises as
        ``open_pool``; then none of them is taken."""

    def write(self, pool_id: int, batch: Batch, tokens: SlotTokens, retry: bool) -> None:
        """Apply ``batch`` in one transaction, idempotently (``retry``: it may have
        committed already). Raises ``StoreError``, ``RejectedError``, ``FencedError``."""

    def list_pools(self) -> list[str]:
        """The names of the pools not dropped, oldest first."""

    def prove(self) -> dict[int, str]:
        """Show this process still owns its pools: the ids of those it no longer owns,
        with why. Raises ``StoreError`` when it cannot tell (no proof then)."""

    def save_settings(self, pool_id: int, settings: dict[str, Any]) -> None: ...

    def drop_pool(self, pool_id: int) -> None: ...

    def release_pool(self, pool_id: int) -> None:
        """Stop owning one pool (marked released; best effort: never raises), keep
        serving the others (cluster mode: its hash slot moves to another node)."""

    def close(self) -> None:
        """Release ownership (marking each pool released, so the next owner need not
        wait out this one's validity) and close connections."""


class Reader(Protocol):
    """Reads the server makes itself (history past memory), on a connection of its own."""

    def history(self, pool: str, token_id: str, before: int, limit: int) -> list[Usage]:
        """END records of a token with a revision below ``before``, newest first."""

    def user_history(self, pool: str, user_id: str, before: int, limit: int) -> list[Usage]:
        """END records of a user in pool ``pool`` with a revision below ``before``, newest first."""

    def close(self) -> None: ...


def redact(url: str) -> str:
    """A store URL safe to show: no password, in URL or key=value form.

    ``CONFIG GET``, ``INFO``, logs and error messages show only this.
    """
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")
        user = netloc[0].partition(":")[0]
        host = (user + "@" if user else "") + netloc[2]  # host[:port][,host[:port]...]
        query = [(k, v) for k, v in parse_qsl(parts.query) if k.lower() not in _SECRET_KEYS]
        shown = f"{parts.scheme}://{host}{parts.path}"
        return f"{shown}?{urlencode(query)}" if query else shown
    return re.sub(r"(?i)\b(password|passfile|sslpassword)\s*=\s*('[^']*'|\S+)", r"\1=***", url)


_SECRET_KEYS = {"password", "passfile", "sslpassword", "sslkey"}


def check_store_url(url: object) -> str | None:
    """The store URL as given (``None`` for memory only); ``InvalidArgumentError`` else."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise InvalidArgumentError(f"store must be a URL string or None, not {type(url).__name__}")
    if url.startswith(("postgresql://", "postgres://")):
        _check_postgres_url(url)
        return url
    if url.startswith("sqlite://"):
        from .sqlite import sqlite_path

        sqlite_path(url)
        return url
    raise InvalidArgumentError(
        "store must be a postgresql:// or sqlite:/// URL, or None for memory only;"
        f" not {redact(url)[:80]!r}"
    )


def _check_postgres_url(url: str) -> None:
    """Refuse a PostgreSQL URL libpq could not use, naming what is wrong (never the
    password): a bad port, a bracket left open, a malformed option."""
    try:
        parts = urlsplit(url)
        for host in parts.netloc.rpartition("@")[2].split(","):
            name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
            if colon and port:
                parse_int(port, "port", 1, 65535)  # ASCII digits only, in range
            if name.startswith("[") != name.endswith("]"):
                raise ValueError(f"host {name[:60]!r} has an unclosed bracket")
        from psycopg.conninfo import conninfo_to_dict

        from .postgres import _dsn_and_schema

        conninfo_to_dict(_dsn_and_schema(url)[0])
    except Exception as error:  # ValueError from urlsplit, psycopg.ProgrammingError, ours
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidArgumentError(
            f"store URL {_redact_safe(url)!r} is not a valid PostgreSQL URL: {why}"
        ) from None


def _redact_safe(url: str) -> str:
    """``redact`` for a URL that may not even parse."""
    try:
        return redact(url)[:120]
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)[:120]


def open_store(
    url: str,
    *,
    write_timeout: float,
    durability: str,
    lock_wait: float = 5.0,
    take_over: bool = False,
) -> Store:
    """The store for ``url`` (in the store process).

    ``lock_wait``: seconds to wait for a previous owner's store process (a crashed
    server's, still writing what it held) before ``PoolLockedError``. ``take_over``
    (PostgreSQL, cluster mode: the node holds the pool's slot lease, so any other
    holder of the pool's lock is stale): end the session holding it instead.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(
            url, write_timeout=write_timeout, lock_wait=lock_wait, take_over=take_over
        )
    from .sqlite import SqliteStore

    # WAL with synchronous=NORMAL survives a process crash; FULL also an OS crash.
    return SqliteStore(
        url,
        write_timeout=write_timeout,
        synchronous="FULL" if durability == "sync" else "NORMAL",
        lock_wait=lock_wait,
    )


def open_reader(url: str, *, write_timeout: float) -> Reader:
    """A reader for ``url`` (in the server, used from a worker thread)."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresReader

        return PostgresReader(url, write_timeout=write_timeout)
    from .sqlite import SqliteReader

    return SqliteReader(url, write_timeout=write_timeout)
