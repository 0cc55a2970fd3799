"""``RemoteBackend``: an HTTP worker's way to the pools, the client library over the
server's private Unix socket (``_server/workers.py``).

Each request is sent as ``VIA <peer> <bearer> <TP. command...>``: the RESP form of
the typed request, run by the server for the HTTP client at ``peer`` (its rate
limits and password budget, under the HTTP transport), answered with the command
layer's neutral result, so the routes encode the same values whichever backend ran
them. Connections are the client library's: pooled, pipelined, bounded, replaced
when broken; an unreachable server is 503 ``UNAVAILABLE``.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from .._client.address import Address
from .._client.connections import Connections
from .._client.remote import RemotePool, pool_options, seconds_arg
from .._commands import (
    Activate,
    AlterPool,
    Clear,
    CreatePool,
    DropPool,
    GetPool,
    GetStats,
    History,
    LeaseOf,
    ListPools,
    Release,
    Renew,
    Token,
    Tokens,
    UserHistory,
    Validate,
)
from .._commands import Request as Command
from .._commands.analytics import Report, Series
from .._errors import InvalidArgumentError, TokenPoolError, UnavailableError, UnreachableError
from .backend import Events


def argv_of(command: Command) -> tuple[list[str], bool]:
    """A typed request as the RESP command that builds it again, and whether sending it
    twice means the same as once (the client library retries only those)."""
    kind = type(command)
    if kind is Activate:
        c: Any = command
        wait = [] if c.wait is None else ["WAIT", seconds_arg(c.wait)]
        return ["TP.ACTIVATE", c.pool, c.user_id, *wait], True
    c = command
    if kind is Renew:
        return ["TP.RENEW", c.pool, c.token_id, c.lease_id], True
    if kind is Release:
        user = [] if c.user_id is None else [c.user_id]
        return ["TP.RELEASE", c.pool, c.token_id, *user], False
    if kind is Validate:
        return ["TP.VALIDATE", c.pool, c.token_id, c.lease_id], True
    if kind is LeaseOf:
        return ["TP.LEASE", c.pool, c.user_id], True
    if kind is Clear:
        return ["TP.CLEAR", c.pool], False
    if kind is Token:
        return ["TP.TOKEN", c.pool, c.token_id], True
    if kind is Tokens:
        if c.cursor is None:
            return ["TP.TOKENS", c.pool], True
        return ["TP.TOKENS", c.pool, "CURSOR", str(c.cursor), "COUNT", str(c.count)], True
    if kind is History or kind is UserHistory:
        name = "TP.HISTORY" if kind is History else "TP.USERHISTORY"
        subject = c.token_id if kind is History else c.user_id
        before = [] if c.before is None else ["BEFORE", str(c.before)]
        return [name, c.pool, subject, "LIMIT", str(c.limit), *before], True
    if kind is GetStats:
        return ["TP.STATS", c.pool], True
    if kind is GetPool:
        return ["POOL", "INFO", c.pool], True
    if kind is ListPools:
        return ["POOL", "LIST"], True
    if kind is CreatePool:
        return ["POOL", "CREATE", c.pool, *pool_options(c.settings.as_dict())], False
    if kind is AlterPool:
        return ["POOL", "ALTER", c.pool, *pool_options(c.changes)], False
    if kind is DropPool:
        return ["POOL", "DROP", c.pool], False
    if kind is Series:
        return ["TP.SERIES", c.pool, c.window], True
    if kind is Report:
        sort = [] if c.sort is None else ["SORT", c.sort]
        return [
            "TP.REPORT",
            c.pool,
            c.kind,
            "SINCE",
            f"{c.since / 1_000_000:.6f}",
            "UNTIL",
            f"{c.until / 1_000_000:.6f}",
            "LIMIT",
            str(c.limit),
            "CURSOR",
            str(c.cursor),
            *sort,
        ], True
    raise InvalidArgumentError(f"{kind.__name__} is not sent to the server by HTTP workers")


class _Caller:
    __slots__ = ("bearer", "peer")

    def __init__(self, peer: str, bearer: str) -> None:
        self.peer = peer
        self.bearer = bearer


class _RemoteSource:
    __slots__ = ("connections", "name", "revision")

    def __init__(self, connections: Connections, name: str, revision: int) -> None:
        self.connections = connections
        self.name = name
        self.revision = revision

    @asynccontextmanager
    async def watch(self, since: int | None) -> AsyncIterator[Events]:
        pool = RemotePool(self.connections, self.name)
        async with pool.watch(self.revision if since is None else since) as events:
            yield events


class RemoteBackend:
    """The server's pools through its workers' socket (``unix://`` URL with the secret)."""

    def __init__(self, connections: Connections, default_pool: str, auth_delay: float) -> None:
        self._connections = connections
        self._default_pool = default_pool
        self._auth_delay = auth_delay
        # this worker's name and figures, sent with each scrape (set by the worker)
        self.worker = ""
        self.figures: Callable[[], dict[str, Any]] | None = None

    @property
    def default_pool(self) -> str:
        return self._default_pool

    @property
    def attached(self) -> bool:
        return True

    async def caller(self, peer: str, bearer: str | None) -> _Caller:
        return _Caller(peer, bearer or "")  # the server checks it with each request

    async def _call(self, argv: Sequence[str], *, safe: bool, blocks: float | None = None) -> Any:
        try:
            (reply,) = await self._connections.call([argv], safe=safe, blocks=blocks)
        except UnreachableError as error:
            raise UnavailableError(f"the server is not reachable now ({error})") from None
        if isinstance(reply, TokenPoolError):
            if reply.code == "WRONGPASS":
                await anyio.sleep(self._auth_delay)  # the server answered at once
            raise reply
        return reply

    async def execute(self, command: Command, caller: _Caller) -> Any:
        argv, safe = argv_of(command)
        wait = getattr(command, "wait", None)
        reply = await self._call(["VIA", caller.peer, caller.bearer, *argv], safe=safe, blocks=wait)
        return pickle.loads(base64.b64decode(reply))

    async def pool_names(self, caller: _Caller) -> list[str]:
        names: list[str] = await self.execute(ListPools(), caller)
        return names

    async def events(self, pool: str, caller: _Caller) -> _RemoteSource:
        stats = await self.execute(GetStats(pool), caller)  # the pool exists; a request spent
        return _RemoteSource(self._connections, pool, stats.revision)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        try:
            reply = await self._call(["WORKER", "READY"], safe=True)
        except TokenPoolError as error:
            return False, {"server": str(error)}
        answer = json.loads(reply)
        return bool(answer["ready"]), dict(answer["reasons"])

    async def metrics(self) -> bytes:
        mine = [] if self.figures is None else [self.worker, json.dumps(self.figures())]
        reply = await self._call(["WORKER", "METRICS", *mine], safe=True)
        return str(reply).encode()

    async def report(self, worker: str, figures: dict[str, Any]) -> None:
        await self._call(["WORKER", "REPORT", worker, json.dumps(figures)], safe=True)


@asynccontextmanager
async def open_remote_backend(
    url: str,
    default_pool: str,
    *,
    auth_delay: float = 0.1,
    max_connections: int = 8,
    timeout: float = 10.0,
) -> AsyncIterator[RemoteBackend]:
    """A backend over the client library's connections to ``url``."""
    address = Address.parse(url)
    async with anyio.create_task_group() as tg:
        connections = Connections(
            address, tg, max_connections=max_connections, timeout=timeout, ssl_context=None
        )
        try:
            yield RemoteBackend(connections, default_pool, auth_delay)
        finally:
            await connections.aclose()
            tg.cancel_scope.cancel()
