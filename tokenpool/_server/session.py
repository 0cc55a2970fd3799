"""One RESP connection's state, and the commands that act on it rather than on a pool.

``Planner.plan(argv, session)`` turns one command into a plan at its place in the
pipeline: a ``Pending`` pool request (batched with its neighbours), a reply value
(answered at once), an ``Action`` (async work that runs alone: a failed AUTH's
delay, a pool created, a subscription) or a ``TxPlan`` (EXEC). What lives
on a connection is only what Redis keeps there: the protocol version, a name,
authentication, a MULTI queue and subscriptions. No command's meaning depends on
it: the pool is named in the command, or it is the server's default pool.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from .. import __version__
from .._cluster.slots import key_slot
from .._commands import (
    MULTI_MAX,
    TX_COST,
    Client,
    Commands,
    PoolRequest,
    Request,
    parse_channel,
)
from .._errors import TokenPoolError
from .._glob import check_pattern, matcher
from .._pool import PoolCore
from .._resp import OK, Error, Reply, Simple
from .._settings import NODE_USER
from . import argv as table
from .replies import error_reply

REDIS_COMPAT_VERSION = "7.2.0"
_new = tuple.__new__  # a named tuple without NamedTuple.__new__'s Python frame (hot path)


class Pending(NamedTuple):
    """A pool request planned at its place: batched with the pool requests around it."""

    request: PoolRequest
    core: PoolCore
    command: str  # the upper-case name, for its reply's shape


class Action(NamedTuple):
    """Work that runs alone, at its place in the pipeline (the batch before it goes first)."""

    run: Callable[[], Awaitable[Any]]
    # it may wait (an activation with WAIT sent on to another node): given up, never
    # granted, if the client hangs up meanwhile, as a waiting Pending is
    waits: bool = False


class TxPlan(NamedTuple):
    """``EXEC``: the queued requests' plans, run as ONE actor batch; one array reply."""

    plans: list[Any]  # Pending for requests, reply values for what was answered at once
    cost: int  # estimated reply bytes, at most TX_COST


class Session:
    """One connection's state."""

    __slots__ = (
        "channels",
        "client",
        "client_id",
        "executing",
        "multi",
        "multi_failed",
        "name",
        "patterns",
        "proto",
        "quit",
        "shards",
    )

    def __init__(self, client_id: int, client: Client) -> None:
        self.client_id = client_id
        self.client = client
        self.proto = 2
        self.name = ""
        self.quit = False
        self.multi: list[list[str]] | None = None
        self.multi_failed = False
        self.executing = False  # planning the commands of an EXEC
        self.channels: dict[str, Any] = {}
        self.patterns: dict[str, Any] = {}
        self.shards: dict[str, Any] = {}  # SSUBSCRIBE's channels

    @property
    def subscribed(self) -> bool:
        return bool(self.channels or self.patterns or self.shards)

    @property
    def peer(self) -> str:
        return self.client.peer


