"""The HTTP API's documented shapes (OpenAPI) and its error shape.

Bounds come from the settings' ranges (``_settings``), never restated; the
reasons and policies from the one list of each.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from .._commands import BusyError
from .._errors import TokenPoolError
from .._model import Reason, Stats
from .._settings import MAX_LIFETIME, MIN_HOLD, SIZE, TTL, WAIT, PoolSettings, WhenFull

ReasonName = Reason
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
USER_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"
POOL_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"

STATUS = {
    "INVALID": 422,
    "UNKNOWN": 404,
    "NOTKEPT": 404,
    "NOTHOLDER": 409,
    "NOTACTIVE": 409,
    "FULL": 409,
    "EXISTS": 409,
    "UNAVAILABLE": 503,
    "LOCKED": 503,
    "TRYAGAIN": 503,  # a cluster's pool being taken over, past the wait for its owner
    "CLUSTERDOWN": 503,
    "UNREACHABLE": 503,
    "NOAUTH": 401,
    "WRONGPASS": 401,
    "NOPERM": 403,
    "BUSY": 429,
    "COMPACTED": 410,
    "TOOLARGE": 413,
    "HEADTOOLARGE": 431,
    "BADFRAMING": 400,
    "SLOWBODY": 408,
    "NOTJSON": 415,
    "CROSSSITE": 403,
    "BADHOST": 421,
}
MAX_BODY = 64 * 1024
SLICE = 256  # listed items formatted between checkpoints
BIG_LISTING = 1_000  # past this many items, JSON is encoded in a worker thread
HEARTBEAT = 15.0  # seconds between comments on an idle event stream


class ApiError(Exception):
    """An error reply: ``{"error": {"code", "message"}}`` with its status."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = STATUS.get(code, 500)
        self.headers = headers or {}


def api_error(error: TokenPoolError) -> ApiError:
    """A refusal of the command layer as the API's error: its code and status, and for a
    rate limit the seconds to wait (``Retry-After``). The one place both the routes and
    the app's error handler turn one into the other."""
    headers = {}
    if isinstance(error, BusyError):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return ApiError(error.code, str(error), headers)


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=STATUS.get(code, 500),
        headers=headers,
    )


_RULES = {
    "user_id": "user_id must be 1 to 128 characters (at most 128 bytes of UTF-8) with no"
    " space or control character",
    "lease_id": "lease_id must be a UUID (8-4-4-4-12 hexadecimal digits)",
    "token_id": "token_id must be a UUID (8-4-4-4-12 hexadecimal digits)",
    "pool": "the pool name must be 1 to 64 characters of A-Z a-z 0-9 _ . - (not . or ..)",
    "name": "name must be 1 to 64 characters of A-Z a-z 0-9 _ . - (not . or ..)",
}
_PLACES = {"query": "the query parameter ", "header": "the header ", "path": "", "body": ""}


def plain_problem(item: Any) -> str:
    """One of pydantic's validation errors in plain words: what was wrong and the rule,
    never a regular expression or pydantic's own wording."""
    loc = [str(p) for p in item.get("loc", ())]
    place = _PLACES.get(loc[0], "") if loc else ""
    field = ".".join(loc[1:]) if loc and loc[0] in _PLACES else ".".join(loc)
    kind = str(item.get("type", ""))
    ctx = item.get("ctx") or {}
    if kind == "json_invalid":  # its place is a character offset, not a field
        where = f" at character {loc[1]}" if len(loc) > 1 and loc[1].isdigit() else ""
        why = str(ctx.get("error", "")).lower()[:80]
        return f"the body is not valid JSON{where}" + (f" ({why})" if why else "")
    if not field:  # the body as a whole
        if kind == "missing":
            return "the request needs a JSON body"
        if kind == "json_invalid":
            return "the body is not valid JSON"
        return "the body must be a JSON object"
    name = f"{place}{field}"
    if kind == "missing":
        return f"{name} is required"
    if kind == "extra_forbidden":
        return f"{name} is not a field this request takes"
    rule = _RULES.get(loc[-1])
    if rule is not None and kind.startswith("string"):
        return rule if not place else f"{place}{rule}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{name} must be at least {ctx.get('ge', ctx.get('gt'))}"
    if kind in ("less_than_equal", "less_than"):
        return f"{name} must be at most {ctx.get('le', ctx.get('lt'))}"
    if kind == "string_too_short":
        return f"{name} must have at least {ctx.get('min_length')} characters"
    if kind == "string_too_long":
        return f"{name} may have at most {ctx.get('max_length')} characters"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{name} must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return f"{name} must be a number"
    if kind == "finite_number":
        return f"{name} must be a finite number"
    if kind in ("enum", "literal_error"):
        return f"{name} must be one of {ctx.get('expected', 'the documented values')}"
    if kind == "string_type":
        return f"{name} must be a string"
    if kind in ("bool_parsing", "bool_type"):
        return f"{name} must be true or false"
    if kind in ("dict_type", "model_attributes_type", "model_type"):
        return f"{name} must be a JSON object"
    return f"{name} is not valid" + (f": {rule}" if rule else "")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Model):
    code: str = Field(description="the library's error code: INVALID, UNKNOWN, FULL...")
    message: str


class ErrorReply(_Model):
    error: ErrorBody


class LeaseOut(_Model):
    id: str = Field(description="the lease id (pass it to renew and validate)")
    token_id: str
    user_id: str
    fence: int = Field(description="grows with every lease of the token (a fencing token)")
    activated_at: str
    expires_at: str
    revision: int | None = None


