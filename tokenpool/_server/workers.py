"""The server's side of its HTTP workers: a private RESP listener on a Unix socket.

HTTP worker processes (``tokenpool serve --http-workers N``) reach the pools through
the client library over this socket, with three commands only they may send:

- ``AUTH tokenpool-worker <secret>``: the per-run secret the parent handed its workers
  (on this socket ``AUTH`` takes nothing else; a connection starts unauthenticated
  whatever ``--requirepass`` says);
- ``VIA <peer> <bearer> <command...>``: run a pool command for an HTTP client at
  ``peer`` with the password ``bearer`` (``""``: none). It is admitted, rate-limited
  and counted for that address and under the HTTP transport, so a client's budgets
  are the same whichever worker serves it, and a failed password is counted once
  (answered at once: the worker makes the client wait the delay, not this
  connection, which other requests share). The reply is the command layer's
  neutral result, pickled (base64): the parent trusts its own results, never a
  worker's bytes, which arrive as RESP arguments parsed by the command table.
- ``WORKER READY``, ``WORKER METRICS [<id> <json>]``, ``WORKER REPORT <id> <json>``:
  the server's readiness (JSON) and Prometheus text (with the scraping worker's
  figures first), and a worker's own figures (every second).
"""

from __future__ import annotations

import hmac
import json
import pickle
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .._client.via import encode_result
from .._commands import Client, ListPools, TokenList
from .._commands.history import PageChunks
from .._commands.tokens import TokenChunks
from .._errors import MovedError, TokenPoolError
from .._model import Page
from .._resp import OK, Error
from .._settings import NODE_USER, WORKER_USER
from . import argv as table
from .cluster import cluster_json
from .replies import error_reply
from .session import CONNECTION, Action, Handler, Pending, Planner, Session, command

VIA = "VIA"


class WorkerLink:
    """What the worker listener needs of the parent: its secret, readiness, metrics, and
    where the workers' figures go."""

    def __init__(
        self,
        secret: str,
        readiness: Callable[[], Awaitable[tuple[bool, dict[str, str]]]],
        metrics: Callable[[bool], Awaitable[bytes]],
        report: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.secret = secret
        self.readiness = readiness
        self.metrics = metrics
        self.report = report


CHUNK = 1_000  # pairs of a token listing pickled per turn of the loop (about 1 ms)


async def _pickled(length: int, piece: Callable[[int, int], list[Any]]) -> list[bytes]:
    """``piece(start, stop)`` pickled ``CHUNK`` items at a time, one chunk per turn."""
    chunks = []
    for start in range(0, length, CHUNK):
        if start:
            await trio.lowlevel.checkpoint()
        chunks.append(pickle.dumps(piece(start, start + CHUNK), pickle.HIGHEST_PROTOCOL))
    return chunks


async def via_reply(result: Any) -> bytes:
    """A neutral result as ``VIA``'s reply: a token listing's pairs with their token ids
    (the pool's own lookup stays behind) and a long history page, pickled a chunk per
    turn of the loop."""
    if type(result) is TokenList:
        items, names = result.items, result.names
        chunks = await _pickled(
            len(items), lambda a, b: [(names(slot), lease) for slot, lease in items[a:b]]
        )
        result = TokenList(TokenChunks(chunks, len(items), CHUNK), str, result.cursor)
    elif type(result) is Page and len(result) > CHUNK:
        page = result
        result = PageChunks(await _pickled(len(page), lambda a, b: page[a:b]), page.next_before)
    return encode_result(result)


def _link(p: Planner) -> WorkerLink:
    link = p.worker
    assert isinstance(link, WorkerLink)
    return link


def _auth(p: Planner, session: Session, args: list[str]) -> Any:
    if len(args) == 2 and args[0] == WORKER_USER:
        given = args[1].encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, _link(p).secret.encode()):
            session.client.authed = True
            session.client.user = WORKER_USER
            return OK
    return Error("WRONGPASS", "this socket is for the server's own HTTP workers")


def _is_worker(session: Session) -> bool:
    return session.client.user == WORKER_USER


