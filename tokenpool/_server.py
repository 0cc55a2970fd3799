"""The RESP server: drives the sans-IO codec over trio streams, one task per connection.

Pipelining: everything a client sent before it reads is parsed, planned in
order (connection commands such as AUTH or HELLO take effect at their place
in the pipeline), the pool's operations go to the actor as ONE batch, and
all the replies leave in one write.

Limits (a bad client never hurts the others): requests are bounded by the
codec; a command whose first byte arrived more than ``idle_timeout`` ago and
is still incomplete drops the connection; a client that does not read its
replies is dropped when a write stays blocked for ``idle_timeout`` or a
pipeline's replies pass ``max_output`` bytes; past ``max_clients`` new
connections get ``-ERR max number of clients reached`` and are closed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hmac
import os
import resource
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, NamedTuple

import attrs
import structlog
import trio

from . import __version__
from ._errors import TokenPoolError
from ._model import Lease, Stats, TokenStatus, Usage
from ._ops import (
    Activate,
    Clear,
    GetLease,
    GetStats,
    GetToken,
    GetTokens,
    Op,
    Release,
    Renew,
    Revision,
    Validate,
)
from ._pool import Pool
from ._resp import NEED_DATA, OK, Error, ProtocolError, Reply, RespParser, Simple, encode

log = structlog.get_logger("tokenpool.server")

REDIS_COMPAT_VERSION = "7.2.0"
MAX_PIPELINE = 1024  # commands planned and sent to the actor per batch
READ_SIZE = 64 * 1024


def iso(value: datetime | None) -> str:
    """ISO-8601 UTC with microseconds and a ``Z``; ``""`` for no time."""
    if value is None:
        return ""
    return value.isoformat(timespec="microseconds").replace("+00:00", "Z")


_iso_cache: dict[datetime, bytes] = {}


def _iso_bytes(value: datetime) -> bytes:
    # Leases granted in one batch share their two datetimes: format each once.
    cached = _iso_cache.get(value)
    if cached is None:
        if len(_iso_cache) > 4096:
            _iso_cache.clear()
        cached = _iso_cache[value] = iso(value).encode()
    return cached


_LEASE_WIRE = (
    b"%b$2\r\nid\r\n$36\r\n%b\r\n$8\r\ntoken_id\r\n$36\r\n%b\r\n$7\r\nuser_id\r\n$%d\r\n%b\r\n"
    b"$5\r\nfence\r\n:%d\r\n$12\r\nactivated_at\r\n$%d\r\n%b\r\n$10\r\nexpires_at\r\n$%d\r\n%b\r\n"
    b"$8\r\nrevision\r\n:%d\r\n"
)


def lease_wire(result: tuple[Lease, int], proto: int) -> bytes:
    """``encode(revised_lease_reply(result), proto)``, about five times faster: ACTIVATE's reply."""
    lease, revision = result
    user = lease.user_id.encode()
    start = _iso_bytes(lease.activated_at)
    end = _iso_bytes(lease.expires_at)
    return _LEASE_WIRE % (
        b"%7\r\n" if proto == 3 else b"*14\r\n",
        lease.id.encode(),
        lease.token_id.encode(),
        len(user),
        user,
        lease.fence,
        len(start),
        start,
        len(end),
        end,
        revision,
    )


def lease_reply(lease: Lease) -> dict[str, Reply]:
    return {
        "id": lease.id,
        "token_id": lease.token_id,
        "user_id": lease.user_id,
        "fence": lease.fence,
        "activated_at": iso(lease.activated_at),
        "expires_at": iso(lease.expires_at),
    }


def revised_lease_reply(result: object) -> Reply:
    """A lease granted or renewed, with the pool revision that applied it."""
    assert isinstance(result, tuple)
    lease, revision = result
    return {**lease_reply(lease), "revision": revision}


def token_reply(token: TokenStatus) -> dict[str, Reply]:
    return {
        "id": token.id,
        "status": token.status.value,
        "current_user_id": token.current_user_id or "",
        "activated_at": iso(token.activated_at),
        "expires_at": iso(token.expires_at),
    }


def usage_reply(usage: Usage) -> dict[str, Reply]:
    return {
        "id": usage.id,
        "token_id": usage.token_id,
        "user_id": usage.user_id,
        "started_at": iso(usage.started_at),
        "ended_at": iso(usage.ended_at),
        "reason": usage.reason.value,
    }


def stats_reply(stats: Stats) -> dict[str, Reply]:
    out: dict[str, Reply] = {}
    for field in attrs.fields(Stats):
        value = getattr(stats, field.name)
        if isinstance(value, datetime):
            value = iso(value)
        elif value is None:
            value = ""
        elif isinstance(value, float):
            value = f"{value:.6f}"
        out[field.name] = value
    return out


