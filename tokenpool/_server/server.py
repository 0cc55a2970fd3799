"""The RESP server: drives the codec and the command layer over trio streams.

One task per connection reads, plans each command at its place in the
pipeline (AUTH and HELLO take effect there) and runs the planned
commands in *segments*: one actor batch each, replies encoded with the
protocol in force at their place and sent in order. A segment ends before
an action (a failed AUTH's delay, POOL CREATE, SUBSCRIBE), after an
activation that may wait, when the pool changes, and when the estimated
size of its replies passes ``SEGMENT_COST``: so one client's pipeline never
holds the event loop or memory for long, whatever it asks for. Long listings
are encoded and sent in slices, with a checkpoint after each.

Limits (a bad client never hurts the others): requests are bounded by the
codec; a command whose first byte arrived more than ``idle_timeout`` ago and
is still incomplete drops the connection; a client that does not read its
replies is dropped when a write stays blocked for ``idle_timeout``; past
``max_clients`` new connections get ``-ERR max number of clients reached``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .. import __version__
from .._commands import (
    Activate,
    Commands,
    CommandSettings,
    GetStats,
    Granted,
    parse_channel,
    run_batch,
)
from .._errors import CompactedError, InvalidArgumentError, TokenPoolError, lone_error
from .._glob import matcher
from .._log import get_logger
from .._metrics import Latencies
from .._model import COUNTERS, Stats, iso, to_us
from .._pauses import info_fields
from .._pool import Pool, PoolCore, Pools
from .._resp import NEED_DATA, Error, ProtocolError, RequestParser, encode
from . import argv as table
from .cluster import info_fields as cluster_info  # (the module registers CLUSTER)
from .replies import Listing, error_reply, granted_wire, reply_of
from .session import CONNECTION, REDIS_COMPAT_VERSION, Action, Pending, Planner, Session, TxPlan
from .workers import VIA, via_reply

log = get_logger("tokenpool.server")

MAX_PIPELINE = 128  # commands parsed and planned before the connection yields its turn
SEGMENT_COST = 256 * 1024  # estimated reply bytes per actor batch
HEAVY_COST = 32 * 1024  # a segment past this takes one of the two heavy slots
SLICE = 256  # listing items encoded between checkpoints
LARGE_REPLIES = 16  # listings past HEAVY_COST held at once (each at most ~3 MB)
READ_SIZE = 64 * 1024
WAIT_BUFFER = 1024 * 1024  # bytes a client may send while one of its commands waits
MAX_SUBSCRIPTIONS = 1_000  # channels and patterns per connection (Redis has no bound)
MAX_FOLLOWED = 1_000  # pools a connection's patterns follow at once (a task each)
SLOT_CHECK = 0.5  # cluster mode: how often a channel waiting for its pool checks its slot
ACCEPT_RETRY = 0.1  # seconds between accepts while out of file descriptors (as trio)
FD_LOG_EVERY = 10.0  # seconds between log lines about it
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@attrs.frozen
class RespSettings:
    """The RESP listener's settings (``CONFIG GET`` shows them, less the passwords)."""

    host: str = "127.0.0.1"
    port: int = 7379
    max_clients: int = 10_000
    idle_timeout: float = 30.0
    commands: CommandSettings = attrs.Factory(CommandSettings)
    unix: str | None = None  # listen on this Unix socket instead (the HTTP workers' link)


@attrs.frozen
class ServerStatistics:
    """The RESP server's figures (``INFO``, ``/metrics``)."""

    clients: int
    connections: int
    rejected: int
    commands: int
    errors: int
    protocol_errors: int
    auth_failures: int
    rate_limited: int


_KNOWN = frozenset(CONNECTION) | frozenset(table.BY_NAME) | frozenset(table.KEYED)


def _label(name: str) -> str:
    """A command's metric label: its name if it is one (a bounded set), else ``other``."""
    upper = name.upper()
    return upper.lower() if upper in _KNOWN else "other"


class _Subscriptions:
    """The pub/sub side of the command layer: events of pools as Redis messages."""

    def __init__(self, server: RespServer) -> None:
        self.server = server

    async def subscribe(
        self, session: Session, names: list[str], *, pattern: bool, shard: bool = False
    ) -> Any:
        conn = self.server.connection_of(session)
        replies: list[Any] = []
        kind = "ssubscribe" if shard else "psubscribe" if pattern else "subscribe"
        table = _table(session, pattern, shard)
        held = len(session.channels) + len(session.patterns) + len(session.shards)
        if held + len({n for n in names if n not in table}) > MAX_SUBSCRIPTIONS:
            raise InvalidArgumentError(
                f"a connection may hold at most {MAX_SUBSCRIPTIONS:,} channels and patterns"
                f" (it holds {held:,}); none of these was subscribed"
            )
        for name in names:
            if name not in table:
                table[name] = conn.follow(name, pattern, shard)
            replies.append(_Push([kind, name, _count(session, shard)]))
        return _Many(replies)

    async def unsubscribe(
        self,
        session: Session,
        names: list[str],
        *,
        pattern: bool,
        shard: bool = False,
        quiet: bool = False,
    ) -> Any:
        conn = self.server.connection_of(session)
        table = _table(session, pattern, shard)
        kind = "sunsubscribe" if shard else "punsubscribe" if pattern else "unsubscribe"
        targets = names or list(table)
        replies: list[Any] = []
        for name in targets:
            scope = table.pop(name, None)
            if scope is not None:
                conn.stop(scope)
            replies.append(_Push([kind, name, _count(session, shard)]))
        if not targets:
            replies.append(_Push([kind, None, 0]))
        return None if quiet else _Many(replies)


