"""The HTTP app: the request flow every route shares (who the client is, executing a
request, errors as the documented shape), readiness, and the FastAPI app itself."""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .._commands import Activate, Commands
from .._commands import Request as Command
from .._commands.analytics import keep_rolled_up
from .._errors import TokenPoolError
from .._log import get_logger
from .._metrics import Latencies, TokenpoolCollector, render
from .._model import Page
from .._series import Sampler, SeriesBook, store_backfill
from .._settings import LOOPBACK_NAMES
from . import analytics, routes
from .backend import AUTH_REQUIRED, Backend, EventSource, LocalBackend
from .fast import FastActivate
from .middleware import BrowserGuard, Outer
from .replies import usage_json
from .schemas import BIG_LISTING, SLICE, ApiError, api_error, error_response, plain_problem
from .tracing import TracedApp

if TYPE_CHECKING:
    from .._pool import Pools
    from .._server import RespServer

log = get_logger("tokenpool.http")

LARGE_REPLIES = 2
"""Listings that may pass ``BIG_LISTING`` items one process fetches, builds and sends at
once, each holding its slot from before it is fetched until its body is sent (RESP's
``LARGE_REPLIES``): clients that ask and never read hold a slot each, not megabytes more
each (issue 19: 300 unread ``GET /api/tokens`` took +700 MB). One that waits past
--idle-timeout for a slot is 503."""


class LargeSlot:
    """One of the slots of ``LARGE_REPLIES``, held by one listing."""

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self.limiter = limiter
        self.handed = False  # to its response, which gives it back once sent

    def release(self) -> None:
        self.limiter.release_on_behalf_of(self)


