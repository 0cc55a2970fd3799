"""The HTTP driver: the seed's REST API, ``/metrics``, health, live events and the dashboard.

An ASGI app (FastAPI, served by hypercorn's trio worker in the server's own trio
run). Every ``/api`` call is turned into the command the RESP server would run
(``ACTIVATE <user>``, ``TOKEN <id>``...), planned by the same command layer and
executed against the same pools: the arguments are checked, the rate limits
and the password budget applied, and the values formatted in one place. This
module only translates: JSON in, argv, reply values, JSON out, and error codes
to HTTP statuses.

Cost before work: request bodies are bounded before they are read; long
listings are formatted a slice at a time with a checkpoint between, and
encoded in a worker thread, at most two at once; event streams are bounded in
number and each has a bounded buffer in the pool (a slow reader gets an
``overflow`` event, never slows the pool).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

import attrs
import trio
from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from . import __version__
from ._commands import (
    Commands,
    Deferred,
    Listing,
    Session,
    execute,
    lease_fields,
    settings_values,
    stats_values,
    token_fields,
    usage_fields,
)
from ._errors import CompactedError, TokenPoolError
from ._log import get_logger
from ._metrics import Latencies, TokenpoolCollector, render
from ._model import LeaseRecord
from ._resp import Error
from ._settings import MAX_SECONDS, MAX_SIZE, MIN_TTL, check_name, parse_int
from ._state import HISTORY_LIMIT_MAX, PAGE_MAX

if TYPE_CHECKING:
    from ._pool import Pool, Pools
    from ._server import RespServer

log = get_logger("tokenpool.http")

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
}
MAX_BODY = 64 * 1024
SLICE = 256  # listed items formatted between checkpoints
BIG_LISTING = 1_000  # past this many items, JSON is encoded in a worker thread
HEARTBEAT = 15.0  # seconds between comments on an idle event stream


@attrs.frozen
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 4000
    max_streams: int = 1_000  # event streams open at once
    keep_alive: float = 5.0
    graceful: float = 2.0  # seconds requests in flight get at shutdown
    certfile: str | None = None  # with keyfile: HTTPS only (as --tls-cert makes RESP TLS only)
    keyfile: str | None = None


@attrs.frozen
class HttpStatistics:
    requests: int
    errors: int
    in_flight: int
    streams: int
    auth_failures: int


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


# -- the documented shapes (OpenAPI); replies are built as plain dicts ------------------


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
    reason: Literal["expired", "evicted", "released", "cleared"]
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


class PoolSettingsOut(_Model):
    size: int
    ttl: float
    when_full: Literal["evict", "reject", "wait"]
    min_hold: float
    max_lifetime: float | None


class PoolStatsOut(_Model):
    size: int
    active: int
    available: int
    revision: int
    activations: int
    evictions: int
    expirations: int
    releases: int
    clears: int
    renewals: int
    refusals: int
    waiting: int
    store: str
    durability: str
    link: str
    backlog: int
    last_commit_at: str | None
    write_lag: float


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
    code: {"model": ErrorReply} for code in (401, 403, 404, 409, 413, 422, 429, 503)
}


UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
USER_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"


class ActivateIn(_Model):
    user_id: str = Field(
        description="who takes a token: at most 128 bytes of UTF-8, no space or control character",
        min_length=1,
        max_length=128,
        pattern=USER_PATTERN,
    )
    wait: float | None = Field(
        None,
        ge=0,
        le=MAX_SECONDS,
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


class PoolIn(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    size: int = Field(ge=1, le=MAX_SIZE)
    ttl: float = Field(ge=MIN_TTL, le=MAX_SECONDS, allow_inf_nan=False)
    when_full: Literal["evict", "reject", "wait"] = "evict"
    min_hold: float = Field(0.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    max_lifetime: float | None = Field(None, ge=0, le=MAX_SECONDS, allow_inf_nan=False)


class PoolChange(_Model):
    size: int | None = Field(None, ge=1, le=MAX_SIZE)
    ttl: float | None = Field(None, ge=MIN_TTL, le=MAX_SECONDS, allow_inf_nan=False)
    when_full: Literal["evict", "reject", "wait"] | None = None
    min_hold: float | None = Field(None, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    max_lifetime: float | None = Field(None, ge=0, le=MAX_SECONDS, allow_inf_nan=False)


def _seconds(value: float) -> str:
    return repr(float(value))


_OPTIONAL = ("current_user_id", "activated_at", "expires_at")


def _token(fields: dict[str, Any]) -> dict[str, Any]:
    """A token as JSON shows it: ``null`` where RESP shows ``""``."""
    for key in _OPTIONAL:
        if fields[key] == "":
            fields[key] = None
    return fields


def _active_usage(record: LeaseRecord | None, token_id: str) -> dict[str, Any] | None:
    if record is None:
        return None
    lease = lease_fields(record, token_id)
    return {
        "id": lease["id"],
        "user_id": lease["user_id"],
        "started_at": lease["activated_at"],
        "expires_at": lease["expires_at"],
        "fence": lease["fence"],
    }


def _pool_info(pool: Pool, stats: Any) -> dict[str, Any]:
    return {
        "name": pool.name,
        "settings": settings_values(pool.settings),
        "stats": stats_values(pool.with_store(stats)),
    }


# -- ASGI wrappers: body bound, latency and in-flight count ----------------------------------


class _Outer:
    """Bounds request bodies (413 before reading past ``MAX_BODY``), counts requests in
    flight, and times each one under its route's name."""

    def __init__(self, app: Any, owner: HttpApp) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = MAX_BODY + 1
                if length > MAX_BODY or length < 0:
                    await _error_response(
                        "TOOLARGE", f"a request body may have at most {MAX_BODY} bytes"
                    )(scope, receive, send)
                    return
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:  # chunked, no length: stop reading, as if it hung up
                    return {"type": "http.disconnect"}
            return message

        owner = self.owner
        owner.in_flight += 1
        started = time.perf_counter()
        try:
            await self.app(scope, bounded, send)
        finally:
            owner.in_flight -= 1
            route = scope.get("route")
            name = getattr(route, "name", None) or "other"
            owner.latencies.observe("http", name, time.perf_counter() - started)