Handler = Callable[["Planner", Session, list[str]], Any]
CONNECTION: dict[str, tuple[int, int, Handler, str]] = {}
SUBSCRIBED_OK = {
    *("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"),
    *("PING", "QUIT", "RESET"),
}
NODE_COMMANDS = frozenset(
    {
        "VIA",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "SSUBSCRIBE",
        "SUNSUBSCRIBE",
        "PING",
        "QUIT",
        "RESET",
        "AUTH",
    }
)
"""What a session authenticated as another node (``AUTH tokenpool-node <secret>``) may
send: the cluster's secret opens VIA and the event streams it follows, not the pools."""
NO_AUTH_OK = {"AUTH", "HELLO", "QUIT", "RESET"}  # as Redis: even PING needs AUTH
NOT_IN_MULTI = {
    *("POOL", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"),
    *("UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "AUTH", "HELLO"),
}


def command(name: str, low: int, high: int, summary: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        CONNECTION[name] = (low, high, fn, summary)
        return fn

    return register


class Planner:
    """Plans RESP commands for one server. Counts what INFO reports."""

    def __init__(
        self,
        commands: Commands,
        *,
        config: dict[str, str] | None = None,
        info: Callable[[Session, str | None], Awaitable[str]] | None = None,
        subscriber: Any = None,
        worker: Any = None,
    ) -> None:
        self.commands = commands
        self.pools = commands.pools
        self.gate = commands.gate
        self.default_pool = commands.settings.default_pool
        self.config = config or {}
        self.info = info
        self.subscriber = subscriber  # the driver's pub/sub side (subscribe/unsubscribe)
        self.cluster: Any = None  # cluster mode: the ClusterNode that routes by slot
        self.peers: Any = None  # cluster mode: the other nodes (VIA for the HTTP tier)
        self.count = 0
        self.errors = 0
        # The listener of the HTTP workers (``workers.py``): its own AUTH, VIA and WORKER.
        self.worker = worker
        self.connection = CONNECTION
        self.unmetered: frozenset[str] = frozenset()
        if worker is not None:
            from .workers import WORKER_COMMANDS

            self.connection = WORKER_COMMANDS
            self.unmetered = frozenset({"VIA", "WORKER"})  # metered per HTTP client instead

    def plan(self, argv: list[str], session: Session) -> Any:
        self.count += 1
        name = argv[0].upper()
        if session.client.user == NODE_USER and name not in NODE_COMMANDS:
            return Error(
                "NOPERM",
                "a cluster node's connection sends VIA and follows events, nothing else",
            )
        queueing = session.multi is not None and not session.executing
        try:
            request = table.build(name, argv, self.default_pool)
        except TokenPoolError as error:
            # As Redis: any command refused while queuing (arity, an argument, a
            # permission, MOVED) makes EXEC answer EXECABORT, so nothing queued runs.
            session.multi_failed |= queueing
            return self._refused(error)
        if request is None:
            return self._connection_command(name, argv, session)
        client = session.client
        try:
            self.gate.admit(client, request, counted=not session.executing)
        except TokenPoolError as error:
            session.multi_failed |= queueing
            return self._refused(error)
        if session.subscribed and session.proto == 2:
            return self._subscribed_only(argv)
        cluster = self.cluster
        if cluster is not None:  # a pool this node does not serve: MOVED, as Redis Cluster
            pool = getattr(request, "pool", None)
            if pool is not None:
                elsewhere = cluster.route(pool)
                if elsewhere is not None:
                    session.multi_failed |= queueing
                    return self._refused(elsewhere)
        if queueing:
            return self._queue(name, argv, session, request)
        if not isinstance(request, PoolRequest):
            req = request

            async def run() -> Any:
                return await self.commands.execute(req, client, admitted=True)

            return Action(run)
        try:
            core = self.pools.core(request.pool)
            if request.prepares:
                request.prepare(core)
        except TokenPoolError as error:
            return self._refused(error)
        if session.executing and request.waits:
            request.no_wait()  # type: ignore[attr-defined]  # no waiting inside MULTI
        return _new(Pending, (request, core, name))

    def _refused(self, error: TokenPoolError) -> Error:
        return error_reply(error)

    def _subscribed_only(self, argv: list[str]) -> Error:
        return Error(
            "ERR",
            f"Can't execute '{argv[0].lower()[:40]}': only (P|S)SUBSCRIBE /"
            " (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
        )

    def _queue(self, name: str, argv: list[str], session: Session, request: Request | None) -> Any:
        if name in NOT_IN_MULTI or (request is not None and not isinstance(request, PoolRequest)):
            session.multi_failed = True
            return Error("ERR", f"{name} is not allowed inside MULTI")
        assert session.multi is not None
        if len(session.multi) >= MULTI_MAX:
            session.multi_failed = True
            return Error("ERR", f"a transaction may queue at most {MULTI_MAX} commands")
        session.multi.append(argv)
        return Simple("QUEUED")

    def _connection_command(self, name: str, argv: list[str], session: Session) -> Any:
        spec = self.connection.get(name)
        queueing = session.multi is not None and not session.executing
        if spec is None:
            shown = " ".join(f"'{a[:40]}'" for a in argv[1:4])
            session.multi_failed = queueing
            return Error(
                "ERR", f"unknown command '{argv[0][:40]}', with args beginning with: {shown}"
            )
        low, high, handler, _ = spec
        if not low <= len(argv) - 1 <= high:
            session.multi_failed = queueing
            return Error("ERR", f"wrong number of arguments for '{argv[0].lower()[:40]}' command")
        if name not in NO_AUTH_OK and name not in self.unmetered:
            try:
                self.gate.admit(session.client, None, counted=not session.executing)
            except TokenPoolError as error:
                session.multi_failed |= queueing
                return self._refused(error)
        # RESET runs at once inside MULTI too, and discards the transaction (as Redis).
        if queueing and name not in ("EXEC", "DISCARD", "MULTI", "QUIT", "RESET"):
            return self._queue(name, argv, session, None)
        if session.subscribed and session.proto == 2 and name not in SUBSCRIBED_OK:
            return self._subscribed_only(argv)
        try:
            return handler(self, session, argv[1:])
        except TokenPoolError as error:
            return self._refused(error)

    def authenticate(self, session: Session, user: str | None, password: str) -> Action:
        async def run() -> Reply:
            await self.gate.authenticate(session.client, user, password)
            return OK

        return Action(run)


# -- transactions ----------------------------------------------------------------------


@command("MULTI", 0, 0, "Start a transaction")
def _multi(p: Planner, session: Session, args: list[str]) -> Any:
    if session.multi is not None:
        return Error("ERR", "MULTI calls can not be nested")
    session.multi = []
    session.multi_failed = False
    return OK


@command("DISCARD", 0, 0, "Forget a transaction")
def _discard(p: Planner, session: Session, args: list[str]) -> Any:
    if session.multi is None:
        return Error("ERR", "DISCARD without MULTI")
    session.multi = None
    return OK


@command("EXEC", 0, 0, "Run a transaction: its commands as one batch")
def _exec(p: Planner, session: Session, args: list[str]) -> Any:
    queued = session.multi
    if queued is None:
        return Error("ERR", "EXEC without MULTI")
    failed = session.multi_failed
    session.multi = None
    session.multi_failed = False
    if failed:
        return Error("EXECABORT", "Transaction discarded because of previous errors.")
    # Planned now, at EXEC's place; a WAIT does not wait (as Redis's blocking commands
    # do not block inside MULTI).
    session.executing = True
    try:
        plans = [p.plan(argv, session) for argv in queued]
    finally:
        session.executing = False
    requests = [plan.request for plan in plans if type(plan) is Pending]
    if len({r.pool for r in requests}) > 1:
        return Error(
            "CROSSSLOT",
            "Keys in request don't hash to the same slot: the commands of a transaction"
            " must name one pool",
        )
    cost = sum(r.cost for r in requests)
    if cost > TX_COST:  # checked before any work: nothing was applied
        return Error(
            "EXECABORT",
            f"Transaction discarded: its replies would take about {cost:,} bytes, at most"
            f" {TX_COST:,} in one EXEC; page listings (TOKENS CURSOR 0 COUNT n, HISTORY"
            " LIMIT n) or send them outside MULTI",
        )
    return TxPlan(plans, cost)


# -- pub/sub ---------------------------------------------------------------------------


@command("SUBSCRIBE", 1, 32, "Follow pools' events: events:<pool>[@<revision>]")
def _subscribe(p: Planner, session: Session, args: list[str]) -> Any:
    return _channels(p, session, args, shard=False)


@command("SSUBSCRIBE", 1, 32, "Follow pools' events as shard channels: events:{<pool>}")
def _ssubscribe(p: Planner, session: Session, args: list[str]) -> Any:
    """Redis 7's sharded pub/sub: ``events:{<pool>}[@<revision>]`` (the braces are
    Redis's hash tag, so a cluster client computes the pool's slot from the channel and
    subscribes at its owner); messages are ``smessage``."""
    return _channels(p, session, args, shard=True)


def _channels(p: Planner, session: Session, args: list[str], *, shard: bool) -> Any:
    pools = [parse_channel(channel)[0] for channel in args]
    if p.cluster is not None:
        refused = _route_channels(p.cluster, pools)
        if refused is not None:
            return refused

    async def run() -> Any:
        return await p.subscriber.subscribe(session, args, pattern=False, shard=shard)

    return Action(run)


def _route_channels(cluster: Any, pools: list[str]) -> Error | None:
    """Cluster mode: a pool's events come from its owner only, so ``SUBSCRIBE`` is
    routed as Redis 7 routes ``SSUBSCRIBE``: its channels' pools in one slot
    (``CROSSSLOT``), served here (else ``MOVED`` to the owner, ``TRYAGAIN``,
    ``CLUSTERDOWN``). The node unsubscribes the channel when the slot leaves it."""
    if len({key_slot(pool) for pool in pools}) > 1:
        return Error(
            "CROSSSLOT",
            "Keys in request don't hash to the same slot: in cluster mode one SUBSCRIBE"
            " names the pools of one slot",
        )
    elsewhere = cluster.route(pools[0])
    return None if elsewhere is None else error_reply(elsewhere)


@command("PSUBSCRIBE", 1, 32, "Follow the events of every pool matching a pattern")
def _psubscribe(p: Planner, session: Session, args: list[str]) -> Any:
    for pattern in args:
        check_pattern(pattern, "a PSUBSCRIBE pattern")

    async def run() -> Any:
        return await p.subscriber.subscribe(session, args, pattern=True)

    return Action(run)


@command("UNSUBSCRIBE", 0, 32, "Stop following channels")
def _unsubscribe(p: Planner, session: Session, args: list[str]) -> Any:
    async def run() -> Any:
        return await p.subscriber.unsubscribe(session, args, pattern=False)

    return Action(run)


@command("SUNSUBSCRIBE", 0, 32, "Stop following shard channels")
def _sunsubscribe(p: Planner, session: Session, args: list[str]) -> Any:
    async def run() -> Any:
        return await p.subscriber.unsubscribe(session, args, pattern=False, shard=True)

    return Action(run)


@command("PUNSUBSCRIBE", 0, 32, "Stop following patterns")
def _punsubscribe(p: Planner, session: Session, args: list[str]) -> Any:
    async def run() -> Any:
        return await p.subscriber.unsubscribe(session, args, pattern=True)

    return Action(run)


# -- connection --------------------------------------------------------------------------


PONG = Simple("PONG")


@command("PING", 0, 1, "Ping the server")
def _ping(p: Planner, session: Session, args: list[str]) -> Any:
    if session.subscribed and session.proto == 2:
        return ["pong", args[0] if args else ""]
    return args[0] if args else PONG


@command("ECHO", 1, 1, "Echo a message")
def _echo(p: Planner, session: Session, args: list[str]) -> Any:
    return args[0]


@command("AUTH", 1, 2, "Authenticate: AUTH [default|admin] <password>")
def _auth(p: Planner, session: Session, args: list[str]) -> Any:
    user, password = (args[0], args[1]) if len(args) == 2 else ("default", args[0])
    node = p.cluster
    if user == NODE_USER and node is not None and node.secret:
        given = password.encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, node.secret.encode()):
            session.client.authed = True
            session.client.user = NODE_USER  # another node of the cluster: may send VIA
            return OK
        if not p.gate.passwords:  # (with passwords: counted as any failed one, below)
            return Error("WRONGPASS", "invalid username-password pair or user is disabled.")
    if not p.gate.passwords:
        return Error(
            "ERR",
            "AUTH <password> called without any password configured for the default"
            " user. Are you sure your configuration is correct?",
        )
    return p.authenticate(session, user, password)


@command("HELLO", 0, 6, "Choose the protocol (2 or 3), authenticate, name the connection")
def _hello(p: Planner, session: Session, args: list[str]) -> Any:
    proto = session.proto
    if args:
        if args[0] not in ("2", "3"):
            return Error("NOPROTO", "unsupported protocol version")
        proto = int(args[0])
    rest = args[1:]
    auth: tuple[str, str] | None = None
    name = None
    while rest:
        option = rest[0].upper()
        if option == "AUTH" and len(rest) >= 3:
            auth = (rest[1], rest[2])
            rest = rest[3:]
        elif option == "SETNAME" and len(rest) >= 2:
            name = rest[1]
            rest = rest[2:]
            if (wrong := _bad_client_name(name)) is not None:
                return wrong
        else:
            return Error("ERR", f"syntax error in HELLO option '{rest[0][:40]}'")

    def answer() -> Reply:
        if not session.client.authed:
            return Error(
                "NOAUTH",
                "HELLO must be called with the client already authenticated, otherwise the"
                " HELLO <proto> AUTH <user> <pass> option can be used to authenticate the"
                " client and select the RESP protocol version at the same time",
            )
        session.proto = proto
        if name is not None:
            session.name = name
        return {
            "server": "tokenpool",
            "version": REDIS_COMPAT_VERSION,
            "proto": proto,
            "id": session.client_id,
            "mode": "standalone",
            "role": "master",
            "modules": [],
        }

    if auth is None:
        return answer()
    # The same checks as AUTH's (a node's secret, WRONGPASS, no password configured).
    authed = _auth(p, session, list(auth))
    if isinstance(authed, Error):
        return authed
    if not isinstance(authed, Action):  # OK: another node's secret
        return answer()

    async def run() -> Reply:
        try:
            await authed.run()
        except TokenPoolError as error:
            return error_reply(error)
        return answer()

    return Action(run)


@command("QUIT", 0, 0, "Close the connection")
def _quit(p: Planner, session: Session, args: list[str]) -> Any:
    session.quit = True
    return OK


@command("RESET", 0, 0, "Reset the connection to how it started")
def _reset(p: Planner, session: Session, args: list[str]) -> Any:
    session.multi = None
    session.proto = 2
    session.name = ""
    session.client.reset(p.commands.settings)  # not admin; unauthenticated if a password is set

    async def run() -> Reply:
        if session.subscribed:
            await p.subscriber.unsubscribe(session, [], pattern=False, quiet=True)
            await p.subscriber.unsubscribe(session, [], pattern=True, quiet=True)
            await p.subscriber.unsubscribe(session, [], pattern=False, shard=True, quiet=True)
        return Simple("RESET")

    return Action(run)


@command("SELECT", 1, 1, "Select database 0 (the only one)")
def _select(p: Planner, session: Session, args: list[str]) -> Any:
    return OK if args[0] == "0" else Error("ERR", "DB index is out of range")


MAX_CLIENT_NAME = 128


def _bad_client_name(name: str) -> Error | None:
    """Why a connection's name is refused, or None: Redis's rule (printable ASCII, no
    space), so a name never splits a line that lists clients, and a bound of our own,
    refused rather than cut so the name read back is the name given."""
    if len(name) > MAX_CLIENT_NAME:
        return Error(
            "ERR",
            f"a client name is at most {MAX_CLIENT_NAME} characters; this one has {len(name)}",
        )
    if not all("!" <= c <= "~" for c in name):
        return Error("ERR", "Client names cannot contain spaces, newlines or special characters.")
    return None


@command("CLIENT", 1, 8, "CLIENT SETNAME, GETNAME, ID, SETINFO")
def _client(p: Planner, session: Session, args: list[str]) -> Any:
    sub = args[0].upper()
    if sub == "SETNAME" and len(args) == 2:
        if (wrong := _bad_client_name(args[1])) is not None:
            return wrong
        session.name = args[1]
        return OK
    if sub == "GETNAME":
        return session.name or None
    if sub == "ID":
        return session.client_id
    if sub == "SETINFO" and len(args) == 3:
        return OK
    return Error(
        "ERR", f"unknown subcommand or wrong number of arguments for 'CLIENT|{args[0][:20]}'"
    )


@command("INFO", 0, 1, "Server and default pool figures, in Redis's INFO format")
def _info(p: Planner, session: Session, args: list[str]) -> Any:
    assert p.info is not None
    info = p.info
    section = args[0] if args else None

    async def run() -> Reply:
        return await info(session, section)

    return Action(run)


@command("CONFIG", 1, 3, "CONFIG GET <pattern>: the server's settings")
def _config(p: Planner, session: Session, args: list[str]) -> Any:
    sub = args[0].upper()
    if sub == "GET" and len(args) == 2:
        matches = matcher(args[1].lower())
        return {k: v for k, v in p.config.items() if matches(k)}
    if sub == "SET":
        return Error(
            "ERR", "CONFIG SET is not supported: restart tokenpool serve with new settings"
        )
    if sub == "RESETSTAT":
        return OK
    return Error(
        "ERR", f"unknown subcommand or wrong number of arguments for 'CONFIG|{args[0][:20]}'"
    )


@command("COMMAND", 0, 32, "COMMAND [COUNT|INFO|DOCS|LIST|GETKEYS]: the commands and their keys")
def _command(p: Planner, session: Session, args: list[str]) -> Any:
    from .commands import command_docs, command_getkeys, command_info, command_names

    sub = args[0].upper() if args else ""
    if not sub:
        return command_info(None)
    if sub == "COUNT":
        return len(command_names())
    if sub == "LIST" and len(args) == 1:
        return command_names()
    if sub == "LIST" and len(args) == 4 and args[1].upper() == "FILTERBY":
        kind, value = args[2].upper(), args[3]
        if kind == "PATTERN":
            matches = matcher(value.lower())
            return [name for name in command_names() if matches(str(name))]
        if kind in ("MODULE", "ACLCAT"):  # no modules, and COMMAND INFO lists no category
            return []
        return Error(
            "ERR", f"COMMAND LIST FILTERBY takes MODULE, ACLCAT or PATTERN, not {kind[:20]!r}"
        )
    if sub == "INFO":
        return command_info(args[1:] or None)
    if sub == "DOCS":
        return command_docs(args[1:] or None)
    if sub in ("GETKEYS", "GETKEYSANDFLAGS") and len(args) > 1:
        return command_getkeys(args[1:], flags=sub == "GETKEYSANDFLAGS")
    return Error(
        "ERR", f"unknown subcommand or wrong number of arguments for 'COMMAND|{args[0][:20]}'"
    )


_VERSION = __version__
