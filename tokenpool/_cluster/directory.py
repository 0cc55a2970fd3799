"""The cluster's tables in PostgreSQL: who is a member, who owns which hash slot.

Blocking code (sync psycopg on a connection of its own, never the store process's),
called from a worker thread by the node's task; every statement has a deadline
(``statement_timeout``, TCP user timeout), so a hung database fails a call instead of
stalling it. The rules it keeps, each in one transaction:

- A node's lease (``cluster_nodes.expires_at``, set from the database's clock) covers
  every slot it owns; renewing it succeeds only while it has not expired.
- A slot is taken only when nobody owns it, or when its owner's lease has expired:
  the transaction holds that owner's row locked (``FOR UPDATE``), so the owner cannot
  renew meanwhile, and each slot's row is re-checked under its own lock, so two
  nodes never both take it. Every takeover bumps the slot's epoch.
- A node gives a slot up only after it stopped serving it (the caller's rule), so a
  slot moves by release, then acquire: never two owners.
"""

from __future__ import annotations

import secrets
from importlib import resources
from typing import Any

import attrs
import psycopg
from psycopg import sql

from .._errors import PoolLockedError
from .._store import StoreError
from .._store.postgres import _SCHEMA_LOCK, _dsn_and_schema, _first_line, connect


@attrs.frozen
class Member:
    """A node as the tables show it."""

    id: str
    address: str
    state: str  # live, draining (giving its slots up)
    live: bool  # its lease has not expired (by the database's clock)
    heartbeat_age: float  # seconds since its last renewal (database clock)


@attrs.frozen
class SlotMap:
    """Who owns which slots: ``ranges`` of (first, last, owner), sorted; ``mine`` the
    epoch of each slot the asking node owns; ``version`` the map's version."""

    version: int
    ranges: tuple[tuple[int, int, str], ...]
    mine: dict[int, int]
    top_epoch: int


@attrs.frozen
class Renewal:
    members: tuple[Member, ...]
    map: SlotMap | None  # None: unchanged since the version the node knew


