"""A node's way to the pools of the other nodes: ``VIA`` over the client library.

In a cluster a pool lives on the node that owns its slot, but an HTTP client reaches
whichever node (or HTTP worker) it connected to. A request for a pool this node does
not serve is sent to the pool's owner as ``VIA <peer> <bearer> <command...>``, the
same command the HTTP workers send their server, over the client library's
connections (bounded, pipelined, following ``MOVED``), authenticated as
``tokenpool-node`` with the cluster's secret. The owner runs it for the HTTP client at
``peer``: its password checked and its rate budget spent there, where the pool is, and
its neutral result comes back (decoded with the allow-list of ``_client/via.py``).

While the pool's slot has no live owner (a failover) or this node is recovering it,
a request waits, as the client library does, with a growing pause, at most
``timeout`` seconds, then is answered with the cluster's error (503). A request that
is not safe to repeat is never sent twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import trio

from .._client.address import Address
from .._client.connections import Connections
from .._client.remote import RemotePool
from .._client.via import argv_of, result_of
from .._commands import GetStats, ListPools
from .._commands import Request as Command
from .._errors import MovedError, TokenPoolError, UnavailableError, UnreachableError
from .._log import get_logger
from .._settings import NODE_USER

if TYPE_CHECKING:
    from .._commands import Client
    from .node import ClusterNode

log = get_logger("tokenpool.cluster")

WAIT_FOR_OWNER = 5.0
"""Seconds a request for a pool whose slot is being taken over waits for its owner
(a failover takes at most the lease's validity, one renewal and the recovery)."""

OWNER_CHECK = 0.25
"""Seconds between looks at whether a request's node still owns the pool's slot."""


class Peers:
    """The other nodes, as this node's HTTP tier reaches them. ``run`` in a nursery."""

    def __init__(
        self,
        node: ClusterNode,
        *,
        timeout: float = 10.0,
        max_connections: int = 8,
        max_waiting: int = 256,
    ) -> None:
        self.node = node
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_waiting = max_waiting
        self.forwarded = 0  # requests sent to another node (a figure for /api/cluster and tests)
        self.follows = Followed()  # event streams followed on each other node
        self._tg: anyio.abc.TaskGroup | None = None
        self._nodes: dict[str, Connections] = {}
        # Activations that may wait (ACTIVATE ... WAIT) hold a connection each until
        # answered: they get connections of their own, so waiters never starve the
        # other requests' few pipelined ones.
        self._waiting: dict[str, Connections] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connections' task group until cancelled, then close them."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._tg = None
                with trio.CancelScope(shield=True):
                    for connections in (*self._nodes.values(), *self._waiting.values()):
                        await connections.aclose()
                    self._nodes.clear()
                    self._waiting.clear()
                tg.cancel_scope.cancel()

    def connections(self, address: str, *, waits: bool = False) -> Connections:
        """The connections to the node at ``host:port`` (made on first use); ``waits``:
        those of requests that may wait."""
        table = self._waiting if waits else self._nodes
        found = table.get(address)
        if found is None:
            if self._tg is None:
                raise UnavailableError("this node is not serving (it is starting or stopping)")
            found = table[address] = Connections(
                Address.of_node(address, NODE_USER, self.node.secret),
                self._tg,
                max_connections=self.max_waiting if waits else self.max_connections,
                timeout=self.timeout,
                ssl_context=None,
            )
        return found

    async def owner(self, pool: str) -> str | None:
        """``None`` when this node serves ``pool``; else its owner's ``host:port``. While
        the slot has no live owner, waits for one (at most ``WAIT_FOR_OWNER`` seconds),
        then raises the cluster's error."""
        deadline = trio.current_time() + WAIT_FOR_OWNER
        pause = 0.05
        while True:
            route = self.node.route(pool)
            if route is None:
                return None
            if isinstance(route, MovedError):
                return route.address
            if trio.current_time() + pause > deadline:
                raise route
            await trio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def execute(
        self, command: Command, client: Client, here: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run ``command`` for ``client``: ``here()`` if this node serves its pool, else
        on the pool's owner. An owner that cannot be reached (it just died: its lease
        has not run out yet) is asked again after a pause, up to ``WAIT_FOR_OWNER``
        seconds, where the request is safe to repeat; the slot's next owner answers."""
        pool = getattr(command, "pool", None)
        if pool is None:
            return await here()
        argv, safe = argv_of(command)
        blocks = getattr(command, "wait", None)
        deadline = trio.current_time() + WAIT_FOR_OWNER
        pause = 0.05
        while True:
            address = await self.owner(pool)
            if address is None:
                return await here()
            try:
                return await self._ask(address, pool, argv, safe, blocks, client)
            except UnavailableError:
                if (
                    self._tg is None  # stopping: no other node is reached again
                    or not safe
                    or trio.current_time() + pause > deadline
                ):
                    raise
            await trio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _ask(
        self,
        address: str,
        pool: str,
        argv: list[str],
        safe: bool,
        blocks: float | None,
        client: Client,
    ) -> Any:
        """``_send``; for a request safe to repeat that does not wait, given up as soon as
        ``pool``'s slot no longer names that node: an owner paused past its lease answers
        nothing (its connections time out only after ``timeout``, twice), and the slot's
        next owner would answer now."""
        tg = self._tg
        if tg is None or not safe or blocks is not None:
            return await self._send(address, argv, safe, blocks, client)
        done = trio.Event()
        with trio.CancelScope() as attempt:
            tg.start_soon(self._watch_owner, pool, address, attempt, done)
            try:
                return await self._send(address, argv, safe, blocks, client)
            finally:
                done.set()
        raise UnavailableError(f"the pool's node at {address} stopped serving it while asked")

    async def _watch_owner(
        self, pool: str, address: str, attempt: trio.CancelScope, done: trio.Event
    ) -> None:
        while not done.is_set():
            with trio.move_on_after(OWNER_CHECK):
                await done.wait()
            if done.is_set():
                return
            route = self.node.route(pool)
            if not isinstance(route, MovedError) or route.address != address:
                attempt.cancel()
                return

    async def send(self, address: str, command: Command, client: Client) -> Any:
        """``command`` run by the node at ``address`` (following ``MOVED`` from there)."""
        argv, safe = argv_of(command)
        return await self._send(address, argv, safe, getattr(command, "wait", None), client)

    async def _send(
        self, address: str, argv: list[str], safe: bool, blocks: float | None, client: Client
    ) -> Any:
        via = ["VIA", client.peer, client.bearer or "", *argv]
        self.forwarded += 1
        try:
            (reply,) = await self.connections(address, waits=blocks is not None).call(
                [via], safe=safe, blocks=blocks
            )
        except UnreachableError as error:
            raise UnavailableError(f"the pool's node is not reachable now ({error})") from None
        if isinstance(reply, TokenPoolError):
            raise reply
        return result_of(reply, remote=True)

    async def pool_names(self, client: Client, mine: list[str]) -> list[str]:
        """Every live node's pools, this node's (``mine``) with them, each once. A node
        that does not answer is left out (its pools come back once they are served)."""
        names = set(mine)
        me = self.node.id
        refused: list[TokenPoolError] = []  # raised here, not as a group out of the nursery

        async def ask(address: str) -> None:
            try:
                with trio.move_on_after(WAIT_FOR_OWNER):  # a paused node answers nothing
                    names.update(await self.send(address, ListPools(), client))
                    return
                reason = f"no answer within {WAIT_FOR_OWNER:g} s"
            except TokenPoolError as error:
                if error.code in ("NOAUTH", "WRONGPASS", "NOPERM", "BUSY"):
                    refused.append(error)
                    return
                reason = str(error)[:200]
            log.info("cluster_list_skipped", node=address, reason=reason)

        async with trio.open_nursery() as nursery:
            for member in list(self.node.members.values()):
                if member.id != me and member.live and member.address:
                    nursery.start_soon(ask, member.address)
        if refused:
            raise refused[0]
        return sorted(names)

    async def events(self, pool: str, address: str, client: Client) -> RemoteSource:
        """The events of ``pool`` from its owner at ``address`` (a request spent there)."""
        self.follows.check(address)
        stats = await self.send(address, GetStats(pool), client)
        return RemoteSource(self.connections(address), pool, stats.revision, self.follows, address)


MAX_FOLLOWED = 256
"""Event streams one process follows on one other server at most: each is a connection
to it, and that server's connections are its clients' too (``--max-clients``)."""


class Followed:
    """The event streams a process follows on other servers, counted per server."""

    def __init__(self, limit: int = MAX_FOLLOWED) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def check(self, address: str) -> None:
        """Raises ``UnavailableError`` (503) when ``address`` has ``limit`` streams."""
        count = self.open.get(address, 0)
        if count >= self.limit:
            raise UnavailableError(
                f"{count} event streams are followed on another node already (the most"
                " one process follows on one node): try again later"
            )

    @contextmanager
    def held(self, address: str) -> Iterator[None]:
        self.open[address] = self.open.get(address, 0) + 1
        try:
            yield
        finally:
            left = self.open[address] - 1
            if left:
                self.open[address] = left
            else:
                del self.open[address]


class RemoteSource:
    """A pool's events followed on another server, through the client library's
    ``watch`` (an HTTP worker's server, or the pool's owner in a cluster); counted in
    ``followed`` under ``key`` (that server) while it runs."""

    __slots__ = ("connections", "followed", "key", "name", "revision")

    def __init__(
        self,
        connections: Connections,
        name: str,
        revision: int,
        followed: Followed | None = None,
        key: str = "",
    ) -> None:
        self.connections = connections
        self.name = name
        self.revision = revision
        self.followed = followed
        self.key = key

    @asynccontextmanager
    async def watch(self, since: int | None) -> AsyncIterator[Any]:
        pool = RemotePool(self.connections, self.name)
        counted = nullcontext() if self.followed is None else self.followed.held(self.key)
        with counted:
            async with pool.watch(self.revision if since is None else since) as events:
                yield events