class UsageOut(_Model):
    id: str
    token_id: str
    user_id: str
    started_at: str
    ended_at: str
    reason: ReasonName
    revision: int
    fence: int


class ActiveUsage(_Model):
    id: str
    user_id: str
    started_at: str
    expires_at: str
    fence: int


class TokenOut(_Model):
    id: str
    status: Literal["available", "active"]
    current_user_id: str | None
    activated_at: str | None
    expires_at: str | None


class TokenDetailOut(TokenOut):
    active_usage: ActiveUsage | None


class HistoryOut(_Model):
    token_id: str | None = None
    user_id: str | None = None
    usages: list[UsageOut]
    next_before: int | None = Field(description="pass as ?before= for the next (older) page")


class DropOut(_Model):
    dropped: str


class ClearOut(_Model):
    cleared_tokens: int
    revision: int


class ValidOut(_Model):
    valid: bool


_JSON_TYPES: dict[str, Any] = {
    "int": int,
    "str": str,
    "float": float,
    "float | None": float | None,
    "datetime | None": str | None,  # ISO-8601, as every time the API shows
}
_SETTINGS_TYPES = {"when_full": WhenFull}
_settings_fields: Any = {
    f.name: (_SETTINGS_TYPES.get(f.name) or _JSON_TYPES[str(f.type)], ...)
    for f in attrs.fields(PoolSettings)
}
_stats_fields: Any = {f.name: (_JSON_TYPES[str(f.type)], ...) for f in attrs.fields(Stats)}
PoolSettingsOut: Any = create_model("PoolSettingsOut", __base__=_Model, **_settings_fields)
PoolStatsOut: Any = create_model("PoolStatsOut", __base__=_Model, **_stats_fields)
"""Both derived from the values they document (``PoolSettings``, ``Stats``): never restated."""


class PoolOut(_Model):
    name: str
    settings: PoolSettingsOut
    stats: PoolStatsOut


def _data(model: type[BaseModel] | Any, name: str) -> type[BaseModel]:
    return type(name, (_Model,), {"__annotations__": {"data": model}})


LeaseReply = _data(LeaseOut, "LeaseReply")
MaybeLeaseReply = _data(LeaseOut | None, "MaybeLeaseReply")
UsageReply = _data(UsageOut, "UsageReply")
TokenListReply = type(
    "TokenListReply",
    (_Model,),
    {
        "__annotations__": {"data": list[TokenOut], "next_cursor": str | None},
        "next_cursor": Field(None, description="pass as ?cursor= for the next page; null: done"),
    },
)
TokenReply = _data(TokenDetailOut, "TokenReply")
HistoryReply = _data(HistoryOut, "HistoryReply")
ClearReply = _data(ClearOut, "ClearReply")
DropReply = _data(DropOut, "DropReply")
ValidReply = _data(ValidOut, "ValidReply")
PoolReply = _data(PoolOut, "PoolReply")
PoolListReply = _data(list[PoolOut], "PoolListReply")
ErrorCodes: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorReply} for code in (401, 403, 404, 409, 413, 415, 421, 422, 429, 503)
}


# Numbers in a body are JSON numbers (``strict``): pydantic's lax mode took "1_000", " 4",
# "1e1" and true for numbers, which every other way in (flags, environment, the file,
# RESP) refuses, as the settings' rule says (ASCII digits only, in text).


class ActivateIn(_Model):
    user_id: str = Field(
        description="who takes a token: at most 128 bytes of UTF-8, no space or control character",
        min_length=1,
        max_length=128,
        pattern=USER_PATTERN,
    )
    wait: float | None = Field(
        None,
        strict=True,
        ge=WAIT.low,
        le=WAIT.high,
        allow_inf_nan=False,
        description="a pool that waits when full: wait up to this many seconds",
    )


class RenewIn(_Model):
    lease_id: str = Field(pattern=UUID_PATTERN, description="the lease id activate returned")


class ReleaseIn(_Model):
    user_id: str | None = Field(
        None,
        description="release only if this user holds it",
        min_length=1,
        max_length=128,
        pattern=USER_PATTERN,
    )


_NO_CAP = "seconds; 0 or null: no cap"


class PoolIn(_Model):
    name: str = Field(pattern=POOL_PATTERN)
    size: int = Field(ge=SIZE.low, le=SIZE.high, strict=True)
    ttl: float = Field(ge=TTL.low, le=TTL.high, allow_inf_nan=False, strict=True)
    when_full: WhenFull = WhenFull.EVICT
    min_hold: float = Field(
        0.0, ge=MIN_HOLD.low, le=MIN_HOLD.high, allow_inf_nan=False, strict=True
    )
    max_lifetime: float | None = Field(
        None, ge=0, le=MAX_LIFETIME.high, allow_inf_nan=False, strict=True, description=_NO_CAP
    )


class PoolChange(_Model):
    size: int | None = Field(None, ge=SIZE.low, le=SIZE.high, strict=True)
    ttl: float | None = Field(None, ge=TTL.low, le=TTL.high, allow_inf_nan=False, strict=True)
    when_full: WhenFull | None = None
    min_hold: float | None = Field(
        None, ge=MIN_HOLD.low, le=MIN_HOLD.high, allow_inf_nan=False, strict=True
    )
    max_lifetime: float | None = Field(
        None, ge=0, le=MAX_LIFETIME.high, allow_inf_nan=False, strict=True, description=_NO_CAP
    )