def _via(p: Planner, session: Session, args: list[str]) -> Any:
    user = session.client.user
    if user != WORKER_USER and user != NODE_USER:
        return Error("NOPERM", "VIA is for the server's own HTTP workers and cluster nodes")
    peer, bearer, inner = args[0], args[1], args[2:]
    name = inner[0].upper()
    if name not in table.KEYED and name != "POOL":
        return Error("ERR", f"VIA runs pool commands, not {inner[0][:40]!r}")
    client = Client(peer, "http", p.commands.settings)
    if bearer:
        try:
            p.gate.check_password(client, None, bearer)
        except TokenPoolError as error:
            return error_reply(error)
        client.bearer = bearer
    if user == WORKER_USER and p.peers is not None:  # a cluster: the pool may be elsewhere
        forwarded = _forwarded(p, inner, client)
        if forwarded is not None:
            return forwarded
    saved = session.client
    session.client = client
    try:
        plan = p.plan(inner, session)
    finally:
        session.client = saved
    kind = type(plan)
    if kind is Pending:
        return Pending(plan.request, plan.core, VIA)
    if kind is Action:
        run = plan.run

        async def pickled() -> Any:
            return await via_reply(await run())

        return Action(pickled)
    return plan  # an error reply (MOVED included: another node sent it, and follows it)


def _forwarded(p: Planner, inner: list[str], client: Client) -> Action | Error | None:
    """A worker's request in a cluster: sent on to the pool's owner when this node does
    not serve the pool (waiting out a failover), every node's pools for ``POOL LIST``;
    None when it is this node's to plan."""
    try:
        request = table.build(inner[0].upper(), inner, p.default_pool)
    except TokenPoolError as error:
        return error_reply(error)
    peers = p.peers
    commands = p.commands
    if type(request) is ListPools:

        async def every_pool() -> Any:
            mine = await commands.execute(request, client)
            return await via_reply(await peers.pool_names(client, mine))

        return Action(every_pool)
    pool = getattr(request, "pool", None)
    if pool is None or p.cluster.route(pool) is None or request is None:
        return None

    async def elsewhere() -> Any:
        async def here() -> Any:
            return await commands.execute(request, client)

        return await via_reply(await peers.execute(request, client, here))

    return Action(elsewhere, bool(getattr(request, "waits", False)))


def _worker(p: Planner, session: Session, args: list[str]) -> Any:
    if not _is_worker(session):
        return Error("NOPERM", "WORKER is for the server's own HTTP workers")
    link = _link(p)
    sub = args[0].upper()
    if sub == "READY" and len(args) == 1:

        async def ready() -> Any:
            ok, reasons = await link.readiness()
            return json.dumps({"ready": ok, "reasons": reasons})

        return Action(ready)
    if sub == "METRICS" and len(args) in (1, 3):
        fresh = len(args) == 3
        if fresh:  # the scraping worker's own figures first, so they are current
            try:
                link.report(args[1][:64], json.loads(args[2]))
            except ValueError:
                return Error("ERR", "WORKER METRICS takes JSON")

        async def metrics() -> Any:
            return await link.metrics(fresh)

        return Action(metrics)
    if sub == "ROUTE" and len(args) == 2:  # a cluster: where to follow a pool's events
        node = p.cluster
        if node is None or p.peers is None:
            return None
        route = node.route(args[1])
        if route is None or not isinstance(route, MovedError):
            return None  # served here (or nowhere yet: subscribe here, as before)
        return [route.address, NODE_USER, node.secret]
    if sub == "CLUSTER" and len(args) == 1:
        return json.dumps(cluster_json(p.peers))
    if sub == "REPORT" and len(args) == 3:
        try:
            figures = json.loads(args[2])
        except ValueError:
            return Error("ERR", "WORKER REPORT takes JSON")
        link.report(args[1][:64], figures)
        return OK
    return Error(
        "ERR",
        "WORKER READY | CLUSTER | ROUTE <pool> | METRICS [<id> <json>] | REPORT <id> <json>",
    )


command(VIA, 3, 64, "VIA <peer> <bearer> <command...>: a pool command for an HTTP client")(
    _via  # on the RESP port too: another node of the cluster sends it (AUTH tokenpool-node)
)

WORKER_COMMANDS: dict[str, tuple[int, int, Handler, str]] = {
    **CONNECTION,
    "AUTH": (2, 2, _auth, "AUTH tokenpool-worker <secret>"),
    VIA: (3, 64, _via, "VIA <peer> <bearer> <command...>: a pool command for an HTTP client"),
    "WORKER": (1, 3, _worker, "WORKER READY | CLUSTER | ROUTE <pool> | METRICS | REPORT"),
}
