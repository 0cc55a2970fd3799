"""The command layer: what each command means, with no sockets (sans-IO).

``Commands.plan(argv, session)`` checks a command's arguments and returns a
plan: an immediate reply value, a ``Deferred`` (ops for one pool's actor and
how to turn their results into a reply), or an ``Action`` (async work that
must run alone at its place: a failed AUTH's delay, a pool created, a
subscription). The RESP server only moves bytes and encodes reply values;
the HTTP app reuses the formatting here (``lease_fields``, ``usage_fields``,
``token_fields``, ``error_reply``), so each value is formatted in one place.

Cost before work: every ``Deferred`` carries an estimate of its reply's size
(``cost``), so a driver can cut a pipeline into batches of bounded work and
memory before it asks the actor for anything, and large listings are
``Listing`` values, encoded slice by slice.
"""

from __future__ import annotations

import fnmatch
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from . import __version__
from ._errors import (
    CompactedError,
    InvalidArgumentError,
    NoPermError,
    TokenPoolError,
)
from ._limits import RateLimiter
from ._log import get_logger
from ._model import EndRecord, LeaseRecord, Record, Stats, Usage, iso, to_us
from ._ops import (
    Activate,
    Clear,
    GetHistory,
    GetLease,
    GetStats,
    GetToken,
    GetTokens,
    GetUserHistory,
    Op,
    Release,
    Renew,
    Revision,
    Validate,
)
from ._resp import OK, Error, Reply, Simple
from ._settings import (
    MAX_SECONDS,
    MAX_SIZE,
    MIN_TTL,
    WHEN_FULL,
    PoolSettings,
    check_name,
    parse_int,
    parse_seconds,
)
from ._state import HISTORY_LIMIT_MAX, PAGE_MAX

if TYPE_CHECKING:
    from ._pool import Pool, Pools

log = get_logger("tokenpool.commands")

REDIS_COMPAT_VERSION = "7.2.0"
ITEM_COST = 320  # estimated reply bytes per listed token or history entry
MULTI_MAX = 1024  # commands one MULTI may queue
TX_COST = 256 * 1024
"""The most estimated reply bytes one EXEC may cost: a transaction is one actor batch
and one reply, so it cannot be cut into slices as a pipeline is; listings inside it
are paged (``TOKENS CURSOR``, ``HISTORY LIMIT``)."""
SMALL_COST = 256


# -- formatting: one place for every value ----------------------------------------

_iso_cache: dict[int, str] = {}


def _iso(us: int) -> str:
    # Leases granted in one batch share their two times: format each once.
    text = _iso_cache.get(us)
    if text is None:
        if len(_iso_cache) > 4096:
            _iso_cache.clear()
        text = _iso_cache[us] = iso(us)
    return text


def lease_fields(record: LeaseRecord, token_id: str) -> dict[str, Reply]:
    """A lease record's fields, as every transport shows them."""
    return {
        "id": record.id,
        "token_id": token_id,
        "user_id": record.user_id,
        "fence": record.fence,
        "activated_at": _iso(record.activated_us),
        "expires_at": _iso(record.expires_us),
    }


def usage_fields(record: EndRecord, token_id: str) -> dict[str, Reply]:
    """An ended lease (END record) as every transport shows it."""
    return {
        "id": record.id,
        "token_id": token_id,
        "user_id": record.user_id,
        "started_at": _iso(record.activated_us),
        "ended_at": _iso(record.ended_us),
        "reason": record.reason,
        "revision": record.revision,
        "fence": record.fence,
    }


def usage_value_fields(usage: Usage) -> dict[str, Reply]:
    """A ``Usage`` (from a history page) as every transport shows it."""
    return {
        "id": usage.id,
        "token_id": usage.token_id,
        "user_id": usage.user_id,
        "started_at": iso(to_us(usage.started_at)),
        "ended_at": iso(to_us(usage.ended_at)),
        "reason": usage.reason.value,
        "revision": usage.revision,
        "fence": usage.fence,
    }


def token_fields(token_id: str, lease: LeaseRecord | None) -> dict[str, Reply]:
    """A token and its lease (or none), with ``""`` for what it does not have."""
    if lease is None:
        return {
            "id": token_id,
            "status": "available",
            "current_user_id": "",
            "activated_at": "",
            "expires_at": "",
        }
    return {
        "id": token_id,
        "status": "active",
        "current_user_id": lease.user_id,
        "activated_at": _iso(lease.activated_us),
        "expires_at": _iso(lease.expires_us),
    }


def stats_values(stats: Stats) -> dict[str, Any]:
    """A pool's counters and store state, typed (numbers stay numbers, no time is ``None``)."""
    out: dict[str, Any] = {}
    for field in attrs.fields(Stats):
        value = getattr(stats, field.name)
        if field.name == "last_commit_at" and value is not None:
            value = iso(to_us(value))
        out[field.name] = value
    return out


