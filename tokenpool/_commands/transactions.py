"""Batches: many pool requests in ONE trip through a pool's actor.

``run_batch`` is the one engine: ``Commands.execute`` runs a request alone
through it, the RESP driver a pipeline's segment, and ``Transaction`` (``EXEC``)
a transaction: no other client's request runs between its requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._errors import InvalidArgumentError, TokenPoolError
from .._ops import Op
from ._base import REVISION_OP, PoolRequest, Request

if TYPE_CHECKING:
    from .._pool import PoolCore, Pools
    from .connection import Client

MULTI_MAX = 1024
"""Requests one transaction may hold."""
TX_COST = 256 * 1024
"""The most estimated reply bytes one transaction may cost: it is one actor batch and
one reply, so it cannot be cut into slices as a pipeline is."""


async def run_batch(core: PoolCore, requests: Sequence[PoolRequest]) -> list[Any]:
    """Every request's op (and, for revised ones, the revision after it) in one actor
    batch; a neutral result or an exception per request, in order. ``complete`` is
    left to the caller (it may read the store, outside any slot it holds)."""
    ops: list[Op] = []
    for request in requests:
        ops.append(request.op())
        if request.revised:
            ops.append(REVISION_OP)
    raw = await core.call(ops)
    out: list[Any] = []
    i = 0
    for request in requests:
        result = raw[i]
        i += 1
        revision = 0
        if request.revised:
            revision = raw[i]  # type: ignore[assignment]
            i += 1
        if not isinstance(result, BaseException):
            try:
                result = request.result(core, result, revision)
            except TokenPoolError as error:
                result = error
        out.append(result)
    return out


class Transaction(Request):
    """``MULTI``...``EXEC``: requests on one pool, applied as one actor batch.

    Bounded before it runs (``MULTI_MAX`` requests, ``TX_COST`` estimated reply
    bytes); refused whole otherwise, so nothing of it is applied."""

    __slots__ = ("requests",)
    name = "exec"

    def __init__(self, requests: Sequence[PoolRequest]) -> None:
        if len(requests) > MULTI_MAX:
            raise InvalidArgumentError(f"a transaction may hold at most {MULTI_MAX} commands")
        if len({r.pool for r in requests}) > 1:
            raise InvalidArgumentError("CROSSSLOT the commands of a transaction must name one pool")
        self.requests = list(requests)

    @property
    def cost(self) -> int:  # type: ignore[override]
        return sum(r.cost for r in self.requests)

    async def run(self, pools: Pools, client: Client) -> list[Any]:
        if not self.requests:
            return []
        core = pools.core(self.requests[0].pool)
        for request in self.requests:
            if request.prepares:
                request.prepare(core)
        cost = self.cost
        if cost > TX_COST:  # checked before any work: nothing was applied
            raise InvalidArgumentError(
                f"its replies would take about {cost:,} bytes, at most {TX_COST:,} in one"
                " transaction; page listings (TOKENS CURSOR 0 COUNT n, HISTORY LIMIT n) or"
                " send them outside MULTI"
            )
        results = await run_batch(core, self.requests)
        for i, request in enumerate(self.requests):
            if request.completes and not isinstance(results[i], BaseException):
                try:
                    results[i] = await request.complete(core, results[i])
                except TokenPoolError as error:
                    results[i] = error
        return results
