"""The hot route without FastAPI: ``POST /api/tokens/activate`` (and under
``/api/pools/{pool}``) in its plain form, ``{"user_id": "<printable ASCII>"}``.

FastAPI's routing, dependency solving and pydantic validation cost several times
what the activation itself does (issue 19 measured a FastAPI route at a fifth of a
bare ASGI function's speed on the same server). This path answers the common case
with the same steps and bytes as the route: the same bearer rule, the same
``authenticate``/``execute`` of the app, the same ``lease_json`` in a
``JSONResponse``, the same error shape, timed under the route's name. Anything else
(a ``wait``, another field, a user id outside printable ASCII, a body that is not
JSON, an odd ``Authorization``) goes on to FastAPI, which answers it as documented.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from .._commands import Activate
from .._log import get_logger
from .._settings import check_name
from .replies import lease_json
from .schemas import ApiError, error_response

if TYPE_CHECKING:
    from .app import HttpApp

log = get_logger("tokenpool.http")

_SUFFIX = "/tokens/activate"
_POOLS = "/api/pools/"
_JSON_TYPE = (b"content-type", b"application/json")
_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
USER_MAX = 128  # characters (ASCII here: bytes too), as the schema's user_id


class _Route:
    """What ``Outer`` and the tracing read of a matched route: its name (the timing's
    label) and its template without the mount's prefix (the span's name), as FastAPI's."""

    name = "activate"
    path_format = "/tokens/activate"


_ROUTE = _Route()


def _pool_of(path: str, default: str) -> str | None:
    if path == "/api/tokens/activate":
        return default
    if path.startswith(_POOLS) and path.endswith(_SUFFIX):
        name = path[len(_POOLS) : -len(_SUFFIX)]
        if "/" in name:
            return None
        try:
            return check_name(name)
        except Exception:
            return None  # FastAPI answers it
    return None


class FastActivate:
    """ASGI: the plain activation answered here, everything else passed to ``app``."""

    def __init__(self, app: Any, owner: HttpApp) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        pool = _pool_of(scope["path"], self.owner.default_pool)
        if pool is None:
            await self.app(scope, receive, send)
            return
        message = await receive()  # the whole body: Outer read it already
        body = message.get("body", b"")
        user = _plain_user(body) if not message.get("more_body") else None
        bearer = _bearer(scope) if user is not None else None
        if user is None or bearer is False:
            await self.app(scope, _again(message, receive), send)
            return
        scope["route"] = _ROUTE
        owner = self.owner
        try:
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "?"
            caller = await owner.caller(peer, bearer)  # type: ignore[arg-type]
            granted = await owner.execute(Activate(pool, user), caller)
            body = _json({"data": lease_json(granted)}).encode()
        except ApiError as error:
            owner.errors += 1
            response = error_response(error.code, error.message, error.headers)
        except Exception as error:  # as the app's handler of the unexpected
            log.error(
                "http_internal_error",
                path=scope["path"][:200],
                error=f"{type(error).__name__}: {error}"[:500],
                exc_info=error,
            )
            response = error_response("ERR", f"internal error: {type(error).__name__}")
        else:
            # JSONResponse's bytes (compact, UTF-8, its two headers in its order),
            # written without making one (a tenth of a worker's time per request)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body)), _JSON_TYPE],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await response(scope, receive, send)


def _plain_user(body: bytes) -> str | None:
    """The user id of a body that is exactly ``{"user_id": "<printable ASCII>"}``."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # (nested past the parser's depth: FastAPI says 422)
        return None
    if type(data) is not dict or len(data) != 1:
        return None
    user = data.get("user_id")
    if (
        type(user) is not str
        or not 0 < len(user) <= USER_MAX
        or not user.isascii()
        or not user.isprintable()
        or " " in user
    ):
        return None
    return user


def _bearer(scope: Scope) -> str | bool | None:
    """The bearer's password; None without one; False for a header FastAPI must judge."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, credentials = text.partition(" ")
            if scheme.lower() != "bearer" or not credentials or " " in credentials:
                return False
            return credentials
    return None


def _again(message: Any, receive: Receive) -> Receive:
    """A receive that gives ``message`` first, then what the connection says."""
    pending = [message]

    async def replayed() -> Any:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