def settings_values(settings: PoolSettings) -> dict[str, Any]:
    """A pool's settings, typed (``max_lifetime`` is ``None`` when unlimited)."""
    return {
        "size": settings.size,
        "ttl": settings.ttl,
        "when_full": settings.when_full,
        "min_hold": settings.min_hold,
        "max_lifetime": settings.max_lifetime,
    }


def _resp_value(value: Any) -> Reply:
    # RESP2 has no null inside a map and no doubles: "" and decimal text stand in.
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return value  # type: ignore[no-any-return]


def stats_fields(stats: Stats) -> dict[str, Reply]:
    """``stats_values`` as RESP shows them."""
    return {k: _resp_value(v) for k, v in stats_values(stats).items()}


def settings_fields(settings: PoolSettings) -> dict[str, Reply]:
    """``settings_values`` as RESP shows them."""
    return {
        k: f"{v:g}" if isinstance(v, float) else ("" if v is None else v)
        for k, v in settings_values(settings).items()
    }


def error_reply(error: BaseException) -> Error:
    if isinstance(error, TokenPoolError):
        return Error(error.code, str(error))
    return Error("ERR", f"internal error: {type(error).__name__}")


class Listing:
    """A long array reply, formatted and encoded slice by slice by the driver.

    With ``cursor`` it is the pair ``[cursor, [items]]`` (as Redis's SCAN).
    """

    __slots__ = ("cursor", "format", "items")

    def __init__(
        self, items: Sequence[Any], format: Callable[[Any], Reply], cursor: str | None = None
    ) -> None:
        self.items = items
        self.format = format
        self.cursor = cursor

    def whole(self) -> Reply:
        """The reply as one value (tests, and small listings)."""
        items: list[Reply] = [self.format(i) for i in self.items]
        return items if self.cursor is None else [self.cursor, items]


# -- plans --------------------------------------------------------------------------

Format = Callable[[Any], Any]


class Deferred(NamedTuple):
    """An op for one pool's actor and how to turn its result into a reply.

    A named tuple, not attrs: one is made per pipelined command.
    """

    pool: Pool
    op: Op
    format: Format
    wire: Callable[[Any, int, Pool], bytes] | None = None  # a hand-made encoder for hot replies
    revised: bool = False  # the batch gets a Revision() right after; format gets (result, rev)
    finish: Callable[[Any], Awaitable[Any]] | None = None  # completes the reply after the batch
    cost: int = SMALL_COST
    waits: bool = False  # may wait for a token: the batch ends with it


class Action(NamedTuple):
    """Work that runs alone, at its place in the pipeline (the batch before it goes first)."""

    run: Callable[[], Awaitable[Any]]


Plan = Any  # Reply | Deferred | Action


_REVISION = Revision()


async def run_batch(plans: Sequence[Plan], pool: Pool | None) -> list[Any]:
    """Every Deferred's op (and its Revision) in one actor batch; a result per plan
    (``(result, revision)`` for revised ones; ``None`` for plans that are not Deferred)."""
    ops: list[Op] = []
    for plan in plans:
        if type(plan) is Deferred:
            ops.append(plan.op)
            if plan.revised:
                ops.append(_REVISION)
    raw = await pool.raw_batch(ops) if ops and pool is not None else []
    out: list[Any] = []
    i = 0
    for plan in plans:
        if type(plan) is not Deferred:
            out.append(None)
            continue
        result = raw[i]
        i += 1
        if plan.revised:
            if not isinstance(result, BaseException):
                result = (result, raw[i])
            i += 1
        out.append(result)
    return out


async def execute(plan: Plan) -> Any:
    """One plan, alone: its reply value (an ``Error`` for a refusal; a ``Listing`` whole).

    The HTTP app's way in; the RESP server batches a pipeline's plans instead.
    """
    kind = type(plan)
    try:
        if kind is Deferred:
            (result,) = await run_batch([plan], plan.pool)
            if isinstance(result, BaseException):
                raise result
            reply = plan.format(result)
            if plan.finish is not None:
                reply = await plan.finish(reply)
            return reply
        if kind is Action:
            return await plan.run()
    except TokenPoolError as error:
        return error_reply(error)
    return plan


# -- sessions and authentication ------------------------------------------------------


class Session:
    """One connection's state."""

    __slots__ = (
        "authed",
        "channels",
        "client_id",
        "executing",
        "failed_auth",
        "multi",
        "multi_failed",
        "name",
        "patterns",
        "peer",
        "pool",
        "proto",
        "quit",
        "retry_after",
        "user",
    )

    def __init__(self, client_id: int, peer: str, authed: bool) -> None:
        self.client_id = client_id
        self.peer = peer
        self.authed = authed
        self.user = "default" if authed else ""
        self.proto = 2
        self.name = ""
        self.quit = False
        self.pool = "default"
        self.failed_auth = False
        self.retry_after = 0.0  # set by a refusal of the rate limiter (HTTP's Retry-After)
        self.multi: list[list[str]] | None = None
        self.multi_failed = False
        self.executing = False  # planning the commands of an EXEC
        self.channels: dict[str, Any] = {}
        self.patterns: dict[str, Any] = {}

    @property
    def subscribed(self) -> bool:
        return bool(self.channels or self.patterns)

    @property
    def host(self) -> str:
        return self.peer.rsplit(":", 1)[0]


