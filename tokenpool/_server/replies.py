"""Neutral results as RESP replies: RESP2's quirks (``""`` for a missing time, decimal
text for a float), the hand-made encoder of the hot reply, listings a slice at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .._commands import Cleared, Granted, PoolInfo, Released, TokenIds, TokenInfo, TokenList
from .._errors import TokenPoolError
from .._model import FENCE, ID, START, STOP, USER, LeaseRecord, Page, Stats, Usage, iso, to_us
from .._resp import OK, Error, Reply
from .._settings import PoolSettings
from .._store.analytics import Table

_iso_cache: dict[int, str] = {}


def _iso(us: int) -> str:
    # Leases granted in one batch share their two times: format each once.
    text = _iso_cache.get(us)
    if text is None:
        if len(_iso_cache) > 4096:
            _iso_cache.clear()
        text = _iso_cache[us] = iso(us)
    return text


class Listing:
    """A long array reply, formatted and encoded slice by slice by the driver.

    With ``cursor`` it is the pair ``[cursor, [items]]`` (as Redis's SCAN)."""

    __slots__ = ("cursor", "format", "items")

    def __init__(
        self, items: Sequence[Any], format: Callable[[Any], Reply], cursor: str | None = None
    ) -> None:
        self.items = items
        self.format = format
        self.cursor = cursor

    def whole(self) -> Reply:
        items: list[Reply] = [self.format(i) for i in self.items]
        return items if self.cursor is None else [self.cursor, items]


def lease_fields(lease: LeaseRecord, token_id: str) -> dict[str, Reply]:
    return {
        "id": lease[ID],
        "token_id": token_id,
        "user_id": lease[USER],
        "fence": lease[FENCE],
        "activated_at": _iso(lease[START]),
        "expires_at": _iso(lease[STOP]),
    }


def usage_fields(usage: Usage) -> dict[str, Reply]:
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


def token_fields(token: TokenInfo) -> dict[str, Reply]:
    """A token, with ``""`` for what it does not have (RESP2 has no null in an array)."""
    lease = token.lease
    if lease is None:
        return {
            "id": token.token_id,
            "status": "available",
            "current_user_id": "",
            "activated_at": "",
            "expires_at": "",
        }
    return {
        "id": token.token_id,
        "status": "active",
        "current_user_id": lease[USER],
        "activated_at": _iso(lease[START]),
        "expires_at": _iso(lease[STOP]),
    }


def _plain(value: Any) -> Reply:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    if hasattr(value, "isoformat"):
        return iso(to_us(value))
    return value  # type: ignore[no-any-return]


def stats_fields(stats: Stats) -> dict[str, Reply]:
    return {f.name: _plain(getattr(stats, f.name)) for f in attrs.fields(Stats)}


def settings_fields(settings: PoolSettings) -> dict[str, Reply]:
    out: dict[str, Reply] = {}
    for key, value in settings.as_dict().items():
        out[key] = f"{value:g}" if isinstance(value, float) else ("" if value is None else value)  # type: ignore[assignment]
    return out


def error_reply(error: BaseException) -> Error:
    if isinstance(error, TokenPoolError):
        return Error(error.code, str(error))
    return Error("ERR", f"internal error: {type(error).__name__}")


def reply_of(result: Any, command: str) -> Any:
    """A neutral result as a RESP reply value (or a ``Listing``)."""
    kind = type(result)
    if kind is Granted:
        fields = lease_fields(result.lease, result.token_id)
        if result.revision is not None:
            fields["revision"] = result.revision
        return fields
    if kind is Released:
        return result.revision  # never 0: a truthy reply
    if kind is bool:
        return 1 if result else 0
    if kind is TokenInfo:
        return token_fields(result)
    if kind is TokenList:
        info = result.info
        cursor = None if result.cursor is None else str(result.cursor)
        return Listing(result.items, lambda item: token_fields(info(item)), cursor)
    if kind is TokenIds:
        return [str(result.cursor), list(result.ids)]
    if kind is Page:
        cursor = "0" if result.next_before is None else str(result.next_before)
        return Listing(result, usage_fields, cursor)
    if kind is Cleared:
        return {"cleared": result.ended, "revision": result.revision}
    if kind is Stats:
        return result.size if command == "DBSIZE" else stats_fields(result)
    if kind is PoolInfo:
        return {
            "name": result.name,
            **settings_fields(result.settings),
            **stats_fields(result.stats),
        }
    if kind is Table:
        rows = [dict(zip(result.columns, r, strict=True)) for r in result.rows]
        table = {"columns": list(result.columns), "rows": rows}
        return json.dumps({**table, "next_cursor": result.next_cursor}, default=str)
    if kind is dict and command.endswith("SERIES"):
        return json.dumps(result)
    if result is None and command.startswith("POOL"):
        return OK
    if kind is PoolSettings or (kind is int and command == "POOL"):
        return OK  # ALTER answers its settings, DROP how many leases ended: +OK as before
    return result


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


def granted_wire(result: Granted, proto: int) -> bytes:
    """``encode(reply_of(granted))`` about five times faster: ACTIVATE's reply."""
    lease = result.lease
    user = lease[USER].encode()
    start = _iso_b(lease[START])
    end = _iso_b(lease[STOP])
    return _LEASE_WIRE % (
        b"%7\r\n" if proto == 3 else b"*14\r\n",
        lease[ID].encode(),
        result.token_id.encode(),
        len(user),
        user,
        lease[FENCE],
        len(start),
        start,
        len(end),
        end,
        result.revision,
    )
