"""``connect(url)``: a ``Client`` to a ``tokenpool serve``, and its ``RemotePool``s.

A ``RemotePool`` has the library ``Pool``'s methods, arguments and return values
(``Lease``, ``Usage``, ``TokenStatus``, ``Page``, ``Stats``, ``Event``) and raises the
same errors by their codes; every command it sends is a ``TP.`` command naming its pool,
so it means the same on any connection and a retry cannot land in another pool. Runs
on anyio: the same code serves trio and asyncio applications.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import anyio
import attrs

from .._errors import (
    InvalidArgumentError,
    NotKeptError,
    TokenPoolError,
    UnreachableError,
    lone_error,
)
from .._model import Lease, Page, Reason, Stats, TokenStatus, Usage
from .._ops import (
    Activate,
    Clear,
    GetLease,
    GetStats,
    GetToken,
    GetTokens,
    Op,
    Release,
    Renew,
    Validate,
)
from .._settings import MAX_SECONDS, PoolSettings, check_name, check_seconds
from . import replies
from .address import Address
from .connections import Connections
from .hold import Hold, hold
from .watch import EventStream, open_event_stream

_POOL_OPTIONS = {
    "size": "SIZE",
    "ttl": "TTL",
    "when_full": "WHEN-FULL",
    "min_hold": "MIN-HOLD",
    "max_lifetime": "MAX-LIFETIME",
}


def seconds_arg(value: float) -> str:
    """Seconds as a RESP argument (exact: the float's repr)."""
    return repr(float(value))


def pool_options(values: dict[str, object]) -> list[str]:
    """Pool settings (``PoolSettings.as_dict()`` or a part of it) as ``POOL CREATE`` /
    ``ALTER`` options; ``max_lifetime`` None is RESP's 0, "no cap"."""
    out: list[str] = []
    for key, value in values.items():
        if key == "max_lifetime" and value is None:
            value = 0
        if key == "size" or key == "when_full":
            out += [_POOL_OPTIONS[key], str(value)]
        else:
            out += [_POOL_OPTIONS[key], seconds_arg(float(value))]  # type: ignore[arg-type]
    return out


def _raise(reply: Any) -> Any:
    if isinstance(reply, TokenPoolError):
        raise reply
    return reply


@attrs.frozen
class ClientStatistics:
    """The client's connections now: ``open`` (of at most ``max_connections``), how many
    replies they await, how many were ever opened (a figure that grows only when
    connections break or the pool grows), and how many writes and requests they made
    (requests over writes: how much pipelining saved)."""

    max_connections: int
    open: int
    pending: int
    opened: int
    writes: int = 0
    requests: int = 0


class Client:
    """A connection to one server: its pools by name, and their management.

    Safe to share between any number of tasks. Made by ``tokenpool.connect``.
    """

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    @property
    def address(self) -> str:
        """The server's address (never the password)."""
        return str(self._connections.address)

    def pool(self, name: str = "default") -> RemotePool:
        """The pool ``name`` on the server (not checked until a call: the server may
        create it later). Raises ``InvalidArgumentError`` for a malformed name."""
        return RemotePool(self._connections, check_name(name))

    def statistics(self) -> ClientStatistics:
        c = self._connections
        live = [x for x in c._live if x.broken is None]
        return ClientStatistics(
            c.max_connections,
            len(live),
            sum(x.load for x in live),
            c.opened,
            c.tally.writes,
            c.tally.requests,
        )

    async def ping(self) -> None:
        """One round trip. Raises ``UnreachableError``."""
        (reply,) = await self._connections.call([("PING",)], safe=True)
        _raise(reply)

    async def names(self) -> list[str]:
        """The names of the pools the server serves."""
        (reply,) = await self._connections.call([("POOL", "LIST")], safe=True)
        return list(_raise(reply))

    async def settings(self, name: str) -> PoolSettings:
        """A pool's settings. Raises ``UnknownPoolError``."""
        (reply,) = await self._connections.call([("POOL", "INFO", check_name(name))], safe=True)
        f = replies.fields(_raise(reply))
        return PoolSettings.make(
            size=int(f["size"]),
            ttl=float(f["ttl"]),
            when_full=f["when_full"],
            min_hold=float(f["min_hold"]),
            max_lifetime=float(f["max_lifetime"]) if f["max_lifetime"] != "" else None,
        )

    async def create(
        self, name: str, settings: PoolSettings, *, exists_ok: bool = False
    ) -> RemotePool:
        """Create a pool (``POOL CREATE``). Raises ``ExistsError`` unless ``exists_ok``,
        ``NoPermError`` without the admin user."""
        args = ["POOL", "CREATE", check_name(name), *pool_options(settings.as_dict())]
        (reply,) = await self._connections.call([args], safe=False)
        if isinstance(reply, TokenPoolError) and not (exists_ok and reply.code == "EXISTS"):
            raise reply
        return self.pool(name)

    async def alter(self, name: str, **changes: object) -> PoolSettings:
        """Change a pool's settings (``size``, ``ttl``, ``when_full``, ``min_hold``,
        ``max_lifetime``); returns the settings now. Raises ``UnknownPoolError``."""
        unknown = set(changes) - set(_POOL_OPTIONS)
        if unknown:
            raise InvalidArgumentError(f"unknown pool setting(s): {', '.join(sorted(unknown))}")
        args = ["POOL", "ALTER", check_name(name), *pool_options(changes)]
        (reply,) = await self._connections.call([args], safe=False)
        _raise(reply)
        return await self.settings(name)

    async def drop(self, name: str) -> None:
        """Stop serving a pool (its leases end ``cleared``; the store keeps its history)."""
        (reply,) = await self._connections.call([("POOL", "DROP", check_name(name))], safe=False)
        _raise(reply)


class RemotePool:
    """A pool served by a server: the library ``Pool``'s API over RESP.

    Each method raises what ``Pool``'s does (by the server's error code), plus
    ``UnreachableError`` when the server cannot be reached or does not answer within
    the client's ``timeout``; ``UnknownPoolError`` if the server serves no such pool.
    """

    def __init__(self, connections: Connections, name: str) -> None:
        self._connections = connections
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def _one(
        self, command: str, *args: str, safe: bool = True, blocks: float | None = None
    ) -> Any:
        (reply,) = await self._connections.call(
            [(command, self._name, *args)], safe=safe, blocks=blocks
        )
        return _raise(reply)

    async def activate(self, user_id: str, wait: float | None = None) -> Lease:
        """Lease a token to ``user_id`` (or return the lease it holds); ``wait`` as
        ``Pool.activate``. Retried once on a broken connection: an activation sent again
        returns the same lease."""
        if wait is None:
            return replies.lease(await self._one("TP.ACTIVATE", user_id))
        reply = await self._one("TP.ACTIVATE", user_id, "WAIT", seconds_arg(wait), blocks=wait)
        return replies.lease(reply)

    async def release(self, token_id: str, user_id: str | None = None) -> Usage:
        """End the token's lease (``released``) and return its ``Usage``. Never retried:
        after a broken connection ``UnreachableError`` means it may or may not have run.
        ``UnreachableError`` too when the server answered but the pool changed owner
        before an ``async`` store kept the release (the new owner's history lacks it):
        the release may be lost, within the store's documented loss window."""
        args = (token_id,) if user_id is None else (token_id, user_id)
        revision = int(await self._one("TP.RELEASE", *args, safe=False))
        return await self._usage_at(token_id, revision)

    async def _usage_at(self, token_id: str, revision: int) -> Usage:
        # RELEASE answers the pool's revision after it: the end's own, or the grant's
        # that followed it in the same step (a wait pool hands the token on). Either
        # way the newest entry of the token's history up to it is the lease it ended,
        # and it ended at that revision or the one before. An older entry means the
        # history lacks the release: the pool changed owner (a failover, a restart)
        # before an async store kept it, and the owner now serving the pool never
        # saw it. Returning the older entry would report another lease's end.
        page = await self.history(token_id, limit=1, before=revision + 1)
        if not page or page[0].revision < revision - 1 or page[0].reason != Reason.RELEASED:
            if (await self.stats()).store == "memory":
                # No store, so no owner change could lose it: the release ran, and the
                # pool's bounded history in memory (history_memory) has let it go.
                raise NotKeptError(
                    f"the release of token {token_id} ran (revision {revision}) but this"
                    " memory-only pool's history no longer holds it: it keeps the newest"
                    " history_memory ended leases"
                )
            raise UnreachableError(
                f"the release of token {token_id} was answered (revision {revision}) but"
                " the pool's history lacks it: the pool changed owner before its store"
                " kept the release, which may be lost; check the token's lease"
            )
        return page[0]

    async def renew(self, token_id: str, lease_id: str) -> Lease:
        """Push the lease's ``expires_at`` to now + ttl. Raises ``NotHolderError``."""
        return replies.lease(await self._one("TP.RENEW", token_id, lease_id))

    async def validate(self, token_id: str, lease_id: str) -> bool:
        """Whether ``lease_id`` is the token's current lease."""
        return bool(await self._one("TP.VALIDATE", token_id, lease_id))

    async def clear(self) -> int:
        """End every lease (``cleared``); how many ended. Never retried."""
        return int(replies.fields(await self._one("TP.CLEAR", safe=False))["cleared"])

    async def tokens(self) -> list[TokenStatus]:
        """Every token's status (pools up to 10,000 tokens; else page with ``tokens_page``)."""
        return [replies.token(t) for t in await self._one("TP.TOKENS")]

    async def tokens_page(
        self, cursor: int = 0, count: int = 1000
    ) -> tuple[int, list[TokenStatus]]:
        """Up to ``count`` tokens from ``cursor`` on, and the next cursor (0 after the last)."""
        reply = await self._one("TP.TOKENS", "CURSOR", str(cursor), "COUNT", str(count))
        return replies.tokens_page(reply)

    async def token(self, token_id: str) -> TokenStatus:
        """One token's status. Raises ``UnknownTokenError``."""
        return replies.token(await self._one("TP.TOKEN", token_id))

    async def lease_of(self, user_id: str) -> Lease | None:
        """The user's lease, or ``None``."""
        reply = await self._one("TP.LEASE", user_id)
        return None if reply is None else replies.lease(reply)

    async def history(self, token_id: str, limit: int = 100, before: int | None = None) -> Page:
        """The token's ended leases, newest first; ``page.next_before`` pages on."""
        args = [token_id, "LIMIT", str(limit)]
        if before is not None:
            args += ["BEFORE", str(before)]
        return replies.page(await self._one("TP.HISTORY", *args))

    async def user_history(self, user_id: str, limit: int = 100, before: int | None = None) -> Page:
        """The leases ``user_id`` held in this pool, ended, newest first."""
        args = [user_id, "LIMIT", str(limit)]
        if before is not None:
            args += ["BEFORE", str(before)]
        return replies.page(await self._one("TP.USERHISTORY", *args))

    async def stats(self) -> Stats:
        """The pool's size, counters and revision, and its store's state."""
        return replies.stats(await self._one("TP.STATS"))

    async def batch(self, ops: Sequence[Op]) -> list[object]:
        """Many operations in one write (one pipeline), in order: one entry per op, its
        result or the ``TokenPoolError`` it raised (as ``Pool.batch``). Not a
        transaction: other clients' commands may run between them. Supports
        ``Activate`` (without ``wait``), ``Release``, ``Renew``, ``Validate``,
        ``Clear``, ``GetLease``, ``GetToken``, ``GetTokens`` and ``GetStats``.
        Not retried when it holds a ``Release`` or ``Clear``."""
        if not ops:
            return []
        commands = [self._command(op) for op in ops]
        safe = not any(isinstance(op, Release | Clear) for op in ops)
        results = await self._connections.call(commands, safe=safe)
        out: list[object] = []
        for op, reply in zip(ops, results, strict=True):
            if isinstance(reply, TokenPoolError):
                out.append(reply)
            elif isinstance(op, Release):
                try:
                    out.append(await self._usage_at(op.token_id, int(reply)))
                except TokenPoolError as error:
                    out.append(error)
            else:
                out.append(self._value(op, reply))
        return out

    def _command(self, op: Op) -> tuple[str, ...]:
        pool = self._name
        if isinstance(op, Activate):
            if op.wait is not None:
                raise InvalidArgumentError("batch() takes no Activate with wait: call activate()")
            return ("TP.ACTIVATE", pool, op.user_id)
        if isinstance(op, Release):
            user = () if op.user_id is None else (op.user_id,)
            return ("TP.RELEASE", pool, op.token_id, *user)
        if isinstance(op, Renew):
            return ("TP.RENEW", pool, op.token_id, op.lease_id)
        if isinstance(op, Validate):
            return ("TP.VALIDATE", pool, op.token_id, op.lease_id)
        if isinstance(op, Clear):
            return ("TP.CLEAR", pool)
        if isinstance(op, GetLease):
            return ("TP.LEASE", pool, op.user_id)
        if isinstance(op, GetToken):
            return ("TP.TOKEN", pool, op.token_id)
        if isinstance(op, GetTokens):
            return ("TP.TOKENS", pool, "CURSOR", str(op.cursor), "COUNT", str(op.count))
        if isinstance(op, GetStats):
            return ("TP.STATS", pool)
        raise InvalidArgumentError(f"batch() cannot send {type(op).__name__} to a server")

    @staticmethod
    def _value(op: Op, reply: Any) -> object:
        if isinstance(op, Activate | Renew):
            return replies.lease(reply)
        if isinstance(op, Validate):
            return bool(reply)
        if isinstance(op, Clear):
            return int(replies.fields(reply)["cleared"])
        if isinstance(op, GetLease):
            return None if reply is None else replies.lease(reply)
        if isinstance(op, GetToken):
            return replies.token(reply)
        if isinstance(op, GetTokens):
            return replies.tokens_page(reply)
        return replies.stats(reply)

    async def activate_many(self, user_ids: Sequence[str]) -> list[Lease | TokenPoolError]:
        """``activate`` for each user in one write: a ``Lease`` or its error per user."""
        return await self.batch([Activate(u) for u in user_ids])  # type: ignore[return-value]

    def watch(self, since: int | None = None) -> AbstractAsyncContextManager[EventStream]:
        """Follow the pool's changes: ``async with pool.watch() as events: async for ...``.

        Over a connection of its own (not one of the pool's ``max_connections``). When
        it breaks, the stream reconnects and resumes after the last revision it
        delivered, without a gap or a repeat; it raises ``UnreachableError`` once the
        server stays unreachable for ``timeout``, ``CompactedError`` (with ``oldest``)
        when the events to resume from are no longer held.
        """
        return open_event_stream(self._connections, self, since)

    def hold(
        self,
        user_id: str,
        *,
        wait: float | None = None,
        renew_every: float | None = None,
        on_lost: Literal["cancel", "notify"] = "cancel",
    ) -> AbstractAsyncContextManager[Hold]:
        """Hold a lease for the length of a block, renewed in the background.

        ``async with pool.hold("alice") as held:`` activates (waiting up to ``wait``
        seconds on a ``wait`` pool), then renews the lease every third of the time it
        has left (or every ``renew_every`` seconds). The lease is **lost** when a
        renewal is refused (``NotHolderError``: evicted, released elsewhere, cleared;
        ``UnavailableError``: the server will not renew) or when its ``expires_at``
        passes without a renewal (the server unreachable). Then, with
        ``on_lost="cancel"``, the block is cancelled and ``LeaseLostError`` raised
        from the ``async with``; with ``"notify"``, ``held.lost`` is set (and
        ``held.wait_lost()`` returns) and the block runs on. On exit a lease not lost
        is released (``release(token_id, user_id)``: never someone else's).
        ``held.fence`` proves the hold to a guarded resource.
        """
        if on_lost not in ("cancel", "notify"):
            raise InvalidArgumentError(f"on_lost is 'cancel' or 'notify', not {on_lost!r}")
        if renew_every is not None:  # (a number of seconds: not a string, not inf)
            renew_every = check_seconds(renew_every, "renew_every", 0.001, MAX_SECONDS)
        return hold(self, user_id, wait, renew_every, on_lost, self._connections.timeout)


@asynccontextmanager
async def connect(
    url: str = "tokenpool://127.0.0.1:7379",
    *,
    max_connections: int = 10,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Client]:
    """A client of the server at ``url``: ``async with tokenpool.connect(url) as client``.

    ``tokenpool://[[user]:password@]host[:port]`` (or ``redis://``; ``tokenpools://``
    or ``rediss://`` for TLS, with ``ssl_context`` or the system's defaults). At most
    ``max_connections`` connections (opened on demand, shared by pipelining); a call
    waits at most ``timeout`` seconds for a connection and as long for its reply.
    Nothing is connected until the first call. Works under trio and asyncio (anyio).
    Raises ``InvalidArgumentError`` for a bad URL or bound.
    """
    address = Address.parse(url)
    if not isinstance(max_connections, int) or not 1 <= max_connections <= 10_000:
        raise InvalidArgumentError(f"max_connections must be 1 to 10,000, not {max_connections!r}")
    timeout = check_seconds(timeout, "timeout", 0.001, 3600)  # (a number: not a string)
    try:
        async with anyio.create_task_group() as tg:
            connections = Connections(
                address,
                tg,
                max_connections=max_connections,
                timeout=timeout,
                ssl_context=ssl_context,
            )
            try:
                yield Client(connections)
            finally:
                await connections.aclose()
    except BaseExceptionGroup as group:
        raise lone_error(group) from None