class Directory:
    """The cluster's tables on one connection (used from one thread at a time)."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self._url = url
        _, self.schema = _dsn_and_schema(url)
        self.timeout = timeout
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        conn = connect(self._url, "cluster", self.timeout)
        self._conn = conn
        return conn

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(self._connection(), *args)
        except psycopg.Error as error:
            if self._conn is not None and (self._conn.broken or self._conn.closed):
                self._conn = None
            raise StoreError(f"cluster: {what} failed: {_first_line(error)}") from error

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- membership -------------------------------------------------------------

    def join(self, node: str, address: str, validity: float) -> int:
        """Join as ``node`` (the tables made if missing); the node's new incarnation.

        Slots an earlier incarnation of it still names (it was killed: its lease ran
        out) are freed. Raises ``PoolLockedError`` while another process holds a live
        lease under that id."""
        return int(self._call("join", self._join, node, address, validity))

    def _join(self, conn: psycopg.Connection[Any], node: str, address: str, v: float) -> int:
        text = resources.files(__package__).joinpath("cluster.sql").read_text()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
            conn.execute(text.encode())
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO cluster_nodes (id, address, expires_at)"
                " VALUES (%s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, state = 'live',"
                " incarnation = cluster_nodes.incarnation + 1, joined_at = now(),"
                " heartbeat_at = now(), expires_at = EXCLUDED.expires_at"
                " WHERE cluster_nodes.expires_at <= now() OR cluster_nodes.state = 'left'"
                " RETURNING incarnation, extract(epoch FROM expires_at - now())",
                (node, address, v),
            ).fetchone()
            if row is None:
                left = conn.execute(
                    "SELECT extract(epoch FROM expires_at - now()) FROM cluster_nodes"
                    " WHERE id = %s",
                    (node,),
                ).fetchone()
                raise PoolLockedError(
                    f"node id {node!r} is held by a live node (its lease runs"
                    f" {float(left[0]) if left else 0:.1f} s more): another process uses"
                    " this --node-id"
                )
            conn.execute("UPDATE cluster_slots SET owner = NULL WHERE owner = %s", (node,))
            conn.execute("UPDATE cluster_version SET version = version + 1")
        return int(row[0])

    def secret(self) -> str:
        """The cluster's secret for node-to-node requests (made by the first to ask)."""
        return str(self._call("secret", self._secret))

    @staticmethod
    def _secret(conn: psycopg.Connection[Any]) -> str:
        with conn.transaction():
            conn.execute(
                "INSERT INTO cluster_secret (secret) VALUES (%s) ON CONFLICT DO NOTHING",
                (secrets.token_hex(32),),
            )
            row = conn.execute("SELECT secret FROM cluster_secret").fetchone()
        return str(row[0]) if row else ""

    def renew(
        self, node: str, incarnation: int, validity: float, known_version: int
    ) -> Renewal | None:
        """Renew the node's lease and read the members (and the slot map if it moved
        since ``known_version``). ``None``: the lease had expired (or the node was
        replaced): everything it owned may be another node's now."""
        result: Renewal | None = self._call(
            "renew", self._renew, node, incarnation, validity, known_version
        )
        return result

    def extend(self, node: str, incarnation: int, validity: float) -> bool:
        """Renew the node's lease only (no members, no map: cheap, for the middle of
        long work). False: the lease had expired."""
        return bool(self._call("extend", self._extend_alone, node, incarnation, validity))

    def _extend_alone(
        self, conn: psycopg.Connection[Any], node: str, incarnation: int, v: float
    ) -> bool:
        with conn.transaction():
            return self._extend(conn, node, incarnation, v)

    def _renew(
        self, conn: psycopg.Connection[Any], node: str, incarnation: int, v: float, known: int
    ) -> Renewal | None:
        with conn.transaction():
            if not self._extend(conn, node, incarnation, v):
                return None
            members = self._members(conn)
            (version,) = conn.execute("SELECT version FROM cluster_version").fetchone() or (0,)
            slot_map = None if version == known else self._map(conn, node, int(version))
        return Renewal(members, slot_map)

    @staticmethod
    def _extend(conn: psycopg.Connection[Any], node: str, incarnation: int, v: float) -> bool:
        row = conn.execute(
            "UPDATE cluster_nodes SET heartbeat_at = now(),"
            " expires_at = now() + make_interval(secs => %s)"
            " WHERE id = %s AND incarnation = %s AND expires_at > now() AND state <> 'left'"
            " RETURNING 1",
            (v, node, incarnation),
        ).fetchone()
        return row is not None

    @staticmethod
    def _members(conn: psycopg.Connection[Any]) -> tuple[Member, ...]:
        return tuple(
            Member(r[0], r[1], r[2], bool(r[3]), float(r[4]))
            for r in conn.execute(
                "SELECT id, address, state, expires_at > now(),"
                " extract(epoch FROM now() - heartbeat_at) FROM cluster_nodes"
                " WHERE state <> 'left' ORDER BY id"
            )
        )

    @staticmethod
    def _map(conn: psycopg.Connection[Any], node: str, version: int) -> SlotMap:
        ranges = tuple(
            (int(r[0]), int(r[1]), str(r[2]))
            for r in conn.execute(
                "SELECT min(slot), max(slot), owner FROM (SELECT slot, owner,"
                " slot - row_number() OVER (PARTITION BY owner ORDER BY slot) AS run"
                " FROM cluster_slots WHERE owner IS NOT NULL) t GROUP BY owner, run ORDER BY 1"
            )
        )
        mine = {
            int(r[0]): int(r[1])
            for r in conn.execute("SELECT slot, epoch FROM cluster_slots WHERE owner = %s", (node,))
        }
        (top,) = conn.execute("SELECT coalesce(max(epoch), 0) FROM cluster_slots").fetchone() or (
            0,
        )
        return SlotMap(version, ranges, mine, int(top))

    # -- slots --------------------------------------------------------------------

    def take(
        self, node: str, incarnation: int, validity: float, slots: list[int]
    ) -> dict[int, int] | None:
        """Take those of ``slots`` nobody owns or whose owner's lease expired (renewing
        the node's own lease in the same transaction); the slots taken and their new
        epochs. ``None``: the node's own lease had expired."""
        taken: dict[int, int] | None = self._call(
            "take", self._take, node, incarnation, validity, slots
        )
        return taken

    def _take(
        self, conn: psycopg.Connection[Any], node: str, incarnation: int, v: float, slots: list[int]
    ) -> dict[int, int] | None:
        with conn.transaction():
            if not self._extend(conn, node, incarnation, v):
                return None
            dead = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM cluster_nodes WHERE id <> %s"
                    " AND (expires_at <= now() OR state = 'left') ORDER BY id FOR UPDATE",
                    (node,),
                )
            ]
            taken = {
                int(r[0]): int(r[1])
                for r in conn.execute(
                    "UPDATE cluster_slots SET owner = %s, epoch = epoch + 1, taken_at = now()"
                    " WHERE slot = ANY(%s) AND (owner IS NULL OR owner = ANY(%s))"
                    " RETURNING slot, epoch",
                    (node, slots, dead),
                )
            }
            if taken:
                conn.execute("UPDATE cluster_version SET version = version + 1")
        return taken

    def release(self, node: str, incarnation: int, slots: list[int]) -> None:
        """Give ``slots`` up (the node stopped serving them first). Nothing changes if
        ``incarnation`` is no longer the node's (a later process joined under its id)."""
        self._call("release", self._release, node, incarnation, slots)

    @staticmethod
    def _release(
        conn: psycopg.Connection[Any], node: str, incarnation: int, slots: list[int] | None
    ) -> bool:
        """``slots`` None: all of them. Whether the incarnation was still the node's."""
        with conn.transaction():
            if (
                conn.execute(
                    "SELECT 1 FROM cluster_nodes WHERE id = %s AND incarnation = %s FOR UPDATE",
                    (node, incarnation),
                ).fetchone()
                is None
            ):
                return False
            if slots is None:
                conn.execute("UPDATE cluster_slots SET owner = NULL WHERE owner = %s", (node,))
            else:
                conn.execute(
                    "UPDATE cluster_slots SET owner = NULL WHERE owner = %s AND slot = ANY(%s)",
                    (node, slots),
                )
            conn.execute("UPDATE cluster_version SET version = version + 1")
            return True

    def set_state(self, node: str, incarnation: int, state: str) -> None:
        """``draining`` (it gives its slots up and takes none) or ``live``."""
        self._call("set_state", self._set_state, node, incarnation, state)

    @staticmethod
    def _set_state(conn: psycopg.Connection[Any], node: str, incarnation: int, state: str) -> None:
        with conn.transaction():
            conn.execute(
                "UPDATE cluster_nodes SET state = %s WHERE id = %s AND incarnation = %s",
                (state, node, incarnation),
            )
            conn.execute("UPDATE cluster_version SET version = version + 1")

    def leave(self, node: str, incarnation: int) -> None:
        """Leave the cluster (every slot released first, by the caller's rule)."""
        self._call("leave", self._leave, node, incarnation)

    @staticmethod
    def _leave(conn: psycopg.Connection[Any], node: str, incarnation: int) -> None:
        with conn.transaction():
            if Directory._release(conn, node, incarnation, None):
                conn.execute(
                    "UPDATE cluster_nodes SET state = 'left', expires_at = now()"
                    " WHERE id = %s AND incarnation = %s",
                    (node, incarnation),
                )