class AuthGuard:
    """Failed password attempts: each one is slowed, and each client address has a budget.

    A token bucket per address (``rate`` attempts a second, ``burst`` at once):
    past it, attempts from that address are refused without being checked, so
    many connections from one address guess no faster than one. The table of
    addresses is bounded (least recently failed forgotten first).
    """

    def __init__(self, delay: float, rate: float, burst: int, addresses: int = 10_000) -> None:
        self.delay = delay
        self.rate = rate
        self.burst = burst
        self.addresses = addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.failures = 0

    def allowed(self, host: str) -> bool:
        """Whether an attempt from ``host`` may be checked now (it costs nothing to ask)."""
        tokens, stamp = self._buckets.get(host, (float(self.burst), 0.0))
        now = time.monotonic()
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        return tokens >= 1.0

    def failed(self, host: str) -> None:
        self.failures += 1
        tokens, stamp = self._buckets.pop(host, (float(self.burst), 0.0))
        now = time.monotonic()
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate) - 1.0
        self._buckets[host] = (max(tokens, 0.0), now)
        while len(self._buckets) > self.addresses:
            self._buckets.popitem(last=False)


@attrs.frozen
class ServerSettings:
    """What the command layer needs to know of the server's settings."""

    password: str | None = None
    admin_password: str | None = None
    auth_delay: float = 0.1
    auth_rate: float = 10.0
    auth_burst: int = 20
    rate_limit: float = 0.0  # commands a second per client address; 0: no limit
    rate_burst: int = 0  # commands at once per client address; 0: one second's worth
    user_rate_limit: float = 0.0  # activations a second per user id; 0: no limit
    user_rate_burst: int = 0
    default_pool: str = "default"  # the pool of a new connection (the flags' --name)


# -- the command table ----------------------------------------------------------------