def error_reply(error: BaseException) -> Error:
    if isinstance(error, TokenPoolError):
        return Error(error.code, str(error))
    return Error("ERR", f"internal error: {type(error).__name__}")


@attrs.define
class Settings:
    """The server's settings (``CONFIG GET`` shows them, less the password)."""

    host: str = "127.0.0.1"
    port: int = 7379
    password: str | None = None
    max_clients: int = 10_000
    idle_timeout: float = 30.0
    max_output: int = 64 * 1024 * 1024
    auth_delay: float = 0.1  # after a failed AUTH, slows password guessing


class Session:
    """One connection's state."""

    def __init__(self, client_id: int, peer: str, authed: bool) -> None:
        self.id = client_id
        self.peer = peer
        self.authed = authed
        self.proto = 2
        self.name = ""
        self.quit = False
        self.failed_auth = False


# A planned command: an immediate reply, or an op for the actor plus how to
# turn its result into a reply, or a coroutine to run after the batch.
Format = Callable[[object], Reply]
Later = Callable[[], Awaitable[Reply]]


class _Deferred(NamedTuple):
    """An op for the actor and how to turn its result into a reply. A named tuple, not
    attrs: one is made per command, and a frozen attrs ``__init__`` cost 3.5% of a
    pipelined ACTIVATE's server time."""

    op: Op
    format: Format
    wire: Callable[[Any, int], bytes] | None = None  # a hand-made encoder for hot replies
    # A mutating command: the batch gets a Revision() right after the op, and the
    # formatters get (result, revision), so the reply carries the revision that applied it.
    revised: bool = False


@attrs.frozen
class _After:
    run: Later


Plan = Reply | _Deferred | _After
_REVISION = Revision()


