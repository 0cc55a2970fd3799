"""The routes: one ``APIRouter`` of the pool's routes, mounted twice (``/api`` for the
server's default pool, ``/api/pools/{pool}`` for a named one), the pools' routes
and the operations' (health, metrics, the dashboard). Each handler builds a typed
request from its validated input, executes it, and encodes the neutral result."""

from __future__ import annotations

import contextlib
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .._commands import (
    Activate,
    AlterPool,
    Clear,
    CreatePool,
    DropPool,
    GetPool,
    History,
    LeaseOf,
    Release,
    Renew,
    Token,
    TokenInfo,
    TokenList,
    Tokens,
    UserHistory,
    Validate,
)
from .._model import usage_value
from .._settings import (
    CURSOR,
    HISTORY_LIMIT,
    PAGE_COUNT,
    REVISION,
    PoolSettings,
    check_max_lifetime,
)
from .events import EventStream
from .replies import active_usage, lease_json, pool_json, token_json, usage_json
from .schemas import (
    BIG_LISTING,
    POOL_PATTERN,
    USER_PATTERN,
    UUID_PATTERN,
    ActivateIn,
    ApiError,
    ClearReply,
    DropReply,
    ErrorCodes,
    HistoryReply,
    LeaseReply,
    MaybeLeaseReply,
    PoolChange,
    PoolIn,
    PoolListReply,
    PoolReply,
    ReleaseIn,
    RenewIn,
    TokenListReply,
    TokenReply,
    UsageReply,
    ValidReply,
)

if TYPE_CHECKING:
    from .app import HttpApp


async def _owner(request: Request) -> HttpApp:
    """The app (async: FastAPI runs a plain ``def`` dependency in a worker thread)."""
    return _app_of(request)


def _app_of(request: Request) -> HttpApp:
    owner: HttpApp = request.app.state.owner
    return owner


Owner = Annotated["HttpApp", Depends(_owner)]


async def _named_pool(
    pool: Annotated[str, Path(description="a pool name", pattern=POOL_PATTERN, max_length=64)],
) -> None:
    """Declares (and checks) ``{pool}`` for the ``/api/pools/{pool}`` mount."""


PoolPath = Annotated[str, Path(description="a pool name", pattern=POOL_PATTERN, max_length=64)]

_bearer = HTTPBearer(auto_error=False, description="the --requirepass password")


class Call:
    """What every route needs, from one dependency (each costs FastAPI a resolution):
    the app, the authenticated client, and the pool the path addresses (the default
    pool under ``/api``)."""

    __slots__ = ("client", "owner", "pool")

    def __init__(self, owner: HttpApp, client: Any, pool: str) -> None:
        self.owner = owner
        self.client = client
        self.pool = pool