def _table(session: Session, pattern: bool, shard: bool) -> dict[str, Any]:
    """A connection's channels, patterns or shard channels (``SSUBSCRIBE``)."""
    return session.shards if shard else session.patterns if pattern else session.channels


def _count(session: Session, shard: bool) -> int:
    """The count a (un)subscribe frame carries: Redis 7 counts shard channels apart."""
    return len(session.shards) if shard else len(session.channels) + len(session.patterns)


class _Push:
    """A pub/sub frame: an array in RESP2, a push (``>``) in RESP3."""

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items


class _Many:
    """Several frames as the reply of one command (SUBSCRIBE a b c)."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames


def _encode_push(push: _Push, proto: int) -> bytes:
    body = encode(push.items, proto)
    return b">" + body[1:] if proto == 3 else body


MESSAGES_PER_WRITE = 16
MESSAGES_MADE = 2
"""Events a forwarder sends in one write when they are already there (of which at most
``MESSAGES_MADE`` + 1 whose JSON no other forwarder made yet: the first is always made):
a syscall, a lock and a deadline for 16, not each (300 connections following one busy
pool took 79% of the server's time, half of it in sends), while one forwarder's turn of
the loop stays short (under 100 µs): a loop turn runs every forwarder with events
waiting, and it must still answer a PING within milliseconds with hundreds of them."""


def _message_head(channel: str, pattern: str | None, shard: bool, proto: int) -> bytes:
    """A pub/sub message's frame up to its payload (``_encode_push`` of its items)."""
    if pattern is not None:
        items = ["pmessage", pattern, channel, ""]
    else:
        items = ["smessage" if shard else "message", channel, ""]
    return _encode_push(_Push(items), proto)[: -len(b"$0\r\n\r\n")]


def _framed(head: bytes, payload: bytes) -> bytes:
    return b"%b$%d\r\n%b\r\n" % (head, len(payload), payload)


class _Connection:
    """One client: its session, its send lock, its pub/sub forwarders."""

    def __init__(self, server: RespServer, stream: trio.abc.Stream, session: Session) -> None:
        self.server = server
        self.stream = stream
        # A plain TCP or Unix connection's own socket: a reply that fits in the kernel's
        # buffer is written to it directly, and a read tried on it before waiting, with
        # none of the stream's per-call layers (error translation, conflict detection,
        # a timer set and cleared per write: together about a fifth of a lone request's
        # CPU). TLS goes through the stream always.
        raw = getattr(stream.socket, "_sock", None) if type(stream) is trio.SocketStream else None
        self.raw: socket.socket | None = raw if isinstance(raw, socket.socket) else None
        self.session = session
        # One cancel scope for the connection's life, its deadline moved rather than a
        # scope made per read and per write (they cost a pipeline of one a third of its
        # time): set for a command that started and stalled, and for a blocked write.
        self.scope = trio.CancelScope()
        self.idle = False  # waiting for a command with none started: shutdown closes it
        self.lock: trio.Lock | None = None  # made when a pub/sub forwarder sends too
        self.nursery: trio.Nursery | None = None
        self.closed = False
        self.parser = RequestParser()
        self.hung_up = False  # the client closed its side while a command waited
        self.fed = False  # bytes were parsed while a command waited: run them before reading
        self.followed = 0  # pools its patterns follow (a forwarder task each)
        self._sending: trio.CancelScope | None = None  # the subscription writing a frame now
        self._stop_after_send = False
        self._idle_timeout = server.settings.idle_timeout

    async def watch_hangup(self, scope: trio.CancelScope) -> None:
        """While a command waits (ACTIVATE ... WAIT), keep reading: what the client sends
        is kept for later (up to a bound), and if it hangs up the wait is cancelled, so
        a waiter whose connection closed is never granted a token."""
        while self.parser_buffered() < WAIT_BUFFER:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.hung_up = True
                scope.cancel()
                return
            self.parser.feed(bytes(data))
            self.fed = True
        await trio.sleep_forever()

    async def receive(self) -> bytes | bytearray:
        """The next bytes from the client (``b""`` at its end). What is there already is
        read at once, then the loop is given a turn (as the stream would, so a client that
        keeps its pipe full never holds the others up); otherwise it waits to read."""
        raw = self.raw
        if raw is None:
            return await self.stream.receive_some(READ_SIZE)
        waited = False
        while True:
            try:
                data = raw.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(raw)
                waited = True
                continue
            except OSError as error:
                raise trio.BrokenResourceError(f"socket error: {error}") from error
            if not waited:  # (shielded: a cancel now must not drop bytes already read)
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    def parser_buffered(self) -> int:
        slow = self.parser._slow
        return slow.buffered + len(self.parser._buf)

    async def send(self, data: bytes, subscription: trio.CancelScope | None = None) -> None:
        """Send; a write blocked past ``idle_timeout`` drops the connection (slow reader).

        ``subscription``: the cancel scope of the pub/sub forwarder sending (its frames
        are messages). An UNSUBSCRIBE or RESET ends it with ``stop``, which waits for
        the end of a frame being written: cut in the middle, the frame would leave the
        client's parser reading the next replies as the rest of that message."""
        if self.lock is None:
            await self._send(data)
            return
        async with self.lock:
            if subscription is None:
                await self._send(data)
                return
            self._sending = subscription
            try:
                await self._send(data)
            finally:
                self._sending = None
                if self._stop_after_send:
                    self._stop_after_send = False
                    subscription.cancel()

    def stop(self, subscription: trio.CancelScope) -> None:
        """End a pub/sub forwarder: at once, or after the frame it is writing."""
        if subscription is self._sending:
            self._stop_after_send = True
        else:
            subscription.cancel()

    async def _send(self, data: bytes) -> None:
        # Only one task sends at a time (the forwarders and the loop share ``lock``, made
        # before the first forwarder starts): the direct write has no conflict detector.
        raw = self.raw
        rest: bytes | memoryview = data
        if raw is not None:
            try:
                sent = raw.send(data)
            except OSError:  # would block, or broken: the stream waits, or says which
                sent = 0
            if sent == len(data):
                return
            rest = memoryview(data)[sent:]
        scope = self.scope
        scope.deadline = trio.current_time() + self._idle_timeout
        try:
            await self.stream.send_all(rest)
        finally:
            scope.deadline = math.inf

    def follow(self, name: str, pattern: bool, shard: bool = False) -> trio.CancelScope:
        scope = trio.CancelScope()
        if self.lock is None:
            self.lock = trio.Lock()  # from now on the forwarders send too
        assert self.nursery is not None
        self.nursery.start_soon(self._forward, name, pattern, scope, shard)
        return scope

    async def _forward(
        self, name: str, pattern: bool, scope: trio.CancelScope, shard: bool = False
    ) -> None:
        """Deliver a channel's (or a pattern's) events as messages until unsubscribed.

        As in Redis, a subscription outlives its publisher: a channel of a pool not
        served yet (or dropped) delivers once the pool is (again). A subscription that
        ended (``overflow``, ``compacted``) is forgotten, so it can be made again."""
        table = _table(self.session, pattern, shard)
        try:
            with scope:
                if pattern:
                    await self._forward_pattern(name, scope)
                    return
                try:
                    pool_name, since = parse_channel(name)
                except TokenPoolError:
                    return
                pools = self.server.pools
                cluster = self.server.planner.cluster
                new = False  # served only since the subscription: from its start
                while True:
                    while pool_name not in pools:
                        new = True
                        if cluster is not None and cluster.route(pool_name) is not None:
                            await self._end_subscription(name, scope, shard)
                            return
                        with trio.move_on_after(math.inf if cluster is None else SLOT_CHECK):
                            await pools.changed()
                    why, followed = await self._forward_pool(
                        pool_name,
                        since,
                        name,
                        None,
                        scope,
                        shard,
                        from_start=new and since is None,
                    )
                    if why in ("overflow", "compacted"):
                        await self._end_subscription(name, scope, shard)
                        return
                    if why != "closed":
                        return
                    if cluster is not None and cluster.route(pool_name) is not None:
                        await self._end_subscription(name, scope, shard)
                        return
                    served = pools.find(pool_name)
                    if served is not None and served is followed:
                        return  # its stream ended while it is still served: shutting down
                    if followed is not None:
                        await self._dropped(name, None, scope, followed, shard)
                    # Dropped: the next pool of that name is followed from its first event,
                    # whether it comes later or came already (created anew while this task
                    # was still sending the old one's backlog to a slow reader).
                    since, new = None, True
        finally:
            if table.get(name) is scope:
                del table[name]

    async def _end_subscription(self, channel: str, scope: trio.CancelScope, shard: bool) -> None:
        """The server ends a channel's subscription: it overflowed, its replay was
        compacted (the message saying so went first), or, in cluster mode, the channel's
        slot is no longer served here (given away, or the lease ran out). As Redis 7 does
        for a shard channel whose slot moved, an ``(s)unsubscribe`` push says so, so the
        client's view of what it is subscribed to stays true (redis-py drops the channel,
        and leaves subscribed mode after the last one). It may subscribe again; in a
        cluster it is sent to the new owner (``MOVED``)."""
        session = self.session
        table = _table(session, False, shard)
        if table.get(channel) is scope:
            del table[channel]
        kind = "sunsubscribe" if shard else "unsubscribe"
        push = _Push([kind, channel, _count(session, shard)])
        try:
            await self.send(_encode_push(push, session.proto))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self.closed = True  # the client is gone (or too slow): as a message's send
            with contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _forward_pattern(self, pattern: str, scope: trio.CancelScope) -> None:
        pools = self.server.pools
        matches = matcher(pattern)  # (checked by PSUBSCRIBE)
        seen: set[str] = set()
        first = True  # the pools served when the pattern was subscribed: from now on

        async def follow(pool_name: str, channel: str, new: bool) -> None:
            self.followed += 1
            try:
                while True:
                    why, followed = await self._forward_pool(
                        pool_name, None, channel, pattern, scope, from_start=new
                    )
                    if why != "closed":
                        return
                    served = pools.find(pool_name)
                    if served is not None and served is followed:
                        return  # its stream ended while it is still served: shutting down
                    if followed is not None:
                        await self._dropped(channel, pattern, scope, followed)
                    if served is None:
                        seen.discard(pool_name)  # dropped: follow it again if it comes back
                        return
                    new = True  # dropped and created anew meanwhile: follow the new one
            finally:
                self.followed -= 1

        async with trio.open_nursery() as nursery:
            while True:
                for pool_name in pools.names():
                    channel = f"events:{pool_name}"
                    if pool_name not in seen and matches(channel):
                        if self.followed >= MAX_FOLLOWED:
                            # A task and a buffer per pool followed: bounded per connection.
                            # Say so once and stop following more (as an overflow ends a
                            # subscription); the pools followed so far still deliver.
                            await self._message(
                                channel,
                                pattern,
                                scope,
                                json.dumps(
                                    {
                                        "kind": "overflow",
                                        "message": f"this connection follows {MAX_FOLLOWED:,}"
                                        " pools already: pools matched from now on are not"
                                        " followed",
                                    }
                                ),
                            )
                            await trio.sleep_forever()
                        seen.add(pool_name)
                        nursery.start_soon(follow, pool_name, channel, not first)
                first = False
                await pools.changed()

    async def _forward_pool(
        self,
        pool_name: str,
        since: int | None,
        channel: str,
        pattern: str | None,
        subscription: trio.CancelScope,
        shard: bool = False,
        *,
        from_start: bool = False,
    ) -> tuple[str, Pool | None]:
        """Forward one pool's events; why it stopped: ``closed`` (the pool stopped
        serving), ``overflow``, ``compacted``, or ``gone`` (the client or the pool), and
        the pool followed (None if none was served by that name).

        ``from_start``: the pool came to be served after the subscription was made, so
        every event it has made belongs to the subscriber (as Redis delivers every
        message published after SUBSCRIBE): replay them all, not only those after the
        moment this task got to run, which a command sent right after ``POOL CREATE``
        can beat."""
        try:
            pool = self.server.pools.get(pool_name)
        except TokenPoolError:
            return "closed", None
        figures = pool.statistics()
        current = figures.stats.revision
        if from_start:
            since = figures.oldest_event - 1
        if since is not None and since > current:
            # a revision this pool never reached: the server restarted without its
            # history (memory store). Resuming would skip silently: say so, as for
            # compacted events, naming the oldest event held (the client resumes there).
            await self._message(
                channel,
                pattern,
                subscription,
                json.dumps(
                    {
                        "kind": "compacted",
                        "oldest": figures.oldest_event,
                        "message": f"revision {since} is ahead of this pool's {current}"
                        " (the server restarted without its history)",
                    }
                ),
                shard,
            )
            return "compacted", pool
        try:
            async with pool.watch(since) as events:
                while True:
                    try:
                        payloads = await events.next_payloads(MESSAGES_PER_WRITE, MESSAGES_MADE)
                    except StopAsyncIteration:
                        break
                    head = _message_head(channel, pattern, shard, self.session.proto)
                    await self.send(b"".join(_framed(head, p) for p in payloads), subscription)
                if events.overflowed:
                    return "overflow", pool
        except CompactedError as error:
            await self._message(
                channel,
                pattern,
                subscription,
                json.dumps({"kind": "compacted", "oldest": error.oldest, "message": str(error)}),
                shard,
            )
            return "compacted", pool
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self.closed = True
            with contextlib.suppress(Exception):
                await self.stream.aclose()
            return "gone", pool
        return "closed", pool

    async def _dropped(
        self,
        channel: str,
        pattern: str | None,
        subscription: trio.CancelScope,
        pool: Pool,
        shard: bool = False,
    ) -> None:
        """The pool followed was dropped: say so on its channel, with the last revision it
        made. The subscription stays (as in Redis, it outlives its publisher: a pool made
        again under that name is followed from its first event); the client library's
        ``watch`` ends here, as the embedded library's does."""
        payload = {
            "kind": "dropped",
            "pool": pool.name,
            "revision": pool.statistics().stats.revision,
        }
        await self._message(channel, pattern, subscription, json.dumps(payload), shard)

    async def _message(
        self,
        channel: str,
        pattern: str | None,
        subscription: trio.CancelScope,
        payload: str,
        shard: bool = False,
    ) -> None:
        head = _message_head(channel, pattern, shard, self.session.proto)
        await self.send(_framed(head, payload.encode()), subscription)


async def _acted(action: Action) -> Any:
    """What an Action answers: its reply, or its refusal's (never the connection's end),
    in a pipeline and inside EXEC alike."""
    try:
        return await action.run()
    except TokenPoolError as error:
        return error_reply(error)


async def _listen(host: str, port: int) -> list[trio.SocketListener]:
    """The listeners, or one clear ``InvalidArgumentError`` naming the port (a library
    user gets the same sentence as the command line, not a bare ``OSError``)."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as failure:
        if failure.errno == errno.EADDRINUSE:
            raise InvalidArgumentError(
                f"port {port} on {host} is in use (another tokenpool or Redis?);"
                " choose another port (--port; 0 picks a free one)"
            ) from None
        raise InvalidArgumentError(
            f"cannot listen on {host}:{port}: {failure.strerror or failure}"
        ) from None


async def check_port(host: str, port: int) -> None:
    """Raise ``_listen``'s error now if ``host:port`` cannot be listened on (the CLI asks
    before it recovers the pools, which takes them over and bumps their epoch: a taken
    port should cost nothing). The real listeners are opened later; port 0 is not asked."""
    if port:
        for listener in await _listen(host, port):
            await listener.aclose()


async def _listen_unix(path: str) -> trio.SocketListener:
    """A listener on a Unix socket at ``path`` (replacing a stale one)."""
    import socket as stdlib_socket

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(1024)
    except OSError as failure:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {path}: {failure.strerror}") from None
    return trio.SocketListener(sock)


class RespServer:
    """Serves pools over RESP. ``serve`` runs the listener until ``shutdown``."""

    def __init__(
        self,
        pools: Pools,
        settings: RespSettings,
        *,
        ssl_context: ssl.SSLContext | None = None,
        config: dict[str, str] | None = None,
        latencies: Latencies | None = None,
        commands: Commands | None = None,
        worker: Any = None,
        cluster: Any = None,
    ) -> None:
        self.pools = pools
        self.worker = worker  # a WorkerLink: this listener serves the HTTP workers only
        self.latencies = latencies or Latencies()
        self.settings = settings
        self.ssl_context = ssl_context
        self.commands = commands or Commands(pools, settings.commands)
        self.planner = Planner(
            self.commands,
            config=config,
            info=self.info,
            subscriber=_Subscriptions(self),
            worker=worker,
        )
        self.planner.cluster = cluster  # cluster mode: a ClusterNode (routes by slot)
        self.config = self.planner.config
        self.started = time.monotonic()
        self.clients = 0
        self.connections = 0
        self.rejected = 0
        self.protocol_errors = 0
        self._next_id = 0
        self._listeners: trio.CancelScope | None = None
        self._by_session: dict[int, _Connection] = {}
        self.closing = False
        self.ports: list[int] = []
        self._spare_fd: int | None = None  # given up to refuse a client when out of descriptors
        self._fd_refusals = 0
        self._fd_logged = -math.inf
        # Encoding a long listing is the costliest thing a client can ask for: at most
        # two connections do it at once, a slice at a time, so however many ask, a
        # light command waits behind a couple of slices (a few ms), not behind all of them.
        self._heavy = trio.CapacityLimiter(2)
        # Large listings held at once (built, then sent to readers that may stall): what
        # bounds the memory many slow readers can pin, whatever they send.
        self._large = trio.CapacityLimiter(LARGE_REPLIES)

    @property
    def errors(self) -> int:
        return self.planner.errors

    def statistics(self) -> ServerStatistics:
        gate = self.commands.gate
        return ServerStatistics(
            clients=self.clients,
            connections=self.connections,
            rejected=self.rejected,
            commands=self.planner.count,
            errors=self.planner.errors,
            protocol_errors=self.protocol_errors,
            auth_failures=gate.auth_failures["resp"],
            rate_limited=gate.rate_limited["resp"],
        )

    def connection_of(self, session: Session) -> _Connection:
        return self._by_session[session.client_id]

    # -- lifecycle ------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until ``shutdown()``; then wait for the connections to finish."""
        self._spare_fd = _open_spare()
        try:
            await self._serve(task_status)
        finally:
            spare, self._spare_fd = self._spare_fd, None
            if spare is not None:
                os.close(spare)

    async def _serve(self, task_status: trio.TaskStatus[list[int]]) -> None:
        async with trio.open_nursery() as nursery:
            if self.settings.unix is not None:
                listeners = [await _listen_unix(self.settings.unix)]
            else:
                listeners = await _listen(self.settings.host, self.settings.port)
            self.ports = [ln.socket.getsockname()[1] for ln in listeners if not self.settings.unix]
            with trio.CancelScope() as self._listeners:
                if self.settings.unix is None:
                    log.info(
                        "listening",
                        host=self.settings.host,
                        ports=self.ports,
                        tls=bool(self.ssl_context),
                    )
                task_status.started(self.ports)
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept, listener, nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """trio's ``serve_listeners``, but out of file descriptors (EMFILE) the client
        is told ``-ERR max number of clients reached`` (a spare descriptor is given up
        to accept it, as nginx and libuv do) and one JSON line is logged at most every
        ``FD_LOG_EVERY`` seconds, not a traceback per attempt."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:
                    if error.errno not in _ACCEPT_CAPACITY:
                        raise
                    await self._out_of_descriptors(listener, error)
                    continue
                nursery.start_soon(self._connection, stream)

    async def _out_of_descriptors(self, listener: trio.SocketListener, error: OSError) -> None:
        self.rejected += 1
        self._fd_refusals += 1
        now = trio.current_time()
        if now >= self._fd_logged + FD_LOG_EVERY:
            log.warning(
                "accept_failed",
                error=errno.errorcode.get(error.errno or 0, "?"),
                reason=os.strerror(error.errno or 0),
                refused_since_last=self._fd_refusals,
            )
            self._fd_refusals = 0
            self._fd_logged = now
        spare, self._spare_fd = self._spare_fd, None
        if spare is not None:
            os.close(spare)
            try:
                with trio.move_on_after(0.05):
                    stream = await listener.accept()
                    with (
                        trio.move_on_after(0.1),
                        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                    ):
                        await stream.send_all(b"-ERR max number of clients reached\r\n")
                    await trio.aclose_forcefully(stream)
            except OSError:
                pass
            finally:
                self._spare_fd = _open_spare()
        await trio.sleep(ACCEPT_RETRY)

    def shutdown(self) -> None:
        """Stop accepting; idle connections close, busy ones finish their pipeline first."""
        self.closing = True
        if self._listeners is not None:
            self._listeners.cancel()
        for conn in list(self._by_session.values()):
            if conn.idle:  # busy connections finish their pipeline and then see closing
                conn.scope.cancel()

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
        session = Session(self._next_id, self.commands.client(peer, "resp"))
        if self.worker is not None:  # only AUTH tokenpool-worker <secret> opens it
            session.client.authed = False
            session.client.user = ""
            session.client.transport = "worker"
        log.debug("client_connected", client=session.client_id, peer=peer)
        reason = "closed"
        try:
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
                with trio.fail_after(self.settings.idle_timeout):
                    await stream.do_handshake()
            conn = _Connection(self, stream, session)
            self._by_session[session.client_id] = conn
            try:
                async with trio.open_nursery() as nursery:
                    conn.nursery = nursery
                    with conn.scope:
                        reason = await self._serve_client(conn)
                    if conn.scope.cancelled_caught:
                        reason = (
                            "shutdown"
                            if self.closing and conn.idle
                            else ("command timeout" if conn.idle else "slow reader")
                        )
                    nursery.cancel_scope.cancel()
            finally:
                del self._by_session[session.client_id]
        except BaseException as raised:  # one bad client never takes the listener down
            error = lone_error(raised)
            if isinstance(error, trio.TooSlowError):
                reason = "slow reader or tls handshake timeout"
            elif isinstance(
                error, (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)
            ):
                reason = f"connection error: {error}"
            elif isinstance(error, Exception):
                log.exception("client_failed", client=session.client_id, peer=peer)
                reason = "internal error"
            else:
                raise
        finally:
            self.clients -= 1
            log.debug("client_closed", client=session.client_id, peer=peer, reason=reason)
            await trio.aclose_forcefully(stream)

    async def _serve_client(self, conn: _Connection) -> str:
        session = conn.session
        parser = conn.parser
        started: float | None = None  # when the incomplete command's first byte came (trio time)
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
            if commands:
                began = time.perf_counter()
                await self._execute(conn, commands)
                self.latencies.observe_pipeline(
                    "resp", commands, _label, time.perf_counter() - began
                )
                if session.quit:
                    return "quit"
                if conn.hung_up:
                    return "client closed while waiting"
            if problem is not None:
                self.protocol_errors += 1
                log.warning(
                    "protocol_error",
                    client=session.client_id,
                    peer=session.peer,
                    error=str(problem),
                )
                await conn.send(encode(Error("ERR", f"Protocol error: {problem}")))
                return "protocol error"
            if conn.closed:
                return "closed by a forwarder"
            if len(commands) == MAX_PIPELINE or conn.fed:
                # The rest of a long pipeline, or what came while a command waited
                # (complete commands may be buffered already: never wait for more bytes
                # before running them), after others had a turn.
                conn.fed = False
                await trio.lowlevel.checkpoint()
                continue
            if self.closing:
                return "shutdown"
            if parser.in_command:
                # A command started and is not all here: it must be within the deadline
                # from its first byte (a reply sent meanwhile reset it: set it again;
                # a command completed since: the stall counts from now).
                if started is None or commands:
                    started = trio.current_time()
                conn.scope.deadline = started + idle
            elif started is not None:  # (setting a deadline costs: only when it changes)
                started = None
                conn.scope.deadline = math.inf
            conn.idle = True
            data = await conn.receive()
            conn.idle = False
            if not data:
                return "client closed"
            parser.feed(bytes(data))

    # -- running a pipeline -----------------------------------------------------

    async def _execute(self, conn: _Connection, commands: list[list[str]]) -> None:
        session = conn.session
        plan_of = self.planner.plan
        segment: list[tuple[Any, int]] = []  # (Pending or reply bytes, proto)
        core: PoolCore | None = None
        cost = 0
        for argv in commands:
            plan = plan_of(argv, session)
            kind = type(plan)
            if kind is Pending:
                request = plan.request
                if core is not None and (
                    plan.core is not core or cost + request.cost > SEGMENT_COST
                ):
                    await self._run(conn, segment, core, cost)
                    segment, cost = [], 0
                core = plan.core
                cost += request.cost
                segment.append((plan, session.proto))
                if request.waits:
                    await self._wait(conn, segment, core, cost)
                    segment, cost, core = [], 0, None
                    if conn.hung_up:
                        return
            elif kind is Action or kind is TxPlan:
                if segment:
                    await self._run(conn, segment, core, cost)
                    segment, cost, core = [], 0, None
                if kind is Action:
                    if plan.waits:
                        reply = await self._wait_action(conn, plan.run)
                        if conn.hung_up:
                            return
                    else:
                        reply = await _acted(plan)
                    # in the protocol in force after it (HELLO 3 AUTH answers in RESP3)
                    await self._send_reply(conn, reply, session.proto, argv[0].upper())
                else:
                    await self._transaction(conn, plan, session.proto)
            else:
                if type(plan) is Error:
                    if argv[0].upper() in ("POST", "HOST:"):
                        # An HTTP request on the RESP port (a browser, or a cross-protocol
                        # attack; no command has those names): refuse it and close, as
                        # Redis does.
                        if segment:
                            await self._run(conn, segment, core, cost)
                        log.warning(
                            "http_request_refused", client=session.client_id, peer=session.peer
                        )
                        await conn.send(
                            encode(Error("ERR", "Protocol error: an HTTP request on the RESP port"))
                        )
                        session.quit = True
                        return
                    self.planner.errors += 1
                segment.append((encode(plan, session.proto), 0))
            if session.quit:
                break
        if segment:
            await self._run(conn, segment, core, cost)

    async def _run(
        self,
        conn: _Connection,
        segment: list[tuple[Any, int]],
        core: PoolCore | None,
        cost: int = 0,
    ) -> None:
        """One actor batch for the segment's requests, then its replies in order.

        A heavy segment (large replies) takes one of the two heavy slots while it asks
        the actor and formats, so however many clients ask for large replies at once,
        only two of them use the CPU at a time and light commands are not queued behind
        all the others (sending happens outside the slot: a reader may stall).
        """
        heavy = cost > HEAVY_COST
        pending = [p for p, _ in segment if type(p) is Pending]
        writer = None if core is None else core.writer
        if (
            writer is not None
            and writer.slowing()  # the store is falling behind: slow to its pace
            and any(type(p.request) is Activate for p in pending)
            and (delay := writer.stall())
        ):
            await trio.sleep(delay)
        results = iter(await self._ask(pending, core, heavy))
        out: list[bytes] = []
        for plan, proto in segment:
            if type(plan) is bytes:
                out.append(plan)
                continue
            result = next(results)
            if type(result) is Granted and result.revision is not None and plan.command != VIA:
                out.append(granted_wire(result, proto))
                continue
            if plan.request.cost > HEAVY_COST:
                if out:
                    await conn.send(b"".join(out))
                    out = []
                async with self._large:  # from building the listing until it is sent
                    reply = await self._formatted(plan, result, True)
                    await self._send_reply(conn, reply, proto, plan.command)
                continue
            reply = await self._formatted(plan, result, heavy)
            if type(reply) is Listing:
                if out:
                    await conn.send(b"".join(out))
                    out = []
                await self._stream_listing(conn, reply, proto)
            else:
                out.append(encode(reply, proto))
        if out:
            await conn.send(b"".join(out))

    async def _ask(self, plans: list[Pending], core: PoolCore | None, heavy: bool) -> list[Any]:
        """One actor batch for ``plans``; a heavy one in a heavy slot."""
        if core is None or not plans:
            return []
        requests = [p.request for p in plans]
        if heavy:
            async with self._heavy:
                return await run_batch(core, requests)
        return await run_batch(core, requests)

    async def _formatted(self, plan: Pending, result: Any, heavy: bool) -> Any:
        """The reply value; a heavy one is formatted in a heavy slot, except when it reads
        the store (``complete``): that read waits outside the slot."""
        if heavy and not plan.request.completes:
            async with self._heavy:
                return await self._reply(plan, result)
        return await self._reply(plan, result)

    async def _wait(
        self,
        conn: _Connection,
        segment: list[tuple[Any, int]],
        core: PoolCore | None,
        cost: int,
    ) -> None:
        """A segment ending in an activation that may wait: run it while watching the
        connection, and give the wait up (never granted) if the client hangs up."""
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as waiting:
                nursery.start_soon(conn.watch_hangup, waiting)
                try:
                    await self._run(conn, segment, core, cost)
                finally:
                    nursery.cancel_scope.cancel()

    async def _wait_action(self, conn: _Connection, run: Callable[[], Awaitable[Any]]) -> Any:
        """An Action that may wait (``_wait``'s rule): cancelled if the client hangs up."""
        reply: Any = None
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as waiting:
                nursery.start_soon(conn.watch_hangup, waiting)
                try:
                    reply = await run()
                except TokenPoolError as error:
                    reply = error_reply(error)
                finally:
                    nursery.cancel_scope.cancel()
        return reply

    async def _reply(self, plan: Pending, result: Any) -> Any:
        """A pool request's result (or error) as its reply value."""
        if isinstance(result, BaseException):
            self.planner.errors += 1
            return error_reply(result)
        try:
            if plan.request.completes:
                result = await plan.request.complete(plan.core, result)
        except TokenPoolError as error:
            self.planner.errors += 1
            return error_reply(error)
        if plan.command == VIA:
            return await via_reply(result)
        return reply_of(result, plan.command)

    async def _transaction(self, conn: _Connection, tx: TxPlan, proto: int) -> None:
        """EXEC: every queued request in ONE actor batch (no other client's between them)."""
        pending = [p for p in tx.plans if type(p) is Pending]
        core = pending[0].core if pending else None
        results = iter(await self._ask(pending, core, tx.cost > HEAVY_COST))
        replies: list[Any] = []
        for plan in tx.plans:
            if type(plan) is Pending:
                replies.append(await self._reply(plan, next(results)))
            elif type(plan) is Action:  # a connection command that runs alone (INFO)
                replies.append(await _acted(plan))
            else:
                replies.append(plan)
        # One array reply; its listings are encoded slice by slice with checkpoints, as
        # a pipeline's are (the batch was atomic; formatting its results need not be).
        out = [b"*%d\r\n" % len(replies)]
        for reply in replies:
            if type(reply) is Listing:
                await conn.send(b"".join(out))
                out = []
                await self._stream_listing(conn, reply, proto)
            else:
                out.append(encode(reply, proto))
        await conn.send(b"".join(out))

    async def _send_reply(self, conn: _Connection, reply: Any, proto: int, command: str) -> None:
        if type(reply) is _Many:
            await conn.send(b"".join(_encode_push(f, proto) for f in reply.frames))
            return
        reply = reply_of(reply, command)
        if type(reply) is Listing:
            await self._stream_listing(conn, reply, proto)
        elif reply is not None or command in ("LEASE", "TP.LEASE"):
            if type(reply) is Error:
                self.planner.errors += 1
            await conn.send(encode(reply, proto))

    async def _stream_listing(self, conn: _Connection, listing: Listing, proto: int) -> None:
        """Encode and send a listing in slices, with a checkpoint after each."""
        items = listing.items
        head = b"*%d\r\n" % len(items)
        if listing.cursor is not None:
            head = b"*2\r\n" + encode(listing.cursor, proto) + head
        fmt = listing.format
        parts = [head]
        for start in range(0, len(items), SLICE):
            async with self._heavy:
                parts += [encode(fmt(item), proto) for item in items[start : start + SLICE]]
            await conn.send(b"".join(parts))  # outside the limiter: a reader may stall
            parts = []
        if parts:
            await conn.send(b"".join(parts))

    # -- INFO ---------------------------------------------------------------------

    async def info(self, session: Session, section: str | None) -> str:
        """Redis's INFO text: the server, and the default pool (``--name``)."""
        name = self.commands.settings.default_pool
        try:
            stats: Stats = await self.commands.execute(
                GetStats(name), session.client, admitted=True
            )
        except TokenPoolError:
            stats = Stats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        core = self.pools.core(name) if name in self.pools else None
        return self._info_text(stats, section, name, core)

    def _info_text(
        self, stats: Stats, section: str | None, name: str, core: PoolCore | None
    ) -> str:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        sections: dict[str, dict[str, object]] = {
            "server": {
                "redis_version": REDIS_COMPAT_VERSION,
                "tokenpool_version": __version__,
                "redis_mode": "standalone" if self.planner.cluster is None else "cluster",
                "process_id": os.getpid(),
                "tcp_port": self.ports[0] if self.ports else self.settings.port,
                "uptime_in_seconds": int(time.monotonic() - self.started),
            },
            "clients": {
                "connected_clients": self.clients,
                "blocked_clients": stats.waiting,
                "maxclients": self.settings.max_clients,
            },
            "memory": {"used_memory": usage.ru_maxrss * 1024, "maxmemory": 0},
            "pool": {
                "pool_name": name,
                "pools": len(self.pools.names()),
                "size": stats.size,
                "active": stats.active,
                "available": stats.available,
                "revision": stats.revision,
                **{name: getattr(stats, name) for name in COUNTERS},
                "waiting": stats.waiting,
            },
            "persistence": {
                "store": stats.store,
                "durability": stats.durability,
                "link": stats.link,
                "backlog": stats.backlog,
                "last_commit_at": ""
                if stats.last_commit_at is None
                else iso(to_us(stats.last_commit_at)),
                "write_lag_seconds": f"{stats.write_lag:.6f}",
                **_writer_fields(core),
            },
            "stats": {
                "total_connections_received": self.connections,
                "total_commands_processed": self.planner.count,
                "rejected_connections": self.rejected,
                "total_error_replies": self.planner.errors,
                "protocol_errors": self.protocol_errors,
                "auth_failures": self.commands.gate.auth_failures["resp"],
                "instantaneous_ops_per_sec": 0,
            },
            "keyspace": {
                "db0": f"keys={stats.size},expires={stats.active},avg_ttl=0",
            },
            "pauses": info_fields(self.latencies.pauses.snapshot()),
            "cluster": cluster_info(self.planner.cluster),
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


def _writer_fields(core: PoolCore | None) -> dict[str, object]:
    """The write-behind's figures for INFO persistence (none for a memory-only pool)."""
    if core is None:
        return {}
    writer = core.statistics().writer
    if writer is None:
        return {}
    histogram = ",".join(f"le{bound:g}={count}" for bound, count in writer.lag_histogram)
    return {
        "write_lag_p50_seconds": f"{writer.lag_p50:.6f}",
        "write_lag_p99_seconds": f"{writer.lag_p99:.6f}",
        "write_lag_histogram": histogram,
        "batches_written": writer.batches,
        "changes_written": writer.changes_written,
        "changes_refused_by_store": writer.rejected,
        "changes_lost": writer.lost,
        "write_stalls": writer.stalls,
        "write_stall_seconds": f"{writer.stall_seconds:.3f}",
    }


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        name = sock.getpeername()  # type: ignore[union-attr]
        if isinstance(name, str | bytes):
            return "unix"
        host, port = name[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "?"
