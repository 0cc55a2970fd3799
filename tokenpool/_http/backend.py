"""Where the HTTP app's requests go: a ``Backend``.

The routes build typed requests of the command layer and encode neutral results;
between the two, a backend runs them. Two exist:

- ``LocalBackend``: the pools of this process (``tokenpool serve`` with
  ``--http-workers 0``: hypercorn in the server's own trio run), through the same
  ``Commands.execute`` as the RESP server;
- ``RemoteBackend`` (``remote.py``): a server over a private RESP connection (an HTTP
  worker process, ``--http-workers N``), through the client library.

Either way the same rules hold: a request is admitted and rate-limited for the HTTP
client's own address (not the worker's), a failed password is counted once under
the HTTP transport, and results are the command layer's neutral values.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

from .._commands import Client, Commands
from .._commands import Request as Command
from .._errors import TokenPoolError
from .._settings import check_name
from .._store import LinkState

if TYPE_CHECKING:
    from .._model import Event

AUTH_REQUIRED = "authentication required: send Authorization: Bearer <password>"


class Events(Protocol):
    """A pool's events being followed: ``async for``, the next one's revision if it is
    already here (an eviction's two events share one), and ``close()`` to stop."""

    def __aiter__(self) -> Events: ...

    async def __anext__(self) -> Event: ...

    def next_revision(self) -> int | None: ...

    def close(self) -> None: ...


class EventSource(Protocol):
    """One pool's events for one client: the pool's revision when asked, and ``watch``."""

    name: str
    revision: int

    def watch(self, since: int | None) -> AbstractAsyncContextManager[Events]: ...


class Backend(Protocol):
    """What the HTTP app needs of the pools. Each call raises ``TokenPoolError`` (with
    its code) for a refusal; ``UnavailableError`` while the pools are not served yet."""

    @property
    def default_pool(self) -> str: ...

    @property
    def attached(self) -> bool:
        """Whether requests can be run now (the pools are recovered, or reachable)."""
        ...

    async def caller(self, peer: str, bearer: str | None) -> Any:
        """Who is asking: ``peer`` (the HTTP client's address) with ``bearer`` (its
        password, or None). Raises ``NoAuthError``/``WrongPassError`` when the
        backend can tell at once (a remote one tells at the first request)."""
        ...

    async def execute(self, command: Command, caller: Any) -> Any:
        """Run one request for ``caller``: its neutral result."""
        ...

    async def pool_names(self, caller: Any) -> list[str]: ...

    async def events(self, pool: str, caller: Any) -> EventSource:
        """The events of ``pool`` (raises ``UnknownPoolError``); spends one request of
        the caller's rate budget (a stream is a request too)."""
        ...

    async def readiness(self) -> tuple[bool, dict[str, str]]: ...

    async def alive(self) -> str | None:
        """None while the server's event loop answers, else why not."""
        ...

    async def cluster(self) -> dict[str, Any]:
        """The cluster's members and this node's place (``{"enabled": false}`` alone)."""
        ...

    async def metrics(self) -> bytes | None:
        """The server's Prometheus text, or None: render the app's own registry."""
        ...


class _LocalSource:
    __slots__ = ("name", "pool", "revision")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.name: str = pool.name
        self.revision: int = pool.statistics().stats.revision

    @asynccontextmanager
    async def watch(self, since: int | None) -> AsyncIterator[Events]:
        async with self.pool.watch(since) as events:
            yield events


class LocalBackend:
    """The pools of this process, through its ``Commands`` (the RESP server's own); in
    a cluster, every node's pools: a pool another node serves is reached through
    ``peers`` (``_cluster/peers.py``)."""

    def __init__(self, commands: Commands, peers: Any = None) -> None:
        self.commands = commands
        self.peers = peers  # a cluster's other nodes (a Peers), or None

    @property
    def default_pool(self) -> str:
        return self.commands.settings.default_pool

    @property
    def attached(self) -> bool:
        return True

    async def caller(self, peer: str, bearer: str | None) -> Client:
        client = self.commands.client(peer, "http")
        if bearer is None:
            if not client.authed:
                from .._commands import NoAuthError

                raise NoAuthError(AUTH_REQUIRED)
            return client  # no password is needed to lease (at most an admin one is set)
        await self.commands.gate.authenticate(client, None, bearer)
        client.bearer = bearer  # sent on with a request for another node's pool
        return client

    async def execute(self, command: Command, caller: Client) -> Any:
        peers = self.peers
        if peers is None:
            return await self.commands.execute(command, caller)

        async def here() -> Any:
            return await self.commands.execute(command, caller)

        return await peers.execute(command, caller, here)

    async def pool_names(self, caller: Client) -> list[str]:
        mine = self.commands.pools.names()
        if self.peers is None:
            return mine
        return list(await self.peers.pool_names(caller, mine))

    async def events(self, pool: str, caller: Client) -> EventSource:
        name = check_name(pool)
        if self.peers is not None:
            owner = await self.peers.owner(name)
            if owner is not None:
                source: EventSource = await self.peers.events(name, owner, caller)
                return source
        target = self.commands.pools.get(name)
        self.commands.gate.spend(caller, None)
        return _LocalSource(target)

    async def cluster(self) -> dict[str, Any]:
        from .._server.cluster import cluster_json

        return cluster_json(self.peers)

    async def alive(self) -> str | None:
        return None  # the server's own loop is answering this request

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        reasons: dict[str, str] = {}
        pools = self.commands.pools
        for name in pools.names():
            try:
                figures = pools.get(name).statistics()
                ok, why = pools.get(name).ready
            except TokenPoolError:
                continue
            writer = figures.writer
            if not ok:
                reasons[name] = why
            elif writer is not None and writer.link != LinkState.UP:
                reasons[name] = f"the store link is {writer.link}"
        return not reasons, reasons

    async def metrics(self) -> bytes | None:
        return None
