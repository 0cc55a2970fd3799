"""The HTTP API's documented shapes (OpenAPI) and its error shape.

Bounds come from the settings' ranges (``_settings``), never restated; the
reasons and policies from the one list of each.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from .._model import Reason, Stats
from .._settings import MAX_LIFETIME, MIN_HOLD, SIZE, TTL, WAIT, PoolSettings, WhenFull

ReasonName = Reason
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
USER_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"
POOL_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"

STATUS = {
    "INVALID": 422,
    "UNKNOWN": 404,
    "NOTHOLDER": 409,
    "NOTACTIVE": 409,
    "FULL": 409,
    "EXISTS": 409,
    "UNAVAILABLE": 503,
    "LOCKED": 503,
    "NOAUTH": 401,
    "WRONGPASS": 401,
    "NOPERM": 403,
    "BUSY": 429,
    "COMPACTED": 410,
    "TOOLARGE": 413,
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


def _error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=STATUS.get(code, 500),
        headers=headers,
    )


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=STATUS.get(code, 500),
        headers=headers,
    )


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


class ActivateIn(_Model):
    user_id: str = Field(
        description="who takes a token: at most 128 bytes of UTF-8, no space or control character",
        min_length=1,
        max_length=128,
        pattern=USER_PATTERN,
    )
    wait: float | None = Field(
        None,
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
    size: int = Field(ge=SIZE.low, le=SIZE.high)
    ttl: float = Field(ge=TTL.low, le=TTL.high, allow_inf_nan=False)
    when_full: WhenFull = WhenFull.EVICT
    min_hold: float = Field(0.0, ge=MIN_HOLD.low, le=MIN_HOLD.high, allow_inf_nan=False)
    max_lifetime: float | None = Field(
        None, ge=0, le=MAX_LIFETIME.high, allow_inf_nan=False, description=_NO_CAP
    )


class PoolChange(_Model):
    size: int | None = Field(None, ge=SIZE.low, le=SIZE.high)
    ttl: float | None = Field(None, ge=TTL.low, le=TTL.high, allow_inf_nan=False)
    when_full: WhenFull | None = None
    min_hold: float | None = Field(None, ge=MIN_HOLD.low, le=MIN_HOLD.high, allow_inf_nan=False)
    max_lifetime: float | None = Field(
        None, ge=0, le=MAX_LIFETIME.high, allow_inf_nan=False, description=_NO_CAP
    )
