"""``VIA``: a typed request sent to a server to run for someone else, and its result.

Two kinds of callers send ``VIA <peer> <bearer> <command...>``: the server's own HTTP
workers (over its private Unix socket) and, in a cluster, the other nodes (over the
RESP port, authenticated with the cluster's secret), each on behalf of an HTTP client
at ``peer``. The command is the typed request's RESP form (``argv_of``); the reply is
the command layer's neutral result, pickled. It is decoded by ``result_of`` with an
allow-list of the result types (the pickle documentation's "restricting globals"): a
reply names only the library's value classes and plain containers, never a function
or anything else a forged reply could make run.
"""

from __future__ import annotations

import base64
import builtins
import enum
import io
import pickle
import sys
from collections.abc import Callable
from typing import Any, ClassVar

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
    Token,
    TokenList,
    Tokens,
    UserHistory,
    Validate,
)
from .._commands import Request as Command
from .._commands.analytics import Report, Series
from .._commands.history import PageChunks
from .._commands.leases import Granted
from .._commands.tokens import ChunkedItems, TokenChunks
from .._errors import InvalidArgumentError, TokenPoolError, UnreachableError
from .._model import Page
from .remote import pool_options, seconds_arg


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


# Constructors that make no more than the reply holds (no bytes(n), bytearray(n) or
# range: a few bytes of reply asking for gigabytes). Protocol 5 writes the plain
# containers and bytes as opcodes, so a real reply names none of these anyway.
_BUILTINS = frozenset({"list", "dict", "tuple", "set", "frozenset", "int", "float", "str", "bool"})
_MODULES = frozenset({"uuid", "datetime", "array"})


def _is_value(cls: type) -> bool:
    """The package's value classes: records (attrs, named tuples), enums, lists and
    maps, errors. Never a class whose making does work (a store, an analyst)."""
    return attrs.has(cls) or issubclass(cls, (tuple, list, dict, enum.Enum, TokenPoolError))


class _Results(pickle.Unpickler):
    """Unpickles a neutral result: plain containers and the library's value classes.

    A name is looked up in the modules already loaded, never imported: importing a
    module runs it (``tokenpool.__main__`` runs the CLI and raises ``SystemExit``)."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if module == "builtins" and name in _BUILTINS:
                return getattr(builtins, name)
            if module == "array" and name == "_array_reconstructor":
                return super().find_class(module, name)
            if module in _MODULES or module.startswith("tokenpool."):
                found = getattr(sys.modules.get(module), name, None)
                if (
                    isinstance(found, type)
                    and found.__module__ == module
                    and (module in _MODULES or _is_value(found))
                ):
                    return found
        raise pickle.UnpicklingError(f"a VIA reply may not name {module}.{name}")


class _NodeResults(pickle._Unpickler):
    """``_Results`` for a reply from another host (a node of the cluster): the same
    names, and no ``BUILD`` on a class, which sets the class's attributes for the whole
    process (a named tuple's fields, an enum's methods). Python's own unpickler: C's
    ``BUILD`` cannot be checked; these replies cross a network anyway."""

    find_class = _Results.find_class
    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def _build(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        if isinstance(stack[-2], type):
            raise pickle.UnpicklingError("a VIA reply may not set a class's attributes")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _build


_GRANTED = "G\x1f"
"""A granted lease's reply starts so (a pickle's base64 starts ``gAS``), its fields
joined by the unit separator, which no field holds (ids and numbers; a user id has no
control character, and comes last, so even one would stay in it)."""
_GRANTED_BYTES = _GRANTED.encode()


def encode_result(result: Any) -> bytes:
    """A neutral result as ``VIA``'s reply: an activation's (the hot path of HTTP
    workers) as a line of its fields, everything else pickled: the line takes 1.7 µs to
    make and 4.1 to read, the pickle in base64 5.9 and 6.1."""
    if type(result) is Granted:
        kind, lease_id, slot, user_id, fence, start, stop, fence2 = result.lease
        revision = "" if result.revision is None else result.revision
        return (
            f"{_GRANTED}{kind}\x1f{lease_id}\x1f{slot}\x1f{fence}\x1f{start}\x1f{stop}"
            f"\x1f{fence2}\x1f{result.token_id}\x1f{revision}\x1f{user_id}"
        ).encode()
    return base64.b64encode(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def _granted(reply: str) -> Granted:
    """``encode_result``'s line of a granted lease, read back (ValueError if malformed)."""
    parts = reply.split("\x1f", 10)
    if len(parts) != 11:
        raise ValueError(f"a granted lease of {len(parts)} fields, not 11")
    _, kind, lease_id, slot, fence, start, stop, fence2, token_id, revision, user_id = parts
    numbers = int(kind), int(slot), int(fence), int(start), int(stop), int(fence2)
    lease = (numbers[0], lease_id, numbers[1], user_id, *numbers[2:])
    return Granted(lease, token_id, int(revision) if revision else None)


def result_of(reply: Any, *, own_server: bool = False, remote: bool = False) -> Any:
    """``VIA``'s reply as the neutral result it carries. Raises ``UnreachableError``
    for a reply that is not one (a forged or garbled one included): that server's
    answers cannot be used.

    ``remote``: from another node (another host), checked further (Python's unpickler,
    no ``BUILD`` on a class). ``own_server``: the reply came from the HTTP worker's own
    parent, over the private Unix socket only it and its workers can open (a directory
    of mode 0700, a per-run secret): decoded at C speed, without the allow-list's
    Python calls (half the decoding time of an activation's reply; this is the hot path
    of ``--http-workers``)."""
    try:
        if type(reply) is bytes and reply.startswith(_GRANTED_BYTES):
            reply = reply.decode()
        if type(reply) is str and reply.startswith(_GRANTED):
            return _granted(reply)
        data = base64.b64decode(reply, validate=True)
        if own_server:
            result = pickle.loads(data)
            loads: Callable[[bytes], Any] = pickle.loads
        else:
            kind = _NodeResults if remote else _Results
            result = kind(io.BytesIO(data)).load()

            def loads(chunk: bytes) -> Any:
                return kind(io.BytesIO(chunk)).load()

        if type(result) is TokenList and type(result.items) is TokenChunks:
            # A listing's pairs, pickled a chunk at a time: from the worker's own server
            # decoded a slice at a time as it is formatted; from anywhere else, all of
            # it now, with the same checks, so a bad chunk is this reply's error.
            items: Any = ChunkedItems(result.items, loads)
            result = TokenList(items if own_server else list(items), str, result.cursor)
        elif type(result) is PageChunks:
            result = Page([u for chunk in result.chunks for u in loads(chunk)], result.next_before)
        return result
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
    ) as error:
        raise UnreachableError(f"a VIA reply that is not a result: {error}") from None