async def _authorized(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Call:
    owner = _app_of(request)
    bearer = credentials.credentials if credentials else None
    client = await owner.authenticate(request, bearer)
    named = request.path_params.get("pool")
    return Call(owner, client, owner.default_pool if named is None else str(named))


Authed = Annotated[Call, Depends(_authorized)]
TokenId = Annotated[str, Path(description="a token id (UUID)", pattern=UUID_PATTERN)]
UserId = Annotated[
    str, Path(description="a user id", min_length=1, max_length=128, pattern=USER_PATTERN)
]
Limit = Annotated[
    int, Query(ge=HISTORY_LIMIT.low, le=HISTORY_LIMIT.high, description="entries on the page")
]
Before = Annotated[
    int | None, Query(ge=1, le=2**63 - 1, description="the next_before of the previous page")
]


router = APIRouter()
"""The pool's routes: mounted at /api (the default call.pool) and /api/pools/{pool}."""
pools_router = APIRouter()
operations = APIRouter()


# -- leases --


@router.api_route(
    "/tokens/activate", methods=["POST"], responses={**ErrorCodes, 200: {"model": LeaseReply}}
)
async def activate(
    call: Authed,
    request: Request,
    body: Annotated[ActivateIn, Body()],
) -> Response:
    """Lease a token to `user_id` (the one it holds already, if any).

    A full pool evicts the oldest lease, refuses (409 FULL), or, with `wait`,
    waits up to that many seconds for a token.
    """
    command = Activate(call.pool, body.user_id, body.wait)
    if command.waits:
        granted = await call.owner.waiting(command, call.client, request)
    else:
        granted = await call.owner.execute(command, call.client)
    return JSONResponse({"data": lease_json(granted)})


@router.api_route(
    "/tokens/{token_id}/renew",
    methods=["POST"],
    responses={**ErrorCodes, 200: {"model": LeaseReply}},
)
async def renew(
    token_id: TokenId,
    call: Authed,
    body: Annotated[RenewIn, Body()],
) -> Response:
    """Extend the lease `lease_id` of the token by the pool's ttl."""
    granted = await call.owner.execute(Renew(call.pool, token_id, body.lease_id), call.client)
    return JSONResponse({"data": lease_json(granted)})


@router.api_route(
    "/tokens/{token_id}/release",
    methods=["POST"],
    responses={**ErrorCodes, 200: {"model": UsageReply}},
)
async def release(
    token_id: TokenId,
    call: Authed,
    body: Annotated[ReleaseIn | None, Body()] = None,
) -> Response:
    """End the token's lease now (reason `released`); with `user_id`, only if that
    user holds it (409 NOTHOLDER otherwise)."""
    user = None if body is None else body.user_id
    released = await call.owner.execute(Release(call.pool, token_id, user), call.client)
    ended = released.usage
    usage = usage_value(ended, released.token_id)
    return JSONResponse({"data": usage_json(usage)})


@router.api_route(
    "/tokens/{token_id}/validate",
    methods=["GET"],
    responses={**ErrorCodes, 200: {"model": ValidReply}},
)
async def validate(
    token_id: TokenId,
    call: Authed,
    lease_id: Annotated[str, Query(pattern=UUID_PATTERN)],
) -> Response:
    """Whether `lease_id` is the token's current lease."""
    valid = await call.owner.execute(Validate(call.pool, token_id, lease_id), call.client)
    return JSONResponse({"data": {"valid": valid}})


@router.api_route(
    "/tokens/clear", methods=["POST"], responses={**ErrorCodes, 200: {"model": ClearReply}}
)
async def clear(call: Authed) -> Response:
    """End every lease (reason `cleared`). With --admin-password, admin only."""
    cleared = await call.owner.execute(Clear(call.pool), call.client)
    return JSONResponse({"data": {"cleared_tokens": cleared.ended, "revision": cleared.revision}})


# -- tokens --


@router.api_route(
    "/tokens", methods=["GET"], responses={**ErrorCodes, 200: {"model": TokenListReply}}
)
async def tokens(
    call: Authed,
    cursor: Annotated[str | None, Query(max_length=20, description="page from here")] = None,
    count: Annotated[int | None, Query(ge=1, le=PAGE_COUNT.high)] = None,
) -> Response:
    """Every token with its holder (pools of up to 10,000 tokens); with `cursor` or
    `count` (a cursor starts at 0, the default), a page of `count` (default 100) and
    the cursor of the next."""
    start = None if cursor is None else int(CURSOR.parse(cursor))
    if count is not None and start is None:
        start = 0  # a count asks for a page: the first one
    count = 100 if count is None else count
    async with call.owner.large_listing(start is None or count > BIG_LISTING) as slot:
        listed: TokenList = await call.owner.execute(Tokens(call.pool, start, count), call.client)
        info = listed.info
        following = None if not listed.cursor else str(listed.cursor)
        return await call.owner.listed(
            listed.items,
            lambda item: token_json(info(item)),
            lambda items: {"data": items, "next_cursor": following},
            slot,
        )


@router.api_route(
    "/tokens/{token_id}", methods=["GET"], responses={**ErrorCodes, 200: {"model": TokenReply}}
)
async def token(token_id: TokenId, call: Authed) -> Response:
    """One token: its status, holder and current lease (`active_usage`)."""
    info: TokenInfo = await call.owner.execute(Token(call.pool, token_id), call.client)
    data = token_json(info)
    data["active_usage"] = active_usage(info.lease)
    return JSONResponse({"data": data})


@router.api_route(
    "/tokens/{token_id}/history",
    methods=["GET"],
    responses={**ErrorCodes, 200: {"model": HistoryReply}},
)
async def history(
    token_id: TokenId,
    call: Authed,
    limit: Limit = 100,
    before: Before = None,
) -> Response:
    """The token's ended leases, newest first, a page at a time."""
    async with call.owner.large_listing(limit > BIG_LISTING) as slot:
        page = await call.owner.execute(History(call.pool, token_id, limit, before), call.client)
        return await call.owner.page("token_id", token_id, page, slot)


# -- users --


@router.api_route(
    "/users/{user_id:path}/lease",
    methods=["GET"],
    responses={**ErrorCodes, 200: {"model": MaybeLeaseReply}},
)
async def user_lease(user_id: UserId, call: Authed) -> Response:
    """The lease `user_id` holds now, or null."""
    granted = await call.owner.execute(LeaseOf(call.pool, user_id), call.client)
    return JSONResponse({"data": None if granted is None else lease_json(granted)})


@router.api_route(
    "/users/{user_id:path}/history",
    methods=["GET"],
    responses={**ErrorCodes, 200: {"model": HistoryReply}},
)
async def user_history(
    user_id: UserId,
    call: Authed,
    limit: Limit = 100,
    before: Before = None,
) -> Response:
    """The user's ended leases, newest first, a page at a time."""
    async with call.owner.large_listing(limit > BIG_LISTING) as slot:
        page = await call.owner.execute(UserHistory(call.pool, user_id, limit, before), call.client)
        return await call.owner.page("user_id", user_id, page, slot)


# -- events --


@router.api_route(
    "/events",
    methods=["GET"],
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
    call: Authed,
    since: Annotated[
        int | None, Query(ge=0, le=REVISION.high, description="replay after it")
    ] = None,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> Response:
    """The pool's changes as Server-Sent Events (`granted`, `renewed`, `ended`), each
    with its revision as `id`: a reconnecting EventSource resumes after the last
    one it saw (`Last-Event-ID`), or gets an `event: compacted` naming the oldest
    revision still held. A reader too slow gets `event: overflow` and the end; the
    stream of a pool that is dropped ends after its `cleared` events."""
    if last_event_id:
        since = int(REVISION.parse(last_event_id.strip(), "Last-Event-ID"))
    if call.owner.streams >= call.owner.settings.max_streams or call.owner.closing:
        raise ApiError(
            "UNAVAILABLE",
            f"{call.owner.streams} event streams are open (the most this server serves)",
            {"Retry-After": "5"},
        )
    source = await call.owner.events(call.pool, call.client)  # a stream is a request too
    return EventStream(call.owner, source, since)


# -- pools --


@pools_router.get("/pools", responses={**ErrorCodes, 200: {"model": PoolListReply}})
async def list_pools(call: Authed) -> Response:
    """Every pool served here, with its settings and counters."""
    out = []
    for name in await call.owner.pool_names(call.client):
        with contextlib.suppress(ApiError):
            out.append(pool_json(await call.owner.execute(GetPool(name), call.client)))
    return JSONResponse({"data": out})


@pools_router.post("/pools", responses={**ErrorCodes, 200: {"model": PoolReply}})
async def create_pool(call: Authed, body: Annotated[PoolIn, Body()]) -> Response:
    """Create a pool (409 EXISTS if the name is taken). With --admin-password,
    admin only."""
    settings = PoolSettings.make(  # a refusal is INVALID (422), by the app's handler
        size=body.size,
        ttl=body.ttl,
        when_full=body.when_full,
        min_hold=body.min_hold,
        max_lifetime=check_max_lifetime(body.max_lifetime),
    )
    await call.owner.execute(CreatePool(body.name, settings), call.client)
    return JSONResponse(
        {"data": pool_json(await call.owner.execute(GetPool(body.name), call.client))}
    )


@pools_router.get("/pools/{pool}", responses={**ErrorCodes, 200: {"model": PoolReply}})
async def pool_info(pool: PoolPath, call: Authed) -> Response:
    """A pool's settings and counters."""
    return JSONResponse({"data": pool_json(await call.owner.execute(GetPool(pool), call.client))})


@pools_router.patch("/pools/{pool}", responses={**ErrorCodes, 200: {"model": PoolReply}})
async def alter_pool(pool: PoolPath, call: Authed, body: Annotated[PoolChange, Body()]) -> Response:
    """Change a pool's settings (shrinking retires free tokens first, then evicts the
    oldest leases; `max_lifetime` 0 removes the cap). With --admin-password, admin
    only."""
    changes = {k: v for k, v in body.model_dump().items() if v is not None}
    if "max_lifetime" in changes:
        changes["max_lifetime"] = check_max_lifetime(changes["max_lifetime"])
    await call.owner.execute(AlterPool(pool, changes), call.client)
    return JSONResponse({"data": pool_json(await call.owner.execute(GetPool(pool), call.client))})


@pools_router.delete("/pools/{pool}", responses={**ErrorCodes, 200: {"model": DropReply}})
async def drop_pool(pool: PoolPath, call: Authed) -> Response:
    """Stop serving a pool: every lease ends (`cleared`); its tokens and history stay
    in the store. With --admin-password, admin only."""
    await call.owner.execute(DropPool(pool), call.client)
    return JSONResponse({"data": {"dropped": pool}})


@pools_router.get("/cluster", responses={**ErrorCodes, 200: {"description": "the members"}})
async def cluster_view(call: Authed) -> Response:
    """The cluster (`--node-id`): its state, this node's lease and slots, and every
    member with its address, state, health and slots. `{"enabled": false}` when the
    server is not a cluster node."""
    return JSONResponse({"data": await call.owner.cluster()})


# -- operations --


@operations.get(
    "/healthz",
    responses={
        200: {"description": "the server answers"},
        503: {"description": "a worker answers, its server does not"},
    },
)
async def healthz(owner: Owner) -> Response:
    """The server's event loop answers: in-process, this answer is its loop's; through a
    worker, the worker asks the server (a `PING` over its link) and says 503 when no
    answer comes within 0.8 s, so a probe never vouches for a wedged server."""
    why = await owner.liveness()
    if why is None:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "down", "reason": why}, status_code=503)


@operations.get(
    "/readyz",
    responses={
        200: {"description": "ready"},
        503: {"description": "not ready, with the reasons"},
    },
)
async def readyz(owner: Owner) -> Response:
    """Ready: recovery done, every pool's store link up and its backlog not full."""
    ready, reasons = await owner.readiness()
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "reasons": reasons},
        status_code=200 if ready else 503,
    )


@operations.get(
    "/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}}
)
async def metrics(owner: Owner) -> Response:
    """Prometheus text format: tokens, counters, write-behind, clients, latencies."""
    text = await owner.metrics()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@operations.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> Response:
    return HTMLResponse(_dashboard_page())


# HEAD answers as GET without the body (hypercorn drops it) for what probes and
# monitors ask: outside the schema, whose operation ids are one per route and method
for _path, _probe in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)):
    operations.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False)
operations.add_api_route("/", dashboard, methods=["HEAD"], include_in_schema=False)


_page: str | None = None


def _dashboard_page() -> str:
    global _page
    if _page is None:
        _page = resources.files("tokenpool").joinpath("_dashboard.html").read_text()
    return _page