class _EventStream(Response):
    """Server-Sent Events of one pool: one event per change, ``id`` its revision.

    Not a generator (a cancelled generator is finalised later, by the collector, and
    its subscription would linger): one task forwards events, another watches for the
    client hanging up and cancels the first.
    """

    media_type = "text/event-stream"

    def __init__(self, owner: HttpApp, pool: Pool, since: int | None) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.owner = owner
        self.pool = pool
        self.since = since

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        owner = self.owner
        owner.streams += 1
        try:
            async with trio.open_nursery() as nursery:

                async def hang_up() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hang_up)
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    await self._forward(send)
                nursery.cancel_scope.cancel()
        finally:
            owner.streams -= 1
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _forward(self, send: Send) -> None:
        async def out(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        await out(f"retry: 2000\n: events of pool {self.pool.name}\n\n")
        try:
            async with self.pool.watch(self.since) as events:
                self.owner.subscriptions.add(events)
                try:
                    while True:
                        with trio.move_on_after(HEARTBEAT):
                            try:
                                event = await events.__anext__()
                            except StopAsyncIteration:
                                return
                            payload = json.dumps(event.as_dict())
                            if event.kind == "overflow":
                                await out(f"event: overflow\ndata: {payload}\n\n")
                                return
                            following = events.next_revision()
                            if following == event.revision:
                                # an eviction: its ended event shares the revision with the
                                # grant after it; the resume point is after both
                                await out(f"data: {payload}\n\n")
                            else:
                                await out(f"id: {event.revision}\ndata: {payload}\n\n")
                            continue
                        await out(": keepalive\n\n")
                finally:
                    self.owner.subscriptions.discard(events)
        except CompactedError as error:
            payload = json.dumps(
                {"kind": "compacted", "oldest": error.oldest, "message": str(error)}
            )
            await out(f"event: compacted\ndata: {payload}\n\n")


_bearer = HTTPBearer(auto_error=False, description="the --requirepass password")


async def _authorized(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Session:
    owner: HttpApp = request.app.state.owner
    return await owner.authenticate(request, credentials.credentials if credentials else None)


Authed = Annotated[Session, Depends(_authorized)]
TokenId = Annotated[str, Path(description="a token id (UUID)", pattern=UUID_PATTERN)]
PoolName = Annotated[
    str, Path(description="a pool name", pattern=r"^[A-Za-z0-9_.-]{1,64}$", max_length=64)
]
UserId = Annotated[
    str, Path(description="a user id", min_length=1, max_length=128, pattern=USER_PATTERN)
]
Limit = Annotated[int, Query(ge=1, le=HISTORY_LIMIT_MAX, description="entries on the page")]
Before = Annotated[
    int | None, Query(ge=1, le=2**63 - 1, description="the next_before of the previous page")
]


# -- the app --------------------------------------------------------------------------


class HttpApp:
    """The ASGI app. ``attach()`` gives it the pools once they are recovered; until
    then ``/api`` answers 503 and ``/readyz`` says why."""

    def __init__(self, settings: HttpSettings, latencies: Latencies) -> None:
        self.settings = settings
        self.latencies = latencies
        self.commands: Commands | None = None
        self.resp: RespServer | None = None
        self.in_flight = 0
        self.streams = 0
        self.subscriptions: set[Any] = set()
        self.closing = False
        self._heavy = trio.CapacityLimiter(2)
        self._client_ids = 1 << 32  # apart from the RESP server's
        self.registry = CollectorRegistry()
        self.registry.register(TokenpoolCollector(self._pools, self._servers, latencies))
        self.api = self._build()
        self.asgi = _Outer(self.api, self)

    @property
    def default_pool(self) -> str:
        """The pool the paths without ``/pools/{pool}`` address (the flags' ``--name``)."""
        return "default" if self.commands is None else self.commands.settings.default_pool

    def attach(self, commands: Commands, resp: RespServer | None = None) -> None:
        self.commands = commands
        self.resp = resp

    def close(self) -> None:
        """End every event stream (shutdown): their pools are about to close."""
        self.closing = True
        for subscription in list(self.subscriptions):
            subscription.close()

    def statistics(self) -> HttpStatistics:
        c = self.commands
        return HttpStatistics(
            requests=0 if c is None else c.commands,
            errors=0 if c is None else c.errors,
            in_flight=self.in_flight,
            streams=self.streams,
            auth_failures=0 if c is None else c.auth.failures,
        )

    def _pools(self) -> Pools | None:
        return None if self.commands is None else self.commands.pools

    def _servers(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        if self.resp is not None:
            r = self.resp.statistics()
            out["resp"] = {
                "clients": r.clients,
                "commands": r.commands,
                "errors": r.errors,
                "protocol_errors": r.protocol_errors,
                "auth_failures": r.auth_failures,
                "rate_limited": r.rate_limited,
            }
        h = self.statistics()
        out["http"] = {
            "clients": h.in_flight + h.streams,
            "commands": h.requests,
            "errors": h.errors,
        }
        return out

    # -- running a command ---------------------------------------------------------

    def _ready_commands(self) -> Commands:
        if self.commands is None:
            raise ApiError("UNAVAILABLE", "the server is still recovering its pools")
        return self.commands

    def _session(self, request: Request, user: str) -> Session:
        self._client_ids += 1
        client = request.client
        peer = f"{client.host}:{client.port}" if client else "?"
        session = Session(self._client_ids, peer, authed=True)
        session.user = user
        return session

    async def authenticate(self, request: Request, bearer: str | None) -> Session:
        commands = self._ready_commands()
        s = commands.settings
        if s.password is None and s.admin_password is None:
            return self._session(request, "default")
        if bearer is None:
            raise ApiError(
                "NOAUTH",
                "authentication required: send Authorization: Bearer <password>",
                {"WWW-Authenticate": "Bearer"},
            )
        session = self._session(request, "")
        session.authed = False
        ok = None
        if s.admin_password is not None:
            ok = commands.check_password(session, "admin", bearer)
        if not session.authed and s.password is not None:
            ok = commands.check_password(session, "default", bearer)
        if not session.authed:
            if ok is not None and hasattr(ok, "run"):
                await ok.run()  # the failed attempt's delay (once: one attempt)
            raise ApiError(
                "WRONGPASS",
                "invalid password",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return session

    async def run(self, argv: list[str], session: Session, pool: str | None) -> Any:
        """Plan ``argv`` as RESP would, against ``pool``; the reply value, or raise."""
        return await self.finish(self.plan(argv, session, pool), session)

    def plan(self, argv: list[str], session: Session, pool: str | None) -> Any:
        """``pool``: the pool the command addresses (``None``: none, as POOL CREATE)."""
        commands = self._ready_commands()
        if pool is not None:
            self._pool(pool)
            session.pool = pool
        plan = commands.plan(argv, session)
        self._raise_if_error(plan, session)
        return plan

    async def finish(self, plan: Any, session: Session) -> Any:
        reply = await execute(plan)
        self._raise_if_error(reply, session)
        return reply

    def _raise_if_error(self, value: Any, session: Session) -> None:
        if type(value) is Error:
            headers = {}
            if value.code == "BUSY":
                headers["Retry-After"] = str(max(1, math.ceil(session.retry_after)))
            raise ApiError(value.code, value.message, headers)

    async def listing(self, items: Any, format: Callable[[Any], Any]) -> list[Any]:
        """Format a long listing a slice at a time (others run between the slices)."""
        if len(items) <= SLICE:
            return [format(i) for i in items]
        out: list[Any] = []
        for start in range(0, len(items), SLICE):
            async with self._heavy:
                out += [format(i) for i in items[start : start + SLICE]]
            await trio.lowlevel.checkpoint()
        return out

    async def reply(self, body: dict[str, Any], size: int = 0) -> Response:
        if size > BIG_LISTING:
            async with self._heavy:
                data = await trio.to_thread.run_sync(json.dumps, body)
            return Response(data, media_type="application/json")
        return JSONResponse(body)

    # -- routes ------------------------------------------------------------------

    def _build(self) -> FastAPI:
        api = FastAPI(
            title="tokenpool",
            version=__version__,
            description=(
                "Finite pools of tokens leased to users for a limited time. The paths"
                " under /api address the pool `default`; the same paths under"
                " /api/pools/{pool} address a named pool. Errors are"
                ' {"error": {"code", "message"}} with the library\'s codes.'
            ),
        )
        api.state.owner = self

        @api.exception_handler(ApiError)
        async def api_error(request: Request, error: ApiError) -> Response:
            if self.commands is not None:
                self.commands.errors += 1
            return _error_response(error.code, error.message, error.headers)

        @api.exception_handler(RequestValidationError)
        async def invalid(request: Request, error: RequestValidationError) -> Response:
            problems = []
            for item in error.errors()[:5]:
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
            if self.commands is not None:
                self.commands.errors += 1
            return _error_response("INVALID", "; ".join(problems) or "invalid request")

        @api.exception_handler(Exception)
        async def internal(request: Request, error: Exception) -> Response:
            log.error(
                "http_internal_error",
                path=request.url.path[:200],
                error=f"{type(error).__name__}: {error}"[:500],
                exc_info=error,
            )
            return _error_response("ERR", f"internal error: {type(error).__name__}")

        @api.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, error: StarletteHTTPException) -> Response:
            if error.status_code == 400:  # a body that is not JSON (or not UTF-8)
                return _error_response("INVALID", f"the request body: {error.detail}")
            code = {404: "NOTFOUND", 405: "METHOD"}.get(error.status_code, "ERR")
            return JSONResponse(
                {"error": {"code": code, "message": str(error.detail)}},
                status_code=error.status_code,
                headers=getattr(error, "headers", None),
            )

        def route(
            method: str, path: str, *, pooled: bool = True, **options: Any
        ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
            """Register ``fn`` at ``/api<path>`` (pool default) and at
            ``/api/pools/{pool}<path>``."""

            def register(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
                options.setdefault("responses", ErrorCodes)
                api.add_api_route(
                    f"/api/pools/{{pool}}{path}", fn, methods=[method], name=fn.__name__, **options
                )
                if pooled:
                    signature = inspect.signature(fn)

                    async def default(**kwargs: Any) -> Any:
                        return await fn(pool=self.default_pool, **kwargs)

                    default.__signature__ = signature.replace(  # type: ignore[attr-defined]
                        parameters=[p for n, p in signature.parameters.items() if n != "pool"]
                    )
                    default.__name__ = fn.__name__
                    default.__doc__ = fn.__doc__
                    api.add_api_route(
                        f"/api{path}",
                        default,
                        methods=[method],
                        name=fn.__name__,
                        operation_id=f"{fn.__name__}_default",
                        **options,
                    )
                return fn

            return register

        # -- leases --

        @route("POST", "/tokens/activate", responses={**ErrorCodes, 200: {"model": LeaseReply}})
        async def activate(
            pool: PoolName, session: Authed, request: Request, body: Annotated[ActivateIn, Body()]
        ) -> Response:
            """Lease a token to `user_id` (the one it holds already, renewed, if any).

            A full pool evicts the oldest lease, refuses (409 FULL), or, with `wait`,
            waits up to that many seconds for a token.
            """
            argv = ["ACTIVATE", body.user_id]
            if body.wait:
                argv += ["WAIT", _seconds(body.wait)]
            plan = self.plan(argv, session, pool)
            if type(plan) is Deferred and plan.waits:
                return JSONResponse({"data": await self._waiting(plan, session, request)})
            return JSONResponse({"data": await self.finish(plan, session)})

        @route(
            "POST", "/tokens/{token_id}/renew", responses={**ErrorCodes, 200: {"model": LeaseReply}}
        )
        async def renew(
            pool: PoolName, token_id: TokenId, session: Authed, body: Annotated[RenewIn, Body()]
        ) -> Response:
            """Extend the lease `lease_id` of the token by the pool's ttl."""
            reply = await self.run(["RENEW", token_id, body.lease_id], session, pool)
            return JSONResponse({"data": reply})

        @route(
            "POST",
            "/tokens/{token_id}/release",
            responses={**ErrorCodes, 200: {"model": UsageReply}},
        )
        async def release(
            pool: PoolName,
            token_id: TokenId,
            session: Authed,
            body: Annotated[ReleaseIn | None, Body()] = None,
        ) -> Response:
            """End the token's lease now (reason `released`); with `user_id`, only if that
            user holds it (409 NOTHOLDER otherwise)."""
            argv = ["RELEASE", token_id]
            if body is not None and body.user_id is not None:
                argv.append(body.user_id)
            plan = self.plan(argv, session, pool)
            names = plan.pool.token_text
            plan = plan._replace(format=lambda pair: usage_fields(pair[0], names(pair[0].slot)))
            return JSONResponse({"data": await self.finish(plan, session)})

        @route(
            "GET",
            "/tokens/{token_id}/validate",
            responses={**ErrorCodes, 200: {"model": ValidReply}},
        )
        async def validate(
            pool: PoolName,
            token_id: TokenId,
            session: Authed,
            lease_id: Annotated[str, Query(pattern=UUID_PATTERN)],
        ) -> Response:
            """Whether `lease_id` is the token's current lease."""
            reply = await self.run(["VALIDATE", token_id, lease_id], session, pool)
            return JSONResponse({"data": {"valid": bool(reply)}})

        @route("POST", "/tokens/clear", responses={**ErrorCodes, 200: {"model": ClearReply}})
        async def clear(pool: PoolName, session: Authed) -> Response:
            """End every lease (reason `cleared`). With --admin-password, admin only."""
            reply = await self.run(["CLEAR"], session, pool)
            return JSONResponse(
                {"data": {"cleared_tokens": reply["cleared"], "revision": reply["revision"]}}
            )

        # -- tokens --

        @route("GET", "/tokens", responses={**ErrorCodes, 200: {"model": TokenListReply}})
        async def tokens(
            pool: PoolName,
            session: Authed,
            cursor: Annotated[
                str | None, Query(max_length=20, description="page from here")
            ] = None,
            count: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
        ) -> Response:
            """Every token with its holder (pools of up to 10,000 tokens); with `cursor`
            (start at 0), a page of `count` and the cursor of the next."""
            argv = (
                ["TOKENS"] if cursor is None else ["TOKENS", "CURSOR", cursor, "COUNT", str(count)]
            )
            reply = await self.run(argv, session, pool)
            assert type(reply) is Listing
            fmt = reply.format
            items = await self.listing(reply.items, lambda item: _token(fmt(item)))  # type: ignore[arg-type]
            following = None if reply.cursor in (None, "0") else reply.cursor
            return await self.reply({"data": items, "next_cursor": following}, len(items))

        @route("GET", "/tokens/{token_id}", responses={**ErrorCodes, 200: {"model": TokenReply}})
        async def token(pool: PoolName, token_id: TokenId, session: Authed) -> Response:
            """One token: its status, holder and current lease (`active_usage`)."""
            plan = self.plan(["TOKEN", token_id], session, pool)
            names = plan.pool.token_text

            def fmt(result: tuple[int, LeaseRecord | None]) -> dict[str, Any]:
                name = names(result[0])
                out = _token(token_fields(name, result[1]))
                out["active_usage"] = _active_usage(result[1], name)
                return out

            return JSONResponse({"data": await self.finish(plan._replace(format=fmt), session)})

        @route(
            "GET",
            "/tokens/{token_id}/history",
            responses={**ErrorCodes, 200: {"model": HistoryReply}},
        )
        async def history(
            pool: PoolName,
            token_id: TokenId,
            session: Authed,
            limit: Limit = 100,
            before: Before = None,
        ) -> Response:
            """The token's ended leases, newest first, a page at a time."""
            return await self._history(
                "HISTORY", "token_id", token_id, session, pool, limit, before
            )

        # -- users --

        @route(
            "GET",
            "/users/{user_id}/lease",
            responses={**ErrorCodes, 200: {"model": MaybeLeaseReply}},
        )
        async def user_lease(pool: PoolName, user_id: UserId, session: Authed) -> Response:
            """The lease `user_id` holds now, or null."""
            return JSONResponse({"data": await self.run(["LEASE", user_id], session, pool)})

        @route(
            "GET",
            "/users/{user_id}/history",
            responses={**ErrorCodes, 200: {"model": HistoryReply}},
        )
        async def user_history(
            pool: PoolName,
            user_id: UserId,
            session: Authed,
            limit: Limit = 100,
            before: Before = None,
        ) -> Response:
            """The user's ended leases, newest first, a page at a time."""
            return await self._history(
                "USERHISTORY", "user_id", user_id, session, pool, limit, before
            )

        # -- events --

        @route(
            "GET",
            "/events",
            responses={
                **ErrorCodes,
                200: {
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    "description": "one event per change; `id` is the revision",
                },
            },
            response_class=Response,
        )
        async def events(
            pool: PoolName,
            session: Authed,
            since: Annotated[
                int | None, Query(ge=0, le=2**63 - 1, description="replay after it")
            ] = None,
            last_event_id: Annotated[str | None, Header(max_length=20)] = None,
        ) -> Response:
            """The pool's changes as Server-Sent Events (`granted`, `renewed`, `ended`), each
            with its revision as `id`: a reconnecting EventSource resumes after the last
            one it saw (`Last-Event-ID`), or gets an `event: compacted` naming the oldest
            revision still held. A reader too slow gets `event: overflow` and the end."""
            target = self._pool(pool)
            if last_event_id:
                since = parse_int(last_event_id.strip(), "Last-Event-ID", 0, 2**63 - 1)
            if self.streams >= self.settings.max_streams or self.closing:
                raise ApiError(
                    "UNAVAILABLE",
                    f"{self.streams} event streams are open (the most this server serves)",
                    {"Retry-After": "5"},
                )
            self._count(session)
            return _EventStream(self, target, since)

        # -- pools --

        @api.get("/api/pools", responses={**ErrorCodes, 200: {"model": PoolListReply}})
        async def list_pools(session: Authed) -> Response:
            """Every pool served here, with its settings and counters."""
            commands = self._ready_commands()
            out = []
            for name in commands.pools.names():
                with contextlib.suppress(ApiError):
                    out.append(await self._pool_info(name, session))
            return JSONResponse({"data": out})

        @api.post("/api/pools", responses={**ErrorCodes, 200: {"model": PoolReply}})
        async def create_pool(session: Authed, body: Annotated[PoolIn, Body()]) -> Response:
            """Create a pool (409 EXISTS if the name is taken). With --admin-password,
            admin only."""
            argv = ["POOL", "CREATE", body.name, "SIZE", str(body.size), "TTL", _seconds(body.ttl)]
            argv += ["WHEN-FULL", body.when_full, "MIN-HOLD", _seconds(body.min_hold)]
            if body.max_lifetime is not None:
                argv += ["MAX-LIFETIME", _seconds(body.max_lifetime)]
            await self.run(argv, session, None)
            return JSONResponse({"data": await self._pool_info(body.name, session)})

        @api.get("/api/pools/{pool}", responses={**ErrorCodes, 200: {"model": PoolReply}})
        async def pool_info(pool: PoolName, session: Authed) -> Response:
            """A pool's settings and counters."""
            return JSONResponse({"data": await self._pool_info(pool, session)})

        @api.patch("/api/pools/{pool}", responses={**ErrorCodes, 200: {"model": PoolReply}})
        async def alter_pool(
            pool: PoolName, session: Authed, body: Annotated[PoolChange, Body()]
        ) -> Response:
            """Change a pool's settings (shrinking retires free tokens first, then evicts the
            oldest leases). With --admin-password, admin only."""
            argv = ["POOL", "ALTER", pool]
            if body.size is not None:
                argv += ["SIZE", str(body.size)]
            for key, option in (
                ("ttl", "TTL"),
                ("min_hold", "MIN-HOLD"),
                ("max_lifetime", "MAX-LIFETIME"),
            ):
                value = getattr(body, key)
                if value is not None:
                    argv += [option, _seconds(value)]
            if body.when_full is not None:
                argv += ["WHEN-FULL", body.when_full]
            await self.run(argv, session, pool)
            return JSONResponse({"data": await self._pool_info(pool, session)})

        @api.delete("/api/pools/{pool}", responses={**ErrorCodes, 200: {"model": DropReply}})
        async def drop_pool(pool: PoolName, session: Authed) -> Response:
            """Stop serving a pool: every lease ends (`cleared`); its tokens and history stay
            in the store. With --admin-password, admin only."""
            await self.run(["POOL", "DROP", pool], session, pool)
            return JSONResponse({"data": {"dropped": pool}})

        # -- operations --

        @api.get("/healthz", responses={200: {"description": "the process answers"}})
        async def healthz() -> Response:
            """The process is up and its event loop answers."""
            return JSONResponse({"status": "ok"})

        @api.get(
            "/readyz",
            responses={
                200: {"description": "ready"},
                503: {"description": "not ready, with the reasons"},
            },
        )
        async def readyz() -> Response:
            """Ready: recovery done, every pool's store link up and its backlog not full."""
            ready, reasons = self.readiness()
            return JSONResponse(
                {"status": "ready" if ready else "not ready", "reasons": reasons},
                status_code=200 if ready else 503,
            )

        @api.get(
            "/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}}
        )
        async def metrics() -> Response:
            """Prometheus text format: tokens, counters, write-behind, clients, latencies."""
            return Response(
                render(self.registry), media_type="text/plain; version=0.0.4; charset=utf-8"
            )

        @api.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def dashboard() -> Response:
            return HTMLResponse(_dashboard_page())

        return api

    # -- the parts of routes ---------------------------------------------------------

    def _pool(self, name: str) -> Pool:
        commands = self._ready_commands()
        try:
            return commands.pools.get(check_name(name))
        except TokenPoolError as error:
            raise ApiError(error.code, str(error)) from None

    def _count(self, session: Session) -> None:
        """A request that is not a command (an event stream) still spends the client's
        rate-limit budget."""
        commands = self._ready_commands()
        refused = commands.plan(["PING"], session)
        self._raise_if_error(refused, session)

    async def _pool_info(self, name: str, session: Session) -> dict[str, Any]:
        plan = self.plan(["POOL", "INFO", name], session, name)
        pool = plan.pool
        info: dict[str, Any] = await self.finish(
            plan._replace(format=lambda stats: _pool_info(pool, stats)), session
        )
        return info

    async def _history(
        self,
        command: str,
        key: str,
        value: str,
        session: Session,
        pool: str,
        limit: int,
        before: int | None,
    ) -> Response:
        argv = [command, value, "LIMIT", str(limit)]
        if before is not None:
            argv += ["BEFORE", str(before)]
        reply = await self.run(argv, session, pool)
        assert type(reply) is Listing
        usages = await self.listing(reply.items, reply.format)
        following = None if reply.cursor in (None, "0") else int(reply.cursor)
        body = {"data": {key: value, "usages": usages, "next_before": following}}
        return await self.reply(body, len(usages))

    async def _waiting(self, plan: Deferred, session: Session, request: Request) -> Any:
        """An activation that may wait: give the wait up (never granted) if the client
        hangs up meanwhile."""
        result: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def hang_up() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            async def wait() -> None:
                try:
                    result.append(await self.finish(plan, session))
                except ApiError as error:  # raised below, not as an exception group
                    result.append(error)
                nursery.cancel_scope.cancel()

            nursery.start_soon(hang_up)
            nursery.start_soon(wait)
        if result and isinstance(result[0], ApiError):
            raise result[0]
        if not result:
            raise ApiError("UNAVAILABLE", "the client hung up while waiting")
        return result[0]

    def readiness(self) -> tuple[bool, dict[str, str]]:
        if self.commands is None:
            return False, {"server": "recovering the pools from the store"}
        if self.closing:
            return False, {"server": "shutting down"}
        reasons: dict[str, str] = {}
        pools = self.commands.pools
        for name in pools.names():
            try:
                figures = pools.get(name).statistics()
                ok, why = pools.get(name).ready
            except TokenPoolError:
                continue
            writer = figures.writer
            if not ok:
                reasons[name] = why
            elif writer is not None and writer.link != "up":
                reasons[name] = f"the store link is {writer.link}"
        return not reasons, reasons


_page: str | None = None


def _dashboard_page() -> str:
    global _page
    if _page is None:
        _page = resources.files("tokenpool").joinpath("_dashboard.html").read_text()
    return _page


async def serve_http(
    app: HttpApp,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker until ``shutdown`` is set.

    ``task_status`` gets the port once the socket is bound (an error binding it is
    raised here, before that).
    """
    import socket

    from hypercorn.config import Config
    from hypercorn.trio import serve

    s = app.settings
    family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((s.host, s.port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = s.keep_alive
    config.graceful_timeout = s.graceful
    config.h11_max_incomplete_size = 16 * 1024
    config.include_server_header = False
    if s.certfile and s.keyfile:
        config.certfile = s.certfile
        config.keyfile = s.keyfile
    log.info("http_listening", host=s.host, port=port)
    task_status.started(port)
    await serve(app.asgi, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