Handler = Callable[["Commands", Session, list[str]], Plan]
COMMANDS: dict[str, tuple[int, int, Handler]] = {}
SUBSCRIBED_OK = {"SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "PING", "QUIT", "RESET"}
NO_AUTH_OK = {"AUTH", "HELLO", "QUIT", "RESET"}  # as Redis: even PING needs AUTH
NOT_IN_MULTI = {"POOL", "SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "AUTH", "HELLO"}


def command(name: str, low: int, high: int) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (low, high, fn)
        return fn

    return register


class Commands:
    """Plans commands against a set of pools. Counts what INFO reports."""

    def __init__(
        self,
        pools: Pools,
        settings: ServerSettings,
        *,
        config: dict[str, str] | None = None,
        info: Callable[[Stats, str | None, Pool], str] | None = None,
        subscriber: Any = None,
    ) -> None:
        self.pools = pools
        self.settings = settings
        self.config = config or {}
        self.info = info
        self.subscriber = subscriber  # the driver's pub/sub side (subscribe/unsubscribe)
        self.auth = AuthGuard(settings.auth_delay, settings.auth_rate, settings.auth_burst)
        self.client_limit = _limiter(settings.rate_limit, settings.rate_burst)
        self.user_limit = _limiter(settings.user_rate_limit, settings.user_rate_burst)
        self.limited = self.client_limit is not None or self.user_limit is not None
        self.lease_formats: dict[Pool, Format] = {}  # one reply formatter per pool, reused
        self.commands = 0
        self.errors = 0

    def plan(self, argv: list[str], session: Session) -> Plan:
        self.commands += 1
        name = argv[0].upper()
        spec = COMMANDS.get(name)
        queueing = session.multi is not None and not session.executing
        if spec is None:
            shown = " ".join(f"'{a[:40]}'" for a in argv[1:4])
            session.multi_failed = queueing
            return Error(
                "ERR", f"unknown command '{argv[0][:40]}', with args beginning with: {shown}"
            )
        low, high, handler = spec
        if not low <= len(argv) - 1 <= high:
            session.multi_failed = queueing
            return Error("ERR", f"wrong number of arguments for '{argv[0].lower()[:40]}' command")
        if not session.authed and name not in NO_AUTH_OK:
            return Error("NOAUTH", "Authentication required.")
        if self.limited and name not in NO_AUTH_OK and not session.executing:
            refused = self._rate_limited(name, argv, session)
            if refused is not None:
                return refused
        if queueing and name not in ("EXEC", "DISCARD", "MULTI", "QUIT"):
            if name in NOT_IN_MULTI:
                session.multi_failed = True
                return Error("ERR", f"{name} is not allowed inside MULTI")
            assert session.multi is not None
            if len(session.multi) >= MULTI_MAX:
                session.multi_failed = True
                return Error("ERR", f"a transaction may queue at most {MULTI_MAX} commands")
            session.multi.append(argv)
            return Simple("QUEUED")
        if (
            (session.channels or session.patterns)
            and session.proto == 2
            and name not in SUBSCRIBED_OK
        ):
            return Error(
                "ERR",
                f"Can't execute '{argv[0].lower()[:40]}': only (P|S)SUBSCRIBE /"
                " (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
            )
        try:
            return handler(self, session, argv[1:])
        except TokenPoolError as error:  # a bad argument, an unknown pool
            return error_reply(error)

    def sibling(self) -> Commands:
        """The command layer for another transport: its own counters, the same pools,
        password guard and rate limits (a client address has one budget, whatever it
        speaks)."""
        other = Commands(self.pools, self.settings, config=self.config, info=self.info)
        other.auth = self.auth
        other.client_limit = self.client_limit
        other.user_limit = self.user_limit
        return other

    def _rate_limited(self, name: str, argv: list[str], session: Session) -> Error | None:
        wait = 0.0
        what = ""
        if self.client_limit is not None:
            wait = self.client_limit.take(session.host)
            what = f"{self.client_limit.rate:g} commands a second from one client address"
        if not wait and self.user_limit is not None and name == "ACTIVATE" and len(argv) > 1:
            wait = self.user_limit.take(argv[1])
            what = f"{self.user_limit.rate:g} activations a second for one user"
        if not wait:
            return None
        session.retry_after = wait
        self.errors += 1
        return Error("BUSY", f"rate limit of {what} reached; retry in {wait:.3f} s")

    def pool(self, session: Session) -> Pool:
        return self.pools.get(session.pool)

    def admin(self, session: Session) -> None:
        """Raise ``NoPermError`` unless the session may reshape pools."""
        if self.settings.admin_password is not None and session.user != "admin":
            raise NoPermError(
                "this command needs the admin user: AUTH admin <password> (--admin-password)"
            )

    def check_password(self, session: Session, user: str, password: str) -> Plan:
        s = self.settings
        if s.password is None and s.admin_password is None:
            return Error(
                "ERR",
                "AUTH <password> called without any password configured for the default"
                " user. Are you sure your configuration is correct?",
            )
        host = session.host
        ok = False
        if self.auth.allowed(host):
            if user == "admin" and s.admin_password is not None:
                ok = hmac.compare_digest(password.encode(), s.admin_password.encode())
            elif user == "default" and s.password is not None:
                ok = hmac.compare_digest(password.encode(), s.password.encode())
        if ok:
            session.authed = True
            session.user = user
            return OK
        self.auth.failed(host)
        session.failed_auth = True
        log.warning("auth_failed", client=session.client_id, peer=session.peer, user=user[:64])
        wrong = Error("WRONGPASS", "invalid username-password pair or user is disabled.")

        async def slowly() -> Reply:
            import trio

            await trio.sleep(self.auth.delay)  # every failed attempt, not once per pipeline
            return wrong

        return Action(slowly)


def _limiter(rate: float, burst: int) -> RateLimiter | None:
    if rate <= 0:
        return None
    return RateLimiter(rate, burst or max(1, math.ceil(rate)))


def _revised(format: Callable[[Any, Any], Reply]) -> Callable[[Any], Reply]:
    return lambda pair: format(*pair)


# -- leases -------------------------------------------------------------------------------

_LEASE_WIRE = (
    b"%b$2\r\nid\r\n$36\r\n%b\r\n$8\r\ntoken_id\r\n$36\r\n%b\r\n$7\r\nuser_id\r\n$%d\r\n%b\r\n"
    b"$5\r\nfence\r\n:%d\r\n$12\r\nactivated_at\r\n$%d\r\n%b\r\n$10\r\nexpires_at\r\n$%d\r\n%b\r\n"
    b"$8\r\nrevision\r\n:%d\r\n"
)
_iso_bytes: dict[int, bytes] = {}


def _iso_b(us: int) -> bytes:
    cached = _iso_bytes.get(us)
    if cached is None:
        if len(_iso_bytes) > 4096:
            _iso_bytes.clear()
        cached = _iso_bytes[us] = iso(us).encode()
    return cached


def lease_wire(pair: tuple[LeaseRecord, int], proto: int, pool: Pool) -> bytes:
    """``encode(revised lease reply)``, about five times faster: ACTIVATE's reply."""
    lease, revision = pair
    user = lease.user_id.encode()
    start = _iso_b(lease.activated_us)
    end = _iso_b(lease.expires_us)
    return _LEASE_WIRE % (
        b"%7\r\n" if proto == 3 else b"*14\r\n",
        lease.id.encode(),
        pool.token_text(lease.slot).encode(),
        len(user),
        user,
        lease.fence,
        len(start),
        start,
        len(end),
        end,
        revision,
    )


def _lease_format(pool: Pool) -> Format:
    def fmt(pair: tuple[LeaseRecord, int]) -> Reply:
        lease, revision = pair
        return {**lease_fields(lease, pool.token_text(lease.slot)), "revision": revision}

    return fmt


def _parse_wait(args: list[str]) -> float | None:
    if not args:
        return None
    if len(args) != 2 or args[0].upper() != "WAIT":
        raise InvalidArgumentError("syntax: ACTIVATE <user_id> [WAIT <seconds>]")
    return parse_seconds(args[1], "wait", 0.0, MAX_SECONDS)


@command("ACTIVATE", 1, 3)
def _activate(c: Commands, session: Session, args: list[str]) -> Plan:
    pool = c.pools.get(session.pool)
    fmt = c.lease_formats.get(pool)
    if fmt is None:
        fmt = c.lease_formats[pool] = _lease_format(pool)
    if len(args) == 1:  # the hot path: positional, no keyword defaults
        return Deferred(pool, Activate(args[0]), fmt, lease_wire, True, None, SMALL_COST, False)
    wait = _parse_wait(args[1:])
    if session.executing or wait == 0:
        wait = None
    return Deferred(
        pool, Activate(args[0], wait), fmt, lease_wire, True, None, SMALL_COST, bool(wait)
    )


@command("RENEW", 2, 2)
def _renew(c: Commands, session: Session, args: list[str]) -> Plan:
    pool = c.pool(session)
    return Deferred(pool, Renew(args[0], args[1]), _lease_format(pool), lease_wire, revised=True)


@command("VALIDATE", 2, 2)
def _validate(c: Commands, session: Session, args: list[str]) -> Plan:
    return Deferred(c.pool(session), Validate(args[0], args[1]), lambda ok: 1 if ok else 0)


@command("RELEASE", 1, 2)
def _release(c: Commands, session: Session, args: list[str]) -> Plan:
    user = args[1] if len(args) > 1 else None
    return Deferred(c.pool(session), Release(args[0], user), lambda pair: pair[1], revised=True)


@command("LEASE", 1, 1)
def _lease(c: Commands, session: Session, args: list[str]) -> Plan:
    pool = c.pool(session)

    def fmt(record: LeaseRecord | None) -> Reply:
        return None if record is None else lease_fields(record, pool.token_text(record.slot))

    return Deferred(pool, GetLease(args[0]), fmt)


@command("CLEAR", 0, 0)
def _clear(c: Commands, session: Session, args: list[str]) -> Plan:
    c.admin(session)
    return Deferred(
        c.pool(session),
        Clear(),
        lambda pair: {"cleared": pair[0], "revision": pair[1]},
        revised=True,
    )


# -- tokens -------------------------------------------------------------------------------


@command("TOKEN", 1, 1)
def _token(c: Commands, session: Session, args: list[str]) -> Plan:
    pool = c.pool(session)
    return Deferred(pool, GetToken(args[0]), lambda r: token_fields(pool.token_text(r[0]), r[1]))


def _token_listing(pool: Pool) -> Callable[[tuple[int, LeaseRecord | None]], Reply]:
    names = pool.token_text
    return lambda pair: token_fields(names(pair[0]), pair[1])


def _cursor_args(args: list[str], options: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    rest = list(args)
    while rest:
        key = rest[0].upper()
        if key not in options or len(rest) < 2:
            raise InvalidArgumentError(
                f"syntax error at {rest[0][:20]!r}; options: {', '.join(options)}"
            )
        out[key] = rest[1]
        rest = rest[2:]
    return out


@command("TOKENS", 0, 4)
def _tokens(c: Commands, session: Session, args: list[str]) -> Plan:
    """``TOKENS``: every token (pools of up to 10,000); ``TOKENS CURSOR c [COUNT n]``: a page."""
    from ._pool import TOKENS_MAX

    pool = c.pool(session)
    fmt = _token_listing(pool)
    if not args:
        size = pool.settings.size
        if size > TOKENS_MAX:
            raise InvalidArgumentError(
                f"the pool has {size:,} tokens; TOKENS lists at most {TOKENS_MAX:,}:"
                " page with TOKENS CURSOR 0 [COUNT n] (or SCAN)"
            )
        return Deferred(
            pool, GetTokens(0, TOKENS_MAX), lambda r: Listing(r[1], fmt), cost=ITEM_COST * size
        )
    opts = _cursor_args(args, ("CURSOR", "COUNT"))
    if "CURSOR" not in opts:
        raise InvalidArgumentError("syntax: TOKENS [CURSOR <cursor> [COUNT <n>]]")
    cursor = parse_int(opts["CURSOR"], "cursor", 0, 2**32)
    count = parse_int(opts.get("COUNT", "100"), "count", 1, PAGE_MAX)
    return Deferred(
        pool,
        GetTokens(cursor, count),
        lambda r: Listing(r[1], fmt, str(r[0])),
        cost=ITEM_COST * count,
    )


@command("SCAN", 1, 5)
def _scan(c: Commands, session: Session, args: list[str]) -> Plan:
    """As Redis's SCAN over the pool's token ids: ``redis-cli --scan`` lists the tokens."""
    pool = c.pool(session)
    cursor = parse_int(args[0], "cursor", 0, 2**32)
    opts = _cursor_args(args[1:], ("COUNT", "MATCH", "TYPE"))
    count = parse_int(opts.get("COUNT", "10"), "count", 1, PAGE_MAX)
    pattern = opts.get("MATCH")
    names = pool.token_text

    def fmt(result: tuple[int, list[tuple[int, Record | None]]]) -> Reply:
        ids: list[Reply] = [names(slot) for slot, _ in result[1]]
        if pattern is not None:
            ids = [i for i in ids if fnmatch.fnmatchcase(str(i), pattern)]
        return [str(result[0]), ids]

    return Deferred(pool, GetTokens(cursor, count), fmt, cost=64 * count)


@command("DBSIZE", 0, 0)
def _dbsize(c: Commands, session: Session, args: list[str]) -> Plan:
    return Deferred(c.pool(session), GetStats(), lambda stats: stats.size)


# -- history ------------------------------------------------------------------------------


def _history_args(args: list[str], usage: str) -> tuple[int, int | None]:
    opts: dict[str, str] = {}
    rest = list(args)
    while rest:
        key = rest[0].upper()
        if key not in ("LIMIT", "BEFORE") or len(rest) < 2 or key in opts:
            raise InvalidArgumentError(f"syntax: {usage}")
        opts[key] = rest[1]
        rest = rest[2:]
    limit = parse_int(opts.get("LIMIT", "100"), "limit", 1, HISTORY_LIMIT_MAX)
    before = parse_int(opts["BEFORE"], "before", 1, 2**63 - 1) if "BEFORE" in opts else None
    return limit, before


def _page_listing(page: Any) -> Listing:
    cursor = "0" if page.next_before is None else str(page.next_before)
    return Listing(page, usage_value_fields, cursor)


def _history_plan(c: Commands, session: Session, args: list[str], by_user: bool) -> Plan:
    pool = c.pool(session)
    key = args[0]
    name = "USERHISTORY <user_id>" if by_user else "HISTORY <token_id>"
    limit, before = _history_args(args[1:], f"{name} [LIMIT <n>] [BEFORE <cursor>]")
    op: Op = GetUserHistory(key, limit, before) if by_user else GetHistory(key, limit, before)

    async def finish(result: Any) -> Any:
        if by_user:
            return _page_listing(await pool.finish_history(result, None, key, limit))
        return _page_listing(await pool.finish_history(result, key, None, limit))

    return Deferred(pool, op, lambda r: r, finish=finish, cost=ITEM_COST * limit)


@command("HISTORY", 1, 5)
def _history(c: Commands, session: Session, args: list[str]) -> Plan:
    return _history_plan(c, session, args, by_user=False)


@command("USERHISTORY", 1, 5)
def _user_history(c: Commands, session: Session, args: list[str]) -> Plan:
    return _history_plan(c, session, args, by_user=True)


# -- pool state -----------------------------------------------------------------------------


@command("STATS", 0, 0)
def _stats(c: Commands, session: Session, args: list[str]) -> Plan:
    pool = c.pool(session)
    return Deferred(pool, GetStats(), lambda stats: stats_fields(pool.with_store(stats)))


@command("INFO", 0, 1)
def _info(c: Commands, session: Session, args: list[str]) -> Plan:
    pool = c.pool(session)
    section = args[0] if args else None
    assert c.info is not None
    info = c.info
    return Deferred(pool, GetStats(), lambda stats: info(pool.with_store(stats), section, pool))


# -- pools ------------------------------------------------------------------------------------

_POOL_OPTIONS = {"SIZE", "TTL", "WHEN-FULL", "MIN-HOLD", "MAX-LIFETIME"}


def _pool_options(args: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    rest = list(args)
    while rest:
        key = rest[0].upper()
        if key not in _POOL_OPTIONS or len(rest) < 2:
            raise InvalidArgumentError(
                f"unknown option {rest[0][:20]!r} (or no value): SIZE, TTL, WHEN-FULL, MIN-HOLD,"
                " MAX-LIFETIME"
            )
        if key.replace("-", "_").lower() in out:
            raise InvalidArgumentError(f"{key} given twice")
        value = rest[1]
        if key == "SIZE":
            out["size"] = parse_int(value, "size", 1, MAX_SIZE)
        elif key == "TTL":
            out["ttl"] = parse_seconds(value, "ttl", MIN_TTL, MAX_SECONDS)
        elif key == "WHEN-FULL":
            if value.lower() not in WHEN_FULL:
                raise InvalidArgumentError(
                    f"WHEN-FULL must be evict, reject or wait; not {value[:20]!r}"
                )
            out["when_full"] = value.lower()
        elif key == "MIN-HOLD":
            out["min_hold"] = parse_seconds(value, "min-hold", 0.0, MAX_SECONDS)
        else:
            seconds = parse_seconds(value, "max-lifetime", 0.0, MAX_SECONDS)
            out["max_lifetime"] = None if seconds == 0 else seconds
        rest = rest[2:]
    return out


@command("POOL", 1, 12)
def _pool(c: Commands, session: Session, args: list[str]) -> Plan:
    sub = args[0].upper()
    rest = args[1:]
    pools = c.pools
    if sub == "LIST" and not rest:
        return list(pools.names())
    if sub == "USE" and len(rest) == 1:
        pools.get(rest[0])
        session.pool = rest[0]
        return OK
    if sub == "INFO" and len(rest) == 1:
        pool = pools.get(rest[0])

        def fmt(stats: Stats) -> Reply:
            return {
                "name": pool.name,
                **settings_fields(pool.settings),
                **stats_fields(pool.with_store(stats)),
            }

        return Deferred(pool, GetStats(), fmt)
    if sub == "CREATE" and rest:
        c.admin(session)
        name = check_name(rest[0])
        options = _pool_options(rest[1:])
        if "size" not in options or "ttl" not in options:
            raise InvalidArgumentError(
                "syntax: POOL CREATE <name> SIZE <n> TTL <seconds> [WHEN-FULL evict|reject|wait]"
                " [MIN-HOLD <seconds>] [MAX-LIFETIME <seconds>]"
            )
        settings = PoolSettings.make(**options)

        async def create() -> Reply:
            await pools.create(name, settings)
            return OK

        return Action(create)
    if sub == "ALTER" and rest:
        c.admin(session)
        name = rest[0]
        pools.get(name)
        options = _pool_options(rest[1:])

        async def alter() -> Reply:
            await pools.alter(name, **options)
            return OK

        return Action(alter)
    if sub == "DROP" and len(rest) == 1:
        c.admin(session)
        name = rest[0]
        pools.get(name)

        async def drop() -> Reply:
            await pools.drop(name)
            return OK

        return Action(drop)
    return Error(
        "ERR",
        f"unknown subcommand or wrong number of arguments for 'POOL|{args[0][:20]}';"
        " try CREATE, ALTER, USE, LIST, INFO, DROP",
    )


# -- transactions -----------------------------------------------------------------------------


@command("MULTI", 0, 0)
def _multi(c: Commands, session: Session, args: list[str]) -> Plan:
    if session.multi is not None:
        return Error("ERR", "MULTI calls can not be nested")
    session.multi = []
    session.multi_failed = False
    return OK


@command("DISCARD", 0, 0)
def _discard(c: Commands, session: Session, args: list[str]) -> Plan:
    if session.multi is None:
        return Error("ERR", "DISCARD without MULTI")
    session.multi = None
    return OK


class Transaction(NamedTuple):
    """``EXEC``: the queued commands' plans, run as ONE actor batch; one array reply."""

    plans: list[Plan]
    cost: int  # estimated reply bytes, at most TX_COST


@command("EXEC", 0, 0)
def _exec(c: Commands, session: Session, args: list[str]) -> Plan:
    queued = session.multi
    if queued is None:
        return Error("ERR", "EXEC without MULTI")
    failed = session.multi_failed
    session.multi = None
    session.multi_failed = False
    if failed:
        return Error("EXECABORT", "Transaction discarded because of previous errors.")
    # Planned now, at EXEC's place; a WAIT does not wait (as Redis's blocking
    # commands do not block inside MULTI).
    session.executing = True
    try:
        plans = [c.plan(argv, session) for argv in queued]
    finally:
        session.executing = False
    pools = {p.pool.name for p in plans if isinstance(p, Deferred)}
    if len(pools) > 1:  # pragma: no cover - POOL USE is refused inside MULTI
        return Error("ERR", "a transaction must use one pool")
    cost = sum(p.cost for p in plans if isinstance(p, Deferred))
    if cost > TX_COST:  # checked before any work: nothing was applied
        return Error(
            "EXECABORT",
            f"Transaction discarded: its replies would take about {cost:,} bytes, at most"
            f" {TX_COST:,} in one EXEC; page listings (TOKENS CURSOR 0 COUNT n, HISTORY"
            " LIMIT n) or send them outside MULTI",
        )
    return Transaction(plans, cost)


# -- pub/sub ----------------------------------------------------------------------------------


def _channel_pool(channel: str) -> tuple[str, int | None]:
    """``events:<pool>`` or ``events:<pool>@<revision>`` (resume after that revision)."""
    if not channel.startswith("events:"):
        raise InvalidArgumentError(f"channels are events:<pool>[@<revision>], not {channel[:40]!r}")
    rest = channel[len("events:") :]
    since = None
    if "@" in rest:
        rest, _, revision = rest.partition("@")
        since = parse_int(revision, "revision", 0, 2**63 - 1)
    return check_name(rest), since


@command("SUBSCRIBE", 1, 32)
def _subscribe(c: Commands, session: Session, args: list[str]) -> Plan:
    for channel in args:
        _channel_pool(channel)

    async def run() -> Any:
        return await c.subscriber.subscribe(session, args, pattern=False)

    return Action(run)


@command("PSUBSCRIBE", 1, 32)
def _psubscribe(c: Commands, session: Session, args: list[str]) -> Plan:
    async def run() -> Any:
        return await c.subscriber.subscribe(session, args, pattern=True)

    return Action(run)


@command("UNSUBSCRIBE", 0, 32)
def _unsubscribe(c: Commands, session: Session, args: list[str]) -> Plan:
    async def run() -> Any:
        return await c.subscriber.unsubscribe(session, args, pattern=False)

    return Action(run)


@command("PUNSUBSCRIBE", 0, 32)
def _punsubscribe(c: Commands, session: Session, args: list[str]) -> Plan:
    async def run() -> Any:
        return await c.subscriber.unsubscribe(session, args, pattern=True)

    return Action(run)


# -- connection -----------------------------------------------------------------------------


@command("PING", 0, 1)
def _ping(c: Commands, session: Session, args: list[str]) -> Plan:
    if session.subscribed and session.proto == 2:
        return ["pong", args[0] if args else ""]
    return args[0] if args else Simple("PONG")


@command("ECHO", 1, 1)
def _echo(c: Commands, session: Session, args: list[str]) -> Plan:
    return args[0]


@command("AUTH", 1, 2)
def _auth(c: Commands, session: Session, args: list[str]) -> Plan:
    user, password = (args[0], args[1]) if len(args) == 2 else ("default", args[0])
    return c.check_password(session, user, password)


@command("HELLO", 0, 6)
def _hello(c: Commands, session: Session, args: list[str]) -> Plan:
    proto = session.proto
    if args:
        if args[0] not in ("2", "3"):
            return Error("NOPROTO", "unsupported protocol version")
        proto = int(args[0])
    rest = args[1:]
    while rest:
        option = rest[0].upper()
        if option == "AUTH" and len(rest) >= 3:
            result = c.check_password(session, rest[1], rest[2])
            if not (isinstance(result, Simple) and result.text == "OK"):
                return result
            rest = rest[3:]
        elif option == "SETNAME" and len(rest) >= 2:
            session.name = rest[1][:128]
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
        "id": session.client_id,
        "mode": "standalone",
        "role": "master",
        "modules": [],
    }


@command("QUIT", 0, 0)
def _quit(c: Commands, session: Session, args: list[str]) -> Plan:
    session.quit = True
    return OK


@command("RESET", 0, 0)
def _reset(c: Commands, session: Session, args: list[str]) -> Plan:
    session.multi = None
    session.proto = 2
    session.pool = c.settings.default_pool
    session.name = ""
    # Back to how a new connection starts: not admin, and unauthenticated if a
    # password is needed to lease.
    session.authed = c.settings.password is None
    session.user = "default" if session.authed and c.settings.admin_password is None else ""

    async def run() -> Reply:
        if session.subscribed:
            await c.subscriber.unsubscribe(session, [], pattern=False, quiet=True)
            await c.subscriber.unsubscribe(session, [], pattern=True, quiet=True)
        return Simple("RESET")

    return Action(run)


@command("SELECT", 1, 1)
def _select(c: Commands, session: Session, args: list[str]) -> Plan:
    return OK if args[0] == "0" else Error("ERR", "DB index is out of range")


@command("CLIENT", 1, 8)
def _client(c: Commands, session: Session, args: list[str]) -> Plan:
    sub = args[0].upper()
    if sub == "SETNAME" and len(args) == 2:
        session.name = args[1][:128]
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


@command("COMMAND", 0, 8)
def _command(c: Commands, session: Session, args: list[str]) -> Plan:
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
def _config(c: Commands, session: Session, args: list[str]) -> Plan:
    sub = args[0].upper()
    if sub == "GET" and len(args) == 2:
        pattern = args[1].lower()
        return {k: v for k, v in c.config.items() if fnmatch.fnmatchcase(k, pattern)}
    if sub == "SET":
        return Error(
            "ERR", "CONFIG SET is not supported: restart tokenpool serve with new settings"
        )
    if sub == "RESETSTAT":
        return OK
    return Error(
        "ERR", f"unknown subcommand or wrong number of arguments for 'CONFIG|{args[0][:20]}'"
    )


def compacted_message(error: CompactedError) -> dict[str, Any]:
    return {"kind": "compacted", "oldest": error.oldest, "message": str(error)}


def version() -> str:
    return __version__
