"""Batches: many pool requests in ONE trip through a pool's actor.

``run_batch`` is the one engine: ``Commands.execute`` runs a request alone
through it, the RESP driver a pipeline's segment and a transaction (``EXEC``,
bounded by ``MULTI_MAX`` and ``TX_COST`` before it runs): no other client's
request runs between a batch's requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import _trace
from .._errors import TokenPoolError
from .._ops import Op
from ._base import REVISION_OP, PoolRequest

if TYPE_CHECKING:
    from .._pool import PoolCore

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
    if _trace.on:
        return await _traced(core, requests, ops)
    raw = await core.call(ops)
    return _results(core, requests, raw)


async def _traced(core: PoolCore, requests: Sequence[PoolRequest], ops: list[Op]) -> list[Any]:
    """``run_batch`` with a span per request, linked from the actor batch that ran it."""
    spans = _trace.start_commands(core.name, requests)
    try:
        raw = await core.call(ops, trace=_trace.contexts(spans))
    except BaseException as error:
        _trace.end_commands(spans, [error] * len(spans))
        raise
    out = _results(core, requests, raw)
    _trace.end_commands(spans, out)
    return out


def _results(core: PoolCore, requests: Sequence[PoolRequest], raw: list[object]) -> list[Any]:
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
