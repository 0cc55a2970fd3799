"""Tokens: TOKEN, TOKENS (whole or paged), SCAN, DBSIZE."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import _ops as ops
from .._model import LeaseRecord
from .._settings import TOKENS_MAX, check_listing
from ._base import ITEM_COST, PoolRequest

if TYPE_CHECKING:
    from .._pool import PoolCore


class TokenInfo(NamedTuple):
    """One token and its lease (None while available)."""

    token_id: str
    lease: LeaseRecord | None


class TokenList(NamedTuple):
    """Tokens as (slot, lease) pairs with the slot->id map, formatted by the driver a
    slice at a time; ``cursor``: the next page's (0 after the last), None when unpaged."""

    items: Sequence[tuple[int, LeaseRecord | None]]
    names: Callable[[int], str]
    cursor: int | None

    def info(self, item: tuple[int, LeaseRecord | None]) -> TokenInfo:
        return TokenInfo(self.names(item[0]), item[1])


class SlotNames(dict[int, str]):
    """A listing's slot->id map as a plain value (a listing sent to an HTTP worker or
    another node: the pool's own lookup stays behind)."""

    def __call__(self, slot: int) -> str:
        return self[slot]


class TokenIds(NamedTuple):
    """A page of token ids (SCAN)."""

    cursor: int
    ids: list[str]


class Token(PoolRequest):
    __slots__ = ("token_id",)
    name = "token"

    def __init__(self, pool: str, token_id: str) -> None:
        self.pool = pool
        self.token_id = token_id

    def op(self) -> ops.Op:
        return ops.GetToken(self.token_id)

    def result(self, core: PoolCore, raw: Any, revision: int) -> TokenInfo:
        slot, lease = raw
        return TokenInfo(core.names(slot), lease)


class Tokens(PoolRequest):
    """Every token (``cursor`` None: pools of up to TOKENS_MAX), or a page of ``count``."""

    __slots__ = ("count", "cursor", "size")
    name = "tokens"
    prepares = True

    def __init__(self, pool: str, cursor: int | None = None, count: int = 100) -> None:
        self.pool = pool
        self.cursor = cursor
        self.count = count
        self.size = count

    @property
    def cost(self) -> int:  # type: ignore[override]
        return ITEM_COST * self.size

    def prepare(self, core: PoolCore) -> None:
        if self.cursor is None:
            self.size = check_listing(core.size)

    def op(self) -> ops.Op:
        if self.cursor is None:
            return ops.GetTokens(0, TOKENS_MAX)
        return ops.GetTokens(self.cursor, self.count)

    def result(self, core: PoolCore, raw: Any, revision: int) -> TokenList:
        cursor, pairs = raw
        return TokenList(pairs, core.names, None if self.cursor is None else cursor)


class Scan(PoolRequest):
    """As Redis's SCAN over the pool's token ids (``match``: a glob)."""

    __slots__ = ("count", "cursor", "match")
    name = "scan"

    def __init__(self, pool: str, cursor: int, count: int = 10, match: str | None = None) -> None:
        self.pool = pool
        self.cursor = cursor
        self.count = count
        self.match = match

    @property
    def cost(self) -> int:  # type: ignore[override]
        return 64 * self.count

    def op(self) -> ops.Op:
        return ops.GetTokens(self.cursor, self.count)

    def result(self, core: PoolCore, raw: Any, revision: int) -> TokenIds:
        cursor, pairs = raw
        names = core.names
        ids = [names(slot) for slot, _ in pairs]
        if self.match is not None:
            ids = [i for i in ids if fnmatch.fnmatchcase(i, self.match)]
        return TokenIds(cursor, ids)
