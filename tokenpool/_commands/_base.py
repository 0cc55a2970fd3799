"""What every command is: a typed request, checked where it is built, with its cost.

A driver builds a request straight from its wire format (RESP arguments, an HTTP
body) and hands it to ``Commands.execute``; it gets back a neutral result (a
lease record with its token id, a page, a number, ``None``) or an error with a
stable code, and encodes it its own way. Nothing here knows a transport.

Two kinds of request:
- ``PoolRequest``: one op for one pool's actor, and how its raw result becomes
  the neutral result. Many of them (a RESP pipeline, a transaction) share one
  actor batch: ``run_batch``.
- ``Request`` with ``run``: anything else (pools created, dropped, listed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .._ops import Op, Revision

if TYPE_CHECKING:
    from .._pool import PoolCore, Pools
    from .connection import Client

bare = object.__new__
"""An object of a ``__slots__`` class without its ``__init__`` frame, its fields set by the
caller: the hot path's requests and ops (a test holds each such site to ``__init__``)."""

SMALL_COST = 256
"""Estimated reply bytes of a request that lists nothing."""
ITEM_COST = 320
"""Estimated reply bytes per listed token or history entry."""


class Request:
    """A command as a value. ``cost``: its reply's estimated size in bytes, known
    before any work, so a driver can bound what one client makes it do."""

    __slots__ = ()
    admin: ClassVar[bool] = False  # reshapes pools: needs the admin user when one is set
    cost: ClassVar[int] = SMALL_COST
    name: ClassVar[str] = "request"  # for metrics and messages

    async def run(self, pools: Pools, client: Client) -> Any:
        raise NotImplementedError

    def _fields(self) -> tuple[object, ...]:
        return tuple(
            getattr(self, n) for c in type(self).__mro__ for n in getattr(c, "__slots__", ())
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._fields()!r}"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))


class PoolRequest(Request):
    """One op for the actor of ``pool``. ``revised``: the reply carries the pool's
    revision after it (the batch reads it right after the op)."""

    __slots__ = ("pool",)
    revised: ClassVar[bool] = False
    prepares: ClassVar[bool] = False  # ``prepare`` has checks to make (most have none)
    completes: ClassVar[bool] = False  # ``complete`` must run after the batch (a store read)
    waits: bool = False
    """Whether it may wait (for a token): a driver ends its batch with it. A field, not a
    property: every request of a pipeline reads it (``Activate`` keeps its own)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool

    def prepare(self, core: PoolCore) -> None:
        """Checks that need the pool, before any work (a listing too large to answer)."""

    def op(self) -> Op:
        raise NotImplementedError

    def result(self, core: PoolCore, raw: Any, revision: int) -> Any:
        """The neutral result from the op's raw result (``revision``: see ``revised``)."""
        return raw

    async def complete(self, core: PoolCore, result: Any) -> Any:
        """Finish a result after the batch (``completes``): reads that need the store."""
        return result


REVISION_OP = Revision()
