"""RESP arguments to typed requests: the RESP driver's command table.

Every command that reads or changes a pool has two forms, built from one spec:

- ``TP.<NAME> <pool> ...``: the pool is the command's key, at a fixed place (the
  first argument), as Redis modules do. ``COMMAND``/``COMMAND INFO``/``COMMAND
  DOCS`` say so, so a cluster-aware client can route by it, and a retried or
  redirected command means the same thing on any connection. Programs use this.
- ``<NAME> ...``: the same command on the server's default pool (``--name``),
  whatever connection it arrives on (there is no per-connection pool any more),
  for people at a redis-cli prompt.

A spec's ``build`` takes the pool and the arguments after it and returns a
request, or raises ``InvalidArgumentError`` saying in words what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

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
    Request,
    Scan,
    Token,
    Tokens,
    UserHistory,
    Validate,
)
from .._commands._base import bare
from .._commands.analytics import MAX_OFFSET, Report, Series, parse_unix_seconds
from .._errors import InvalidArgumentError
from .._settings import (
    BEFORE,
    CURSOR,
    HISTORY_LIMIT,
    MIN_HOLD,
    PAGE_COUNT,
    SIZE,
    TTL,
    WAIT,
    WHEN_FULL,
    PoolSettings,
    check_max_lifetime,
    check_name,
)
from .._store.analytics import LIMIT_MAX

PREFIX = "TP."


@attrs.frozen
class Arg:
    """One argument as ``COMMAND DOCS`` describes it."""

    name: str
    type: str = "string"
    token: str | None = None
    optional: bool = False


@attrs.frozen
class Spec:
    """A pool command: its name, its arguments after the pool (``low``..``high``), how
    they become a request, and what ``COMMAND DOCS`` says of it."""

    name: str
    low: int
    high: int
    build: Callable[[str, list[str]], Request]
    summary: str
    args: tuple[Arg, ...] = ()
    write: bool = False
    pooled: bool = True  # False: POOL's subcommands name their pool themselves
    complexity: str = "O(1) or O(log N); listings O(their length)"
    slow: bool = False  # may take long (a store query): COMMAND does not flag it fast


def _options(args: list[str], allowed: tuple[str, ...], usage: str) -> dict[str, str]:
    out: dict[str, str] = {}
    rest = list(args)
    while rest:
        key = rest[0].upper()
        if key not in allowed or len(rest) < 2 or key in out:
            raise InvalidArgumentError(f"syntax error at {rest[0][:20]!r}: {usage}")
        out[key] = rest[1]
        rest = rest[2:]
    return out


def _activate(pool: str, args: list[str]) -> Request:
    if len(args) == 1:  # the hot path: Activate(pool, args[0]) without its __init__ frame
        request = bare(Activate)
        request.pool = pool
        request.user_id = args[0]
        request.wait = None
        request.waits = False
        return request
    opts = _options(args[1:], ("WAIT",), "ACTIVATE <user_id> [WAIT <seconds>]")
    return Activate(pool, args[0], WAIT.parse(opts["WAIT"]))


def _history(pool: str, args: list[str], by_user: bool) -> Request:
    usage = f"{'USERHISTORY <user_id>' if by_user else 'HISTORY <token_id>'} [LIMIT n] [BEFORE c]"
    opts = _options(args[1:], ("LIMIT", "BEFORE"), usage)
    limit = HISTORY_LIMIT.parse(opts.get("LIMIT", "100"))
    before = BEFORE.parse(opts["BEFORE"]) if "BEFORE" in opts else None
    if by_user:
        return UserHistory(pool, args[0], limit, before)
    return History(pool, args[0], limit, before)


def _tokens(pool: str, args: list[str]) -> Request:
    if not args:
        return Tokens(pool)
    opts = _options(args, ("CURSOR", "COUNT"), "TOKENS [CURSOR <cursor> [COUNT <n>]]")
    if "CURSOR" not in opts:
        raise InvalidArgumentError("syntax: TOKENS [CURSOR <cursor> [COUNT <n>]]")
    return Tokens(pool, CURSOR.parse(opts["CURSOR"]), PAGE_COUNT.parse(opts.get("COUNT", "100")))


def _scan(pool: str, args: list[str]) -> Request:
    opts = _options(args[1:], ("COUNT", "MATCH", "TYPE"), "SCAN <cursor> [COUNT n] [MATCH p]")
    count = PAGE_COUNT.parse(opts.get("COUNT", "10"))
    return Scan(pool, CURSOR.parse(args[0]), count, opts.get("MATCH"))


_REPORT_USAGE = (
    "REPORT <summary|users|tokens|hours> [SINCE <unix s>] [UNTIL <unix s>] [LIMIT n]"
    " [CURSOR c] [SORT order]"
)


def _report(pool: str, args: list[str]) -> Request:
    opts = _options(args[1:], ("SINCE", "UNTIL", "LIMIT", "CURSOR", "SORT"), _REPORT_USAGE)
    since = parse_unix_seconds(opts["SINCE"], "SINCE") if "SINCE" in opts else None
    until = parse_unix_seconds(opts["UNTIL"], "UNTIL") if "UNTIL" in opts else None
    numbers = {}
    for key, default, low, high in (("LIMIT", 100, 1, LIMIT_MAX), ("CURSOR", 0, 0, MAX_OFFSET)):
        raw = opts.get(key, str(default))
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and low <= int(raw) <= high):
            shown = raw if len(raw) <= 20 else raw[:20] + "..."
            raise InvalidArgumentError(
                f"{key} must be a whole number from {low} to {high:,}, not {shown!r}"
            )
        numbers[key] = int(raw)
    return Report(
        pool, args[0].lower(), since, until, numbers["LIMIT"], numbers["CURSOR"], opts.get("SORT")
    )


def _series(pool: str, args: list[str]) -> Request:
    return Series(pool, args[0].lower() if args else "hour")


POOL_OPTIONS = ("SIZE", "TTL", "WHEN-FULL", "MIN-HOLD", "MAX-LIFETIME")


def pool_settings(args: list[str]) -> dict[str, Any]:
    """``SIZE n TTL s WHEN-FULL p MIN-HOLD s MAX-LIFETIME s`` (any of them) as settings."""
    opts = _options(args, POOL_OPTIONS, "options: " + ", ".join(POOL_OPTIONS))
    out: dict[str, Any] = {}
    for key, value in opts.items():
        if key == "SIZE":
            out["size"] = SIZE.parse(value)
        elif key == "TTL":
            out["ttl"] = TTL.parse(value)
        elif key == "WHEN-FULL":
            if value.lower() not in WHEN_FULL:
                raise InvalidArgumentError(
                    f"WHEN-FULL must be one of {', '.join(WHEN_FULL)}; not {value[:20]!r}"
                )
            out["when_full"] = value.lower()
        elif key == "MIN-HOLD":
            out["min_hold"] = MIN_HOLD.parse(value)
        else:  # 0 removes the cap
            out["max_lifetime"] = check_max_lifetime(float(WAIT.parse(value, "max-lifetime")))
    return out


_CREATE_USAGE = (
    "syntax: POOL CREATE <name> SIZE <n> TTL <seconds> [WHEN-FULL evict|reject|wait]"
    " [MIN-HOLD <seconds>] [MAX-LIFETIME <seconds>]"
)


def _pool(_: str, args: list[str]) -> Request:
    sub = args[0].upper()
    rest = args[1:]
    if sub == "LIST" and not rest:
        return ListPools()
    if sub == "INFO" and len(rest) == 1:
        return GetPool(rest[0])
    if sub == "CREATE" and rest:
        options = pool_settings(rest[1:])
        if "size" not in options or "ttl" not in options:
            raise InvalidArgumentError(_CREATE_USAGE)
        return CreatePool(check_name(rest[0]), PoolSettings.make(**options))
    if sub == "ALTER" and rest:
        return AlterPool(rest[0], pool_settings(rest[1:]))
    if sub == "DROP" and len(rest) == 1:
        return DropPool(rest[0])
    if sub == "USE":
        raise InvalidArgumentError(
            "POOL USE is gone: a command means the same on every connection. Name the pool"
            " in the command (TP.ACTIVATE <pool> <user_id>, TP.RELEASE <pool> ...)"
        )
    raise ArityError(  # Redis's ERR, as every other subcommand's family answers
        f"unknown subcommand or wrong number of arguments for 'POOL|{args[0][:20]}';"
        " try CREATE, ALTER, LIST, INFO, DROP"
    )


_USER = Arg("user_id")
_TOKEN = Arg("token_id")
_LEASE = Arg("lease_id")
_LIMIT = (Arg("count", "integer", "LIMIT", True), Arg("cursor", "integer", "BEFORE", True))

SPECS: tuple[Spec, ...] = (
    Spec(
        "ACTIVATE",
        1,
        3,
        _activate,
        "Lease a token to a user (the user's own lease if it holds one)",
        (_USER, Arg("seconds", "double", "WAIT", True)),
        write=True,
    ),
    Spec(
        "RENEW",
        2,
        2,
        lambda p, a: Renew(p, a[0], a[1]),
        "Extend a lease by the pool's ttl",
        (_TOKEN, _LEASE),
        write=True,
    ),
    Spec(
        "VALIDATE",
        2,
        2,
        lambda p, a: Validate(p, a[0], a[1]),
        "Whether a lease is its token's current one (1 or 0)",
        (_TOKEN, _LEASE),
    ),
    Spec(
        "RELEASE",
        1,
        2,
        lambda p, a: Release(p, a[0], a[1] if len(a) > 1 else None),
        "End a token's lease (only the given user's, if one is given)",
        (_TOKEN, Arg("user_id", optional=True)),
        write=True,
    ),
    Spec("LEASE", 1, 1, lambda p, a: LeaseOf(p, a[0]), "The lease a user holds, or nil", (_USER,)),
    Spec("CLEAR", 0, 0, lambda p, a: Clear(p), "End every lease of the pool", write=True),
    Spec("TOKEN", 1, 1, lambda p, a: Token(p, a[0]), "One token and its holder", (_TOKEN,)),
    Spec(
        "TOKENS",
        0,
        4,
        _tokens,
        "Every token, or a page of them",
        (Arg("cursor", "integer", "CURSOR", True), Arg("count", "integer", "COUNT", True)),
    ),
    Spec(
        "SCAN",
        1,
        7,
        _scan,
        "A page of token ids, as Redis's SCAN",
        (
            Arg("cursor", "integer"),
            Arg("count", "integer", "COUNT", True),
            Arg("pattern", "pattern", "MATCH", True),
            Arg("type", "string", "TYPE", True),
        ),
    ),
    Spec(
        "HISTORY",
        1,
        5,
        lambda p, a: _history(p, a, False),
        "A page of a token's ended leases, newest first",
        (_TOKEN, *_LIMIT),
    ),
    Spec(
        "USERHISTORY",
        1,
        5,
        lambda p, a: _history(p, a, True),
        "A page of a user's ended leases, newest first",
        (_USER, *_LIMIT),
    ),
    Spec(
        "REPORT",
        1,
        11,
        _report,
        "A usage report over the pool's stored history, as JSON",
        (
            Arg("report"),
            Arg("since", "double", "SINCE", True),
            Arg("until", "double", "UNTIL", True),
            Arg("count", "integer", "LIMIT", True),
            Arg("cursor", "integer", "CURSOR", True),
            Arg("order", "string", "SORT", True),
        ),
        complexity="O(rows in the range) at worst; whole hours and days from the summary tables",
        slow=True,
    ),
    Spec(
        "SERIES",
        0,
        1,
        _series,
        "The pool's figures a second over the hour, or a minute over the day, as JSON",
        (Arg("window", "string", optional=True),),
        complexity="O(points in the window): 3,600 or 1,440",
        slow=True,
    ),
    Spec("STATS", 0, 0, lambda p, a: GetStats(p), "The pool's counters and its store's state"),
    Spec("DBSIZE", 0, 0, lambda p, a: GetStats(p), "The pool's number of tokens"),
    Spec(
        "POOL",
        1,
        12,
        _pool,
        "Pools: CREATE, ALTER, DROP, INFO, LIST",
        (Arg("subcommand"), Arg("name", "key", optional=True)),
        write=True,
        pooled=False,
    ),
)
BY_NAME: dict[str, Spec] = {s.name: s for s in SPECS}
KEYED: dict[str, Spec] = {PREFIX + s.name: s for s in SPECS if s.pooled and s.name != "DBSIZE"}


def build(name: str, argv: list[str], default_pool: str) -> Request | None:
    """The request of a pool command (``name`` upper-cased), or None if it is not one.

    Raises ``InvalidArgumentError`` (arity included: the message is Redis's)."""
    spec = KEYED.get(name)
    if spec is not None:
        if len(argv) < 2:
            raise _arity(argv[0])
        pool, args = argv[1], argv[2:]
    else:
        spec = BY_NAME.get(name)
        if spec is None:
            return None
        pool, args = default_pool, argv[1:]
    if not spec.low <= len(args) <= spec.high:
        raise _arity(argv[0])
    return spec.build(pool, args)


class ArityError(InvalidArgumentError):
    code = "ERR"


def _arity(name: str) -> ArityError:
    return ArityError(f"wrong number of arguments for '{name.lower()[:40]}' command")
