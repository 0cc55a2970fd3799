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

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.abc

from .._client.address import Address
from .._client.connections import Connections
from .._client.via import argv_of, result_of
from .._cluster.peers import Followed, RemoteSource
from .._commands import GetStats, ListPools
from .._commands import Request as Command
from .._commands.analytics import Report
from .._errors import TokenPoolError, UnavailableError, UnreachableError
from .._pool import REPORT_WAIT, report_waited
from .._store.analytics import REPORT_TIMEOUT

REPORTS_AT_ONCE = 2
"""A worker's usage reports in flight at once. Each takes a link connection to itself
(the server answers a connection's requests in order: a report of seconds would hold
every request pipelined behind it, ``/healthz``'s ``PING`` included), so this bound
leaves the other link connections to everything else."""


class _Caller:
    __slots__ = ("bearer", "peer")

    def __init__(self, peer: str, bearer: str) -> None:
        self.peer = peer
        self.bearer = bearer


ALIVE_WAIT = 0.8
"""Seconds a worker's ``/healthz`` waits for its server's ``PING`` (under the 1 s a
Kubernetes probe waits by default): past it, 503, as a wedged server is not healthy."""


class RemoteBackend:
    """The server's pools through its workers' socket (``unix://`` URL with the secret)."""

    def __init__(
        self,
        connections: Connections,
        default_pool: str,
        auth_delay: float,
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        self._connections = connections
        self._tg = task_group
        self._owners: dict[str, Connections] = {}  # a cluster: pools' owners, for events
        self._follows = Followed()
        self._default_pool = default_pool
        self._auth_delay = auth_delay
        self._reports = anyio.Semaphore(REPORTS_AT_ONCE)
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
            # The reason without the link's address: a private socket's path is none of
            # an HTTP client's business (it showed in every 503 during a restart).
            reason = str(error).replace(str(self._connections.address), "the server")
            raise UnavailableError(
                f"the server is not reachable now (starting, restarting or stopping: {reason});"
                " retry shortly"
            ) from None
        if isinstance(reply, TokenPoolError):
            if reply.code == "WRONGPASS":
                await anyio.sleep(self._auth_delay)  # the server answered at once
            raise reply
        return reply

    async def execute(self, command: Command, caller: _Caller) -> Any:
        argv, safe = argv_of(command)
        via = ["VIA", caller.peer, caller.bearer, *argv]
        if isinstance(command, Report):  # slow: a connection to itself, in a bounded few
            async with self._report_slot():
                reply = await self._call(via, safe=safe, blocks=REPORT_WAIT + REPORT_TIMEOUT)
        else:
            reply = await self._call(via, safe=safe, blocks=getattr(command, "wait", None))
        return result_of(reply, own_server=True)

    @asynccontextmanager
    async def _report_slot(self) -> AsyncIterator[None]:
        """One of this worker's ``REPORTS_AT_ONCE`` report slots, waited for at most
        ``REPORT_WAIT`` (then the server's refusal of a report that waited too long)."""
        with anyio.move_on_after(REPORT_WAIT) as waiting:
            await self._reports.acquire()
        if waiting.cancelled_caught:
            raise report_waited()
        try:
            yield
        finally:
            self._reports.release()

    async def pool_names(self, caller: _Caller) -> list[str]:
        names: list[str] = await self.execute(ListPools(), caller)
        return names

    async def events(self, pool: str, caller: _Caller) -> RemoteSource:
        stats = await self.execute(GetStats(pool), caller)  # the pool exists; a request spent
        connections = await self._events_from(pool)
        if connections is self._connections:
            return RemoteSource(connections, pool, stats.revision)
        key = f"{connections.address.host}:{connections.address.port}"
        self._follows.check(key)  # another node: a connection to it per stream, bounded
        return RemoteSource(connections, pool, stats.revision, self._follows, key)

    async def aclose_owners(self) -> None:
        for owner in self._owners.values():
            await owner.aclose()
        self._owners.clear()

    async def _events_from(self, pool: str) -> Connections:
        """Where ``pool``'s events are: the server, or (a cluster) the pool's owner,
        reached as the server's node with the cluster's secret."""
        route = await self._call(["WORKER", "ROUTE", pool], safe=True)
        if not route or self._tg is None:
            return self._connections
        address, user, secret = (str(part) for part in route)
        found = self._owners.get(address)
        if found is None or found.address.password != secret:
            found = self._owners[address] = Connections(
                Address.of_node(address, user, secret),
                self._tg,
                max_connections=2,
                timeout=self._connections.timeout,
                ssl_context=None,
            )
        return found

    async def cluster(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(await self._call(["WORKER", "CLUSTER"], safe=True))
        return answer

    async def alive(self) -> str | None:
        """Wedged, not starting: a link not served yet (the pools still recovering) or
        no longer (stopping) is a live server's; one that takes the PING and does not
        answer it in time is not. A dead server ends its workers (their stdin closes)."""
        with anyio.move_on_after(ALIVE_WAIT):
            with suppress(UnavailableError):
                await self._call(["PING"], safe=True)
            return None
        return f"the server did not answer a PING within {ALIVE_WAIT:g} s"

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
        backend = RemoteBackend(connections, default_pool, auth_delay, tg)
        try:
            yield backend
        finally:
            await connections.aclose()
            await backend.aclose_owners()
            tg.cancel_scope.cancel()