class RespServer:
    """Serves one pool over RESP. ``serve`` runs the listener until ``shutdown``."""

    def __init__(
        self,
        pool: Pool,
        settings: Settings,
        *,
        ssl_context: ssl.SSLContext | None = None,
        config: dict[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.ssl_context = ssl_context
        self.config = config or {}
        self.started = time.monotonic()
        self.clients = 0
        self.connections = 0
        self.rejected = 0
        self.commands = 0
        self.errors = 0  # error replies sent (INFO's total_error_replies, as in Redis)
        self._next_id = 0
        self._listeners: trio.CancelScope | None = None
        self._waiting: set[trio.CancelScope] = set()
        self.closing = False
        self.ports: list[int] = []

    # -- lifecycle ------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until ``shutdown()``; then wait for the connections to finish."""
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
            self.ports = [ln.socket.getsockname()[1] for ln in listeners]
            with trio.CancelScope() as self._listeners:
                log.info(
                    "listening",
                    host=self.settings.host,
                    ports=self.ports,
                    tls=bool(self.ssl_context),
                )
                task_status.started(self.ports)
                await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    def shutdown(self) -> None:
        """Stop accepting; idle connections close, busy ones finish their pipeline first."""
        self.closing = True
        if self._listeners is not None:
            self._listeners.cancel()
        for scope in list(self._waiting):
            scope.cancel()

    # -- one connection -------------------------------------------------------

    async def _connection(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        self._next_id += 1
        peer = _peer(stream)
        if self.clients >= self.settings.max_clients:
            self.rejected += 1
            log.warning("client_refused", peer=peer, reason="max_clients")
            with (
                trio.move_on_after(1),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(b"-ERR max number of clients reached\r\n")
            await trio.aclose_forcefully(stream)
            return
        self.clients += 1
        session = Session(self._next_id, peer, authed=self.settings.password is None)
        log.info("client_connected", client=session.id, peer=peer)
        reason = "closed"
        try:
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
                with trio.fail_after(self.settings.idle_timeout):
                    await stream.do_handshake()
            reason = await self._serve_client(stream, session)
        except trio.TooSlowError:
            reason = "tls handshake timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as error:
            reason = f"connection error: {error}"
        except Exception:  # one bad client never takes the listener down
            log.exception("client_failed", client=session.id, peer=peer)
            reason = "internal error"
        finally:
            self.clients -= 1
            log.info("client_closed", client=session.id, peer=peer, reason=reason)
            await trio.aclose_forcefully(stream)
        return

    async def _serve_client(self, stream: trio.abc.Stream, session: Session) -> str:
        parser = RespParser()
        started: float | None = None  # when the incomplete command's first byte came
        idle = self.settings.idle_timeout
        while True:
            commands: list[list[str]] = []
            problem: ProtocolError | None = None
            try:
                while len(commands) < MAX_PIPELINE:
                    command = parser.next_command()
                    if command is NEED_DATA:
                        break
                    assert isinstance(command, list)
                    commands.append(command)
            except ProtocolError as error:
                problem = error
            if commands or problem:
                out = await self._execute(commands, session) if commands else b""
                if problem is not None:
                    log.warning(
                        "protocol_error", client=session.id, peer=session.peer, error=str(problem)
                    )
                    out += encode(Error("ERR", f"Protocol error: {problem}"))
                if len(out) > self.settings.max_output:
                    log.warning("output_limit", client=session.id, bytes=len(out))
                    return "output buffer limit"
                with trio.move_on_after(idle) as sending:
                    await stream.send_all(out)
                if sending.cancelled_caught:
                    return "slow reader"
                if problem is not None:
                    return "protocol error"
                if session.quit:
                    return "quit"
                if len(commands) == MAX_PIPELINE:
                    continue  # more may be buffered: take them before reading again
            if self.closing:
                return "shutdown"
            if parser.in_command:
                if started is None:
                    started = trio.current_time()
            else:
                started = None
            deadline = started + idle if started is not None else float("inf")
            with trio.CancelScope(deadline=deadline) as waiting:
                self._waiting.add(waiting)
                if self.closing:
                    waiting.cancel()
                try:
                    data = await stream.receive_some(READ_SIZE)
                finally:
                    self._waiting.discard(waiting)
            if waiting.cancelled_caught:
                return "shutdown" if self.closing else "command timeout"
            if not data:
                return "client closed"
            parser.feed(bytes(data))

    # -- commands -------------------------------------------------------------

    async def _execute(self, commands: list[list[str]], session: Session) -> bytes:
        # Each planned command becomes its reply bytes (encoded now, with the
        # protocol in force at its place in the pipeline), or a deferred op
        # whose result is encoded once the batch comes back.
        planned: list[bytes | tuple[_Deferred | _After, int]] = []
        ops: list[Op] = []
        for argv in commands:
            self.commands += 1
            plan = self._plan(argv, session)
            if isinstance(plan, _Deferred):
                ops.append(plan.op)
                if plan.revised:
                    ops.append(_REVISION)
                planned.append((plan, session.proto))
            elif isinstance(plan, _After):
                planned.append((plan, session.proto))
            else:
                if type(plan) is Error:
                    self.errors += 1
                planned.append(encode(plan, session.proto))
            if session.quit:
                break
        results = await self.pool.batch(ops) if ops else []
        out: list[bytes] = []
        i = 0
        for item in planned:
            if type(item) is bytes:
                out.append(item)
                continue
            assert isinstance(item, tuple)
            plan, proto = item
            if isinstance(plan, _Deferred):
                result = results[i]
                i += 1
                if plan.revised:
                    revision = results[i]
                    i += 1
                    if not isinstance(result, BaseException):
                        result = (result, revision)
                if isinstance(result, BaseException):
                    self.errors += 1
                    out.append(encode(error_reply(result), proto))
                elif plan.wire is not None:
                    out.append(plan.wire(result, proto))
                else:
                    out.append(encode(plan.format(result), proto))
            else:
                try:
                    reply = await plan.run()
                except TokenPoolError as error:
                    self.errors += 1
                    reply = error_reply(error)
                out.append(encode(reply, proto))
        if session.failed_auth:
            session.failed_auth = False
            await trio.sleep(self.settings.auth_delay)
        return b"".join(out)

    def _plan(self, argv: list[str], session: Session) -> Plan:
        name = argv[0].upper()
        spec = COMMANDS.get(name)
        if spec is None:
            if name in ("POST", "HOST:"):
                # An HTTP request on the RESP port (a browser, or a cross-protocol
                # attack): refuse it and close, as Redis does.
                log.warning("http_request_refused", client=session.id, peer=session.peer)
                session.quit = True
                return Error("ERR", "Protocol error: an HTTP request on the RESP port")
            shown = " ".join(f"'{a[:40]}'" for a in argv[1:4])
            return Error(
                "ERR", f"unknown command '{argv[0][:40]}', with args beginning with: {shown}"
            )
        low, high, handler = spec
        if not low <= len(argv) - 1 <= high:
            return Error("ERR", f"wrong number of arguments for '{argv[0].lower()}' command")
        if not session.authed and name not in ("AUTH", "HELLO", "PING", "QUIT"):
            return Error("NOAUTH", "Authentication required.")
        return handler(self, session, argv[1:])

    def check_password(self, session: Session, user: str, password: str) -> Reply:
        expected = self.settings.password
        if expected is None:
            return Error(
                "ERR",
                "AUTH <password> called without any password configured for the default"
                " user. Are you sure your configuration is correct?",
            )
        ok = user == "default" and hmac.compare_digest(password.encode(), expected.encode())
        if not ok:
            session.failed_auth = True
            log.warning("auth_failed", client=session.id, peer=session.peer)
            return Error("WRONGPASS", "invalid username-password pair or user is disabled.")
        session.authed = True
        return OK

    def info(self, stats: Stats, section: str | None) -> str:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        sections: dict[str, dict[str, object]] = {
            "server": {
                "redis_version": REDIS_COMPAT_VERSION,
                "tokenpool_version": __version__,
                "redis_mode": "standalone",
                "process_id": os.getpid(),
                "tcp_port": self.ports[0] if self.ports else self.settings.port,
                "uptime_in_seconds": int(time.monotonic() - self.started),
            },
            "clients": {
                "connected_clients": self.clients,
                "blocked_clients": 0,
                "maxclients": self.settings.max_clients,
            },
            "memory": {"used_memory": usage.ru_maxrss * 1024, "maxmemory": 0},
            "pool": {
                "pool_name": self.pool.name,
                "size": stats.size,
                "active": stats.active,
                "available": stats.available,
                "revision": stats.revision,
                "activations": stats.activations,
                "evictions": stats.evictions,
                "expirations": stats.expirations,
                "releases": stats.releases,
                "clears": stats.clears,
                "renewals": stats.renewals,
            },
            "persistence": {
                "store": stats.store,
                "durability": stats.durability,
                "link": stats.link,
                "backlog": stats.backlog,
                "last_commit_at": iso(stats.last_commit_at),
                "write_lag_seconds": "" if stats.write_lag is None else f"{stats.write_lag:.6f}",
            },
            "stats": {
                "total_connections_received": self.connections,
                "total_commands_processed": self.commands,
                "rejected_connections": self.rejected,
                "total_error_replies": self.errors,
                "instantaneous_ops_per_sec": 0,
            },
            "keyspace": {"db0": f"keys={stats.active},expires={stats.active},avg_ttl=0"},
        }
        wanted = section.lower() if section else None
        lines: list[str] = []
        for title, fields in sections.items():
            if wanted not in (None, "all", "everything", "default", title):
                continue
            lines.append(f"# {title.capitalize()}")
            lines += [f"{k}:{v}" for k, v in fields.items()]
            lines.append("")
        return "\r\n".join(lines)


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2]  # type: ignore[union-attr]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "?"


# -- the command table: name -> (min args, max args, planner) -----------------

Handler = Callable[[RespServer, Session, list[str]], Plan]
COMMANDS: dict[str, tuple[int, int, Handler]] = {}


def command(name: str, low: int, high: int) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (low, high, fn)
        return fn

    return register


def _lease_or_nil(result: object) -> Reply:
    return None if result is None else lease_reply(result)  # type: ignore[arg-type]


@command("ACTIVATE", 1, 1)
def _activate(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(Activate(args[0]), revised_lease_reply, lease_wire, revised=True)


@command("RENEW", 2, 2)
def _renew(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(Renew(args[0], args[1]), revised_lease_reply, lease_wire, revised=True)


@command("VALIDATE", 2, 2)
def _validate(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(Validate(args[0], args[1]), lambda ok: 1 if ok else 0)


@command("RELEASE", 1, 2)
def _release(server: RespServer, session: Session, args: list[str]) -> Plan:
    user = args[1] if len(args) > 1 else None
    return _Deferred(Release(args[0], user), lambda result: result[1], revised=True)  # type: ignore[index]


@command("LEASE", 1, 1)
def _lease(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(GetLease(args[0]), _lease_or_nil)


@command("TOKEN", 1, 1)
def _token(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(GetToken(args[0]), lambda token: token_reply(token))  # type: ignore[arg-type]


@command("TOKENS", 0, 0)
def _tokens(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(GetTokens(), lambda tokens: [token_reply(t) for t in tokens])  # type: ignore[attr-defined]


@command("HISTORY", 1, 3)
def _history(server: RespServer, session: Session, args: list[str]) -> Plan:
    limit = 100
    if len(args) == 3 and args[1].upper() == "LIMIT":
        if not args[2].isdigit():
            return Error(
                "INVALID", f"limit must be an integer from 1 to 10000, not {args[2][:20]!r}"
            )
        limit = int(args[2])
    elif len(args) != 1:
        return Error("ERR", "syntax error: HISTORY <token_id> [LIMIT <n>]")
    token_id = args[0]

    async def run() -> Reply:
        return [usage_reply(u) for u in await server.pool.history(token_id, limit)]

    return _After(run)


@command("CLEAR", 0, 0)
def _clear(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(
        Clear(),
        lambda result: {"cleared": result[0], "revision": result[1]},  # type: ignore[index]
        revised=True,
    )


@command("STATS", 0, 0)
def _stats(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(GetStats(), lambda stats: stats_reply(server.pool.with_store(stats)))  # type: ignore[arg-type]


@command("INFO", 0, 1)
def _info(server: RespServer, session: Session, args: list[str]) -> Plan:
    section = args[0] if args else None
    return _Deferred(GetStats(), lambda stats: server.info(server.pool.with_store(stats), section))  # type: ignore[arg-type]


@command("DBSIZE", 0, 0)
def _dbsize(server: RespServer, session: Session, args: list[str]) -> Plan:
    return _Deferred(GetStats(), lambda stats: stats.active)  # type: ignore[attr-defined]


@command("PING", 0, 1)
def _ping(server: RespServer, session: Session, args: list[str]) -> Plan:
    return args[0] if args else Simple("PONG")


@command("ECHO", 1, 1)
def _echo(server: RespServer, session: Session, args: list[str]) -> Plan:
    return args[0]


@command("AUTH", 1, 2)
def _auth(server: RespServer, session: Session, args: list[str]) -> Plan:
    user, password = (args[0], args[1]) if len(args) == 2 else ("default", args[0])
    return server.check_password(session, user, password)


@command("HELLO", 0, 6)
def _hello(server: RespServer, session: Session, args: list[str]) -> Plan:
    proto = session.proto
    if args:
        if args[0] not in ("2", "3"):
            return Error("NOPROTO", "unsupported protocol version")
        proto = int(args[0])
    rest = args[1:]
    while rest:
        option = rest[0].upper()
        if option == "AUTH" and len(rest) >= 3:
            result = server.check_password(session, rest[1], rest[2])
            if isinstance(result, Error):
                return result
            rest = rest[3:]
        elif option == "SETNAME" and len(rest) >= 2:
            session.name = rest[1]
            rest = rest[2:]
        else:
            return Error("ERR", f"syntax error in HELLO option '{rest[0][:40]}'")
    if not session.authed:
        return Error(
            "NOAUTH",
            "HELLO must be called with the client already authenticated, otherwise the"
            " HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client"
            " and select the RESP protocol version at the same time",
        )
    session.proto = proto
    return {
        "server": "tokenpool",
        "version": REDIS_COMPAT_VERSION,
        "proto": proto,
        "id": session.id,
        "mode": "standalone",
        "role": "master",
        "modules": [],
    }


@command("QUIT", 0, 0)
def _quit(server: RespServer, session: Session, args: list[str]) -> Plan:
    session.quit = True
    return OK


@command("SELECT", 1, 1)
def _select(server: RespServer, session: Session, args: list[str]) -> Plan:
    return OK if args[0] == "0" else Error("ERR", "DB index is out of range")


@command("CLIENT", 1, 8)
def _client(server: RespServer, session: Session, args: list[str]) -> Plan:
    sub = args[0].upper()
    if sub == "SETNAME" and len(args) == 2:
        session.name = args[1]
        return OK
    if sub == "GETNAME":
        return session.name or None
    if sub == "ID":
        return session.id
    if sub == "SETINFO" and len(args) == 3:
        return OK
    return Error(
        "ERR", f"unknown subcommand or wrong number of arguments for 'CLIENT|{args[0][:20]}'"
    )


@command("COMMAND", 0, 8)
def _command(server: RespServer, session: Session, args: list[str]) -> Plan:
    sub = args[0].upper() if args else ""
    if sub == "COUNT":
        return len(COMMANDS)
    if sub == "DOCS":
        return {}
    if sub:
        return []
    return [
        [name.lower(), -(low + 1) if high > low else low + 1, [], 0, 0, 0]
        for name, (low, high, _) in sorted(COMMANDS.items())
    ]


@command("CONFIG", 1, 3)
def _config(server: RespServer, session: Session, args: list[str]) -> Plan:
    sub = args[0].upper()
    if sub == "GET" and len(args) == 2:
        pattern = args[1].lower()
        return {k: v for k, v in server.config.items() if fnmatch.fnmatchcase(k, pattern)}
    if sub == "SET":
        return Error(
            "ERR", "CONFIG SET is not supported: restart tokenpool serve with new settings"
        )
    if sub == "RESETSTAT":
        return OK
    return Error(
        "ERR", f"unknown subcommand or wrong number of arguments for 'CONFIG|{args[0][:20]}'"
    )
