"""RESP replies as the library's values and errors: the client's side of ``_server/replies``.

The server answers RESP2 (the client never sends ``HELLO 3``): a record is a flat
array of field/value pairs, a missing time is ``""``, a float is decimal text. This
module undoes each of those quirks once, so a remote call returns the same ``Lease``,
``Usage``, ``TokenStatus``, ``Stats``, ``Page`` and ``Event`` as ``open_pool``, and an
error reply (``-FULL ...``) raises the library's class for its code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import attrs

from .._commands.connection import BusyError, NoAuthError, WrongPassError
from .._errors import (
    ClusterDownError,
    CompactedError,
    ExistsError,
    FullError,
    InvalidArgumentError,
    MovedError,
    NoPermError,
    NotActiveError,
    NotHolderError,
    PoolLockedError,
    TokenPoolError,
    TryAgainError,
    UnavailableError,
    UnknownPoolError,
    UnknownTokenError,
)
from .._model import Event, Lease, Page, Reason, Stats, Status, TokenStatus, Usage

_ERRORS: Final[dict[str, Callable[[str], TokenPoolError]]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        UnknownTokenError,
        ExistsError,
        NotHolderError,
        NotActiveError,
        FullError,
        UnavailableError,
        PoolLockedError,
        NoPermError,
        NoAuthError,
        WrongPassError,
        MovedError,
        TryAgainError,
        ClusterDownError,
    )
}
_RETRY_IN = re.compile(r"retry in ([0-9.]+) s")


def error_of(reply: Exception) -> TokenPoolError:
    """An error reply (``CODE message``) as the library's exception for its code.

    ``UNKNOWN`` is a pool when the message says so (``no pool ...``), else a token;
    ``BUSY`` carries ``retry_after`` parsed from its message; an unknown code (``ERR``)
    is a plain ``TokenPoolError`` with the whole text.
    """
    text = str(reply)
    code, _, message = text.partition(" ")
    if code == "UNKNOWN":
        cls = UnknownPoolError if message.startswith("no pool") else UnknownTokenError
        return cls(message)
    if code == "BUSY":
        found = _RETRY_IN.search(message)
        return BusyError(message, float(found.group(1)) if found else 0.0)
    make = _ERRORS.get(code)
    if make is None:
        return TokenPoolError(text)
    return make(message)


def fields(reply: Any) -> dict[str, Any]:
    """A RESP2 record (a flat array of field/value pairs) as a dict."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise TokenPoolError(f"unexpected reply {str(reply)[:80]!r}")
    return dict(zip(reply[::2], reply[1::2], strict=True))


def when(text: str) -> datetime | None:
    """An ISO-8601 ``...Z`` time, or ``None`` for RESP2's ``""``."""
    if not text:
        return None
    return datetime.fromisoformat(text)


def _time(text: str) -> datetime:
    value = when(text)
    if value is None:
        raise TokenPoolError("a reply lacks a time it must have")
    return value


def lease(reply: Any) -> Lease:
    """An ``ACTIVATE``/``RENEW``/``LEASE`` reply as a ``Lease``."""
    f = fields(reply)
    return Lease(
        f["id"],
        f["token_id"],
        f["user_id"],
        int(f["fence"]),
        _time(f["activated_at"]),
        _time(f["expires_at"]),
    )


def usage(reply: Any) -> Usage:
    """A history entry as a ``Usage``."""
    f = fields(reply)
    return Usage(
        f["id"],
        f["token_id"],
        f["user_id"],
        _time(f["started_at"]),
        _time(f["ended_at"]),
        Reason(f["reason"]),
        int(f["revision"]),
        int(f["fence"]),
    )


def page(reply: Any) -> Page:
    """``[cursor, [usages]]`` as a ``Page`` (cursor ``"0"``: the last page)."""
    cursor, items = reply
    return Page([usage(i) for i in items], None if cursor == "0" else int(cursor))


def token(reply: Any) -> TokenStatus:
    """A ``TOKEN`` reply as a ``TokenStatus`` (``lease_id`` and ``fence`` when the
    server sends them)."""
    f = fields(reply)
    user = f.get("current_user_id") or None
    fence = f.get("fence")
    return TokenStatus(
        f["id"],
        Status(f["status"]),
        user,
        when(f.get("activated_at", "")),
        when(f.get("expires_at", "")),
        f.get("lease_id") or None,
        int(fence) if fence not in (None, "") else None,
    )


def tokens_page(reply: Any) -> tuple[int, list[TokenStatus]]:
    cursor, items = reply
    return int(cursor), [token(i) for i in items]


_STATS_FIELDS: Final = {f.name: f for f in attrs.fields(Stats)}


def stats(reply: Any) -> Stats:
    """A ``STATS`` (or ``POOL INFO``) reply as ``Stats``; fields it does not know are
    left out, so a newer server's extra figures do not break an older client."""
    values: dict[str, Any] = {}
    for key, value in fields(reply).items():
        field = _STATS_FIELDS.get(key)
        if field is None:
            continue
        if key == "last_commit_at":
            values[key] = when(value)
        elif key == "write_lag":
            values[key] = float(value)
        else:
            values[key] = value
    return Stats(**values)


def event(pool: str, payload: str) -> Event | CompactedError:
    """A pub/sub message's JSON as an ``Event``, or the ``CompactedError`` it announces."""
    data = json.loads(payload)
    if data.get("kind") == "compacted":
        return CompactedError(data.get("message", "events compacted"), int(data["oldest"]))
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("activated_at", "expires_at", "ended_at"):
            values[key] = when(value)
        elif key in _EVENT_FIELDS:
            values[key] = value
    values.setdefault("pool", pool)
    return Event(**values)


_EVENT_FIELDS: Final = frozenset(f.name for f in attrs.fields(Event))
