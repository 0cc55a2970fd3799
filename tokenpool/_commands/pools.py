"""Pools: their figures (STATS, POOL INFO, POOL LIST) and their shape (POOL CREATE,
ALTER, DROP: admin commands)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from .. import _ops as ops
from .._model import Stats
from .._settings import PoolSettings, check_name
from ._base import PoolRequest, Request

if TYPE_CHECKING:
    from .._pool import PoolCore, Pools
    from .connection import Client


class PoolInfo(NamedTuple):
    """A pool's name, settings and figures (its store's included)."""

    name: str
    settings: PoolSettings
    stats: Stats


class GetStats(PoolRequest):
    """The pool's counters and its store's state (``STATS``, ``INFO``, ``DBSIZE``)."""

    __slots__ = ()
    name = "stats"

    def op(self) -> ops.Op:
        return ops.GetStats()

    def result(self, core: PoolCore, raw: Stats, revision: int) -> Stats:
        return core.with_store(raw)


class GetPool(PoolRequest):
    """``POOL INFO``: settings and figures."""

    __slots__ = ()
    name = "pool_info"

    def op(self) -> ops.Op:
        return ops.GetStats()

    def result(self, core: PoolCore, raw: Stats, revision: int) -> PoolInfo:
        return PoolInfo(core.name, core.settings, core.with_store(raw))


class ListPools(Request):
    __slots__ = ()
    name = "pool_list"

    async def run(self, pools: Pools, client: Client) -> list[str]:
        return pools.names()


class CreatePool(Request):
    """Serve a new pool (or the store's pool of that name, with these settings)."""

    __slots__ = ("pool", "settings")
    name = "pool_create"
    admin = True

    def __init__(self, pool: str, settings: PoolSettings) -> None:
        self.pool = check_name(pool)
        self.settings = settings

    async def run(self, pools: Pools, client: Client) -> None:
        await pools.create(self.pool, self.settings)


class AlterPool(Request):
    """Change some of a pool's settings (``changes``: setting name -> value)."""

    __slots__ = ("changes", "pool")
    name = "pool_alter"
    admin = True

    def __init__(self, pool: str, changes: dict[str, Any]) -> None:
        self.pool = pool
        self.changes = changes

    async def run(self, pools: Pools, client: Client) -> PoolSettings:
        return await pools.alter(self.pool, **self.changes)


class DropPool(Request):
    __slots__ = ("pool",)
    name = "pool_drop"
    admin = True

    def __init__(self, pool: str) -> None:
        self.pool = pool

    async def run(self, pools: Pools, client: Client) -> int:
        return await pools.drop(self.pool)
