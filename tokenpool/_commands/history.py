"""The usage history: HISTORY (a token's ended leases) and USERHISTORY (a user's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from .. import _ops as ops
from .._model import Page
from ._base import ITEM_COST, PoolRequest

if TYPE_CHECKING:
    from .._pool import PoolCore


class PageChunks(NamedTuple):
    """A history page on its way to an HTTP worker (or from another node): its usages
    pickled ``CHUNK`` at a time, so the server pickles a page of 10,000 a chunk per turn
    of its loop (at once it held the loop about 7 ms); made a ``Page`` again on receipt."""

    chunks: list[bytes]
    next_before: int | None


class _HistoryPage(PoolRequest):
    """A page of ended leases, newest first, ended before ``before``: what ``History``
    and ``UserHistory`` share (their cost is known from ``limit`` before any work).

    The part memory holds is read at the request's place in its batch; older
    entries come from the store after the batch (``complete``), so the page is one
    snapshot even while leases keep ending."""

    __slots__ = ("before", "limit")
    completes = True

    def __init__(self, pool: str, limit: int, before: int | None) -> None:
        self.pool = pool
        self.limit = limit
        self.before = before

    @property
    def cost(self) -> int:  # type: ignore[override]
        return ITEM_COST * self.limit


class History(_HistoryPage):
    """A page of the token's ended leases."""

    __slots__ = ("token_id",)
    name = "history"

    def __init__(self, pool: str, token_id: str, limit: int = 100, before: int | None = None):
        super().__init__(pool, limit, before)
        self.token_id = token_id

    def op(self) -> ops.Op:
        return ops.GetHistory(self.token_id, self.limit, self.before)

    async def complete(self, core: PoolCore, result: Any) -> Page:
        return await core.complete_history(result, self.token_id, None, self.limit)


class UserHistory(_HistoryPage):
    """A page of the leases one user held in ``pool``."""

    __slots__ = ("user_id",)
    name = "userhistory"

    def __init__(self, pool: str, user_id: str, limit: int = 100, before: int | None = None):
        super().__init__(pool, limit, before)
        self.user_id = user_id

    def op(self) -> ops.Op:
        return ops.GetUserHistory(self.user_id, self.limit, self.before)

    async def complete(self, core: PoolCore, result: Any) -> Page:
        return await core.complete_history(result, None, self.user_id, self.limit)