class _Streamed(StreamingResponse):
    """A large listing's JSON, encoded and sent a slice at a time: a client that stops
    reading holds its slot and the compact listing, not the listing as dicts and
    megabytes of JSON (issue 19: a worker kept +40 MB of heap after building them
    whole). The slot is given back once the body is sent (or its send failed), and if
    it is never sent, when the response is collected."""

    def __init__(self, chunks: AsyncIterator[str], slot: LargeSlot | None) -> None:
        super().__init__(chunks, media_type="application/json")
        self._release: Callable[[], Any] = lambda: None
        if slot is not None:
            slot.handed = True
            self._release = weakref.finalize(self, slot.release)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _json(value: Any) -> str:
    """JSON as a small reply's (``JSONResponse``): compact, UTF-8."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


_ITEMS = "\x00items\x00"  # where a listing's items go in its body (a user value never
# holds NUL: ids are printable)


@attrs.frozen
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 4000
    max_streams: int = 1_000  # event streams open at once
    keep_alive: float = 5.0
    graceful: float = 2.0  # seconds requests in flight get at shutdown
    certfile: str | None = None  # with keyfile: HTTPS only (as --tls-cert makes RESP TLS only)
    keyfile: str | None = None
    allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES  # None: any (--http-allowed-hosts '*')
    idle_timeout: float = 30.0  # seconds a request's body may take (--idle-timeout)


@attrs.frozen
class HttpStatistics:
    requests: int
    errors: int
    in_flight: int
    streams: int
    auth_failures: int


class HttpApp:
    """The ASGI app. ``attach()`` gives it the pools once they are recovered; until
    then ``/api`` answers 503 and ``/readyz`` says why."""

    def __init__(self, settings: HttpSettings, latencies: Latencies) -> None:
        self.settings = settings
        self.latencies = latencies
        self.commands: Commands | None = None  # the pools of this process, if served here
        self.backend: Backend | None = None
        self.resp: RespServer | None = None
        # The parent of HTTP workers: their figures, summed (requests, errors, in flight,
        # streams), for this process's /metrics (which the workers serve).
        self.remote_figures: Callable[[], dict[str, int]] | None = None
        self.in_flight = 0
        self.streams = 0
        self.subscriptions: set[Any] = set()
        self.closing = False
        self._heavy: anyio.CapacityLimiter | None = None  # made in the serving event loop
        self._large: anyio.CapacityLimiter | None = None  # likewise
        self.requests = 0
        self.errors = 0
        self.series = SeriesBook()
        self._sampler = Sampler(self.series, self._pools, backfill=store_backfill)
        self.registry = CollectorRegistry()
        self.registry.register(TokenpoolCollector(self._pools, self._servers, latencies))
        self.api = self._build()
        self.outer = Outer(FastActivate(self.api, self), self, settings.idle_timeout)
        self.asgi = TracedApp(
            BrowserGuard(
                self.outer,
                settings.allowed_hosts,
            )
        )

    @property
    def default_pool(self) -> str:
        """The pool the paths without ``/pools/{pool}`` address (the flags' ``--name``)."""
        return "default" if self.backend is None else self.backend.default_pool

    def attach(self, commands: Commands, resp: RespServer | None = None) -> None:
        """Serve the pools of this process (``commands``, the RESP server's own)."""
        self.commands = commands
        self.resp = resp
        peers = None if resp is None else resp.planner.peers
        self.backend = LocalBackend(commands, peers)
        commands.pools.series = self.series  # what Series requests read, on any transport

    def attach_backend(self, backend: Backend) -> None:
        """Serve through ``backend`` (an HTTP worker: the server over RESP)."""
        self.backend = backend

    def close(self) -> None:
        """End every event stream (shutdown): their pools are about to close."""
        self.closing = True
        for subscription in list(self.subscriptions):
            subscription.close()

    async def sample(self) -> None:
        """Sample every pool's figures once a second for ``/series``, and keep the usage
        analytics' summary tables rolled up (until cancelled)."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._sampler.run)
            group.start_soon(keep_rolled_up, self._pools)

    def statistics(self) -> HttpStatistics:
        c = self.commands
        remote = {} if self.remote_figures is None else self.remote_figures()
        return HttpStatistics(
            requests=self.requests + remote.get("requests", 0),
            errors=self.errors + remote.get("errors", 0),
            in_flight=self.in_flight + remote.get("in_flight", 0),
            streams=self.streams + remote.get("streams", 0),
            auth_failures=0 if c is None else c.gate.auth_failures["http"],
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
            "clients": h.in_flight,  # an event stream is a request in flight: counted once
            "commands": h.requests,
            "errors": h.errors,
            "auth_failures": h.auth_failures,
            "rate_limited": 0 if self.commands is None else self.commands.gate.rate_limited["http"],
        }
        return out

    # -- running a command ---------------------------------------------------------

    def ready_backend(self) -> Backend:
        if self.backend is None or not self.backend.attached:
            raise ApiError("UNAVAILABLE", "the server is still recovering its pools")
        return self.backend

    async def authenticate(self, request: Request, bearer: str | None) -> Any:
        """The request's client: its address, and the password its bearer gives (if any)."""
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        return await self.caller(peer, bearer)

    async def caller(self, peer: str, bearer: str | None) -> Any:
        """The client at ``peer`` with the password ``bearer`` (or None), or ApiError."""
        backend = self.ready_backend()
        try:
            return await backend.caller(peer, bearer)
        except TokenPoolError as error:
            raise self.refusal(error) from None

    @staticmethod
    def refusal(error: TokenPoolError) -> ApiError:
        """A refusal as the API's error; a password's in the words of HTTP's bearers."""
        if error.code == "NOAUTH":
            return ApiError("NOAUTH", AUTH_REQUIRED, {"WWW-Authenticate": "Bearer"})
        if error.code == "WRONGPASS":
            return ApiError(
                "WRONGPASS",
                "invalid password",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if error.code == "ERR" and "AUTH" in str(error):  # a bearer, and no password is set
            return ApiError(
                "INVALID", str(error), {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        return api_error(error)

    async def execute(self, command: Command, client: Any) -> Any:
        """Run one request through the backend; its neutral result, or ApiError."""
        backend = self.ready_backend()
        self.requests += 1
        try:
            return await backend.execute(command, client)
        except TokenPoolError as error:
            raise self.refusal(error) from None

    async def pool_names(self, client: Any) -> list[str]:
        try:
            return await self.ready_backend().pool_names(client)
        except TokenPoolError as error:
            raise self.refusal(error) from None

    async def cluster(self) -> dict[str, Any]:
        try:
            return await self.ready_backend().cluster()
        except TokenPoolError as error:
            raise self.refusal(error) from None

    async def events(self, pool: str, client: Any) -> EventSource:
        try:
            return await self.ready_backend().events(pool, client)
        except TokenPoolError as error:
            raise self.refusal(error) from None

    def _heavy_slots(self) -> anyio.CapacityLimiter:
        if self._heavy is None:
            self._heavy = anyio.CapacityLimiter(2)
        return self._heavy

    async def listed(
        self,
        items: Sequence[Any],
        format: Callable[[Any], Any],
        body: Callable[[Any], dict[str, Any]],
        slot: LargeSlot | None = None,
    ) -> Response:
        """A listing's reply: ``body(items as JSON values)``. Up to ``BIG_LISTING`` items
        at once; past it, streamed, each slice formatted and encoded on its turn (others
        run between the slices)."""
        if len(items) <= BIG_LISTING:
            out: list[Any] = []
            for start in range(0, len(items), SLICE):
                if start:
                    await anyio.lowlevel.checkpoint()
                out += [format(i) for i in items[start : start + SLICE]]
            return JSONResponse(body(out))
        before, after = _json(body(_ITEMS)).split(_json(_ITEMS))
        return _Streamed(self._slices(items, format, before, after), slot)

    async def _slices(
        self, items: Sequence[Any], format: Callable[[Any], Any], before: str, after: str
    ) -> AsyncIterator[str]:
        yield before + "["
        for start in range(0, len(items), SLICE):
            if start:
                await anyio.lowlevel.checkpoint()  # a send may not wait: others run here
            chunk = _json([format(i) for i in items[start : start + SLICE]])[1:-1]
            yield chunk if not start else "," + chunk
        yield "]" + after

    @contextlib.asynccontextmanager
    async def large_listing(self, large: bool) -> AsyncIterator[LargeSlot | None]:
        """For a listing that may be ``large`` (past ``BIG_LISTING`` items): one of
        ``LARGE_REPLIES`` slots, from before it is fetched until its body is sent
        (``listed(..., slot)`` hands it to the response). 503 past --idle-timeout."""
        if not large:
            yield None
            return
        if self._large is None:
            self._large = anyio.CapacityLimiter(LARGE_REPLIES)
        slot = LargeSlot(self._large)
        with anyio.move_on_after(self.settings.idle_timeout):
            await self._large.acquire_on_behalf_of(slot)
        if slot not in self._large.statistics().borrowers:
            raise ApiError(
                "UNAVAILABLE", "too many large listings are being sent; retry", {"Retry-After": "1"}
            )
        try:
            yield slot
        finally:
            if not slot.handed:
                slot.release()

    async def reply(self, body: dict[str, Any], size: int = 0) -> Response:
        """A reply of about ``size`` values: past ``BIG_LISTING``, encoded in a thread."""
        if size > BIG_LISTING:
            async with self._heavy_slots():
                data = await anyio.to_thread.run_sync(json.dumps, body)
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
            docs_url=None,  # served below from the package's own copies: no CDN
            redoc_url=None,
        )
        api.state.owner = self
        _offline_docs(api)

        @api.exception_handler(ApiError)
        async def answer_api_error(request: Request, error: ApiError) -> Response:
            self.errors += 1
            return error_response(error.code, error.message, error.headers)

        @api.exception_handler(TokenPoolError)
        async def refused(request: Request, error: TokenPoolError) -> Response:
            # a refusal raised in a route outside execute() (an argument checked there, a
            # rate limit spent): its documented status, never a 500
            self.errors += 1
            refusal = api_error(error)
            return error_response(refusal.code, refusal.message, refusal.headers)

        @api.exception_handler(RequestValidationError)
        async def invalid(request: Request, error: RequestValidationError) -> Response:
            problems = [plain_problem(item) for item in error.errors()[:5]]
            self.errors += 1
            return error_response("INVALID", "; ".join(problems) or "invalid request")

        @api.exception_handler(Exception)
        async def internal(request: Request, error: Exception) -> Response:
            log.error(
                "http_internal_error",
                path=request.url.path[:200],
                error=f"{type(error).__name__}: {error}"[:500],
                exc_info=error,
            )
            return error_response("ERR", f"internal error: {type(error).__name__}")

        @api.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, error: StarletteHTTPException) -> Response:
            if error.status_code == 400:  # a body that is not JSON (or not UTF-8)
                return error_response("INVALID", f"the request body: {error.detail}")
            code = {404: "NOTFOUND", 405: "METHOD"}.get(error.status_code, "ERR")
            return JSONResponse(
                {"error": {"code": code, "message": str(error.detail)}},
                status_code=error.status_code,
                headers=getattr(error, "headers", None),
            )

        api.include_router(routes.router, prefix="/api")
        api.include_router(
            routes.router, prefix="/api/pools/{pool}", dependencies=[Depends(routes._named_pool)]
        )
        api.include_router(analytics.router, prefix="/api")
        api.include_router(
            analytics.router,
            prefix="/api/pools/{pool}",
            dependencies=[Depends(routes._named_pool)],
        )
        api.include_router(routes.pools_router, prefix="/api")
        api.include_router(routes.operations)
        return api

    # -- the parts of routes ---------------------------------------------------------

    async def page(
        self, key: str, value: str, page: Page, slot: LargeSlot | None = None
    ) -> Response:
        return await self.listed(
            page,
            usage_json,
            lambda usages: {
                "data": {key: value, "usages": usages, "next_before": page.next_before}
            },
            slot,
        )

    async def waiting(self, command: Activate, client: Any, request: Request) -> Any:
        """An activation that may wait: give the wait up (never granted, in this
        process; a worker's server finishes the wait) if the client hangs up meanwhile."""
        result: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def hang_up() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            async def wait() -> None:
                try:
                    result.append(await self.execute(command, client))
                except ApiError as error:  # raised below, not as an exception group
                    result.append(error)
                tg.cancel_scope.cancel()

            tg.start_soon(hang_up)
            tg.start_soon(wait)
        if result and isinstance(result[0], ApiError):
            raise result[0]
        if not result:
            raise ApiError("UNAVAILABLE", "the client hung up while waiting")
        return result[0]

    async def liveness(self) -> str | None:
        """None while the server's loop answers, else why not (``/healthz``)."""
        if self.backend is None:
            return None  # this process's loop answered; recovery is /readyz's business
        return await self.backend.alive()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        if self.backend is None or not self.backend.attached:
            return False, {"server": "recovering the pools from the store"}
        if self.closing:
            return False, {"server": "shutting down"}
        return await self.backend.readiness()

    async def metrics(self) -> bytes:
        """The Prometheus text: the server's (a worker asks it), else this registry's."""
        if self.backend is not None and self.backend.attached:
            text = await self.backend.metrics()
            if text is not None:
                return text
        return render(self.registry)


STATIC = Path(__file__).resolve().parent / "static"


def _offline_docs(api: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` from copies in the package (``static/``):
    FastAPI's defaults load them from a CDN, and are blank on a machine with no network."""
    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="tokenpool: the HTTP API",
            swagger_js_url="/static/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    @api.api_route("/redoc", methods=["GET", "HEAD"], include_in_schema=False)
    async def redoc() -> Response:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="tokenpool: the HTTP API",
            redoc_js_url="/static/redoc.standalone.js",
            redoc_favicon_url="data:,",
            with_google_fonts=False,
        )
