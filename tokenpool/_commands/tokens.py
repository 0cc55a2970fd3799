"""Tokens: TOKEN, TOKENS (whole or paged), SCAN, DBSIZE."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, overload

from .. import _ops as ops
from .._glob import check_pattern, matcher
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
    slice at a time; ``cursor``: the next page's (0 after the last), None when unpaged.
    Sent to a worker: (token id, lease) pairs with ``names`` ``str``, the pairs as
    ``TokenChunks`` on the wire and ``ChunkedItems`` once received."""

    items: Sequence[Any]  # (slot or token id, lease or None) pairs, or TokenChunks
    names: Callable[[Any], str]
    cursor: int | None

    def info(self, item: tuple[Any, LeaseRecord | None]) -> TokenInfo:
        return TokenInfo(self.names(item[0]), item[1])


class TokenChunks(NamedTuple):
    """A token listing on its way to an HTTP worker (or from another node): its
    (token id, lease) pairs pickled ``size`` at a time (``TokenList.items``, with
    ``names`` ``str``). The server pickles it a chunk per turn of its loop (10,000 pairs
    at once held the loop 25 ms), and a worker keeps these bytes, not 10,000 tuples,
    until it formats each slice (``ChunkedItems``)."""

    chunks: list[bytes]
    length: int
    size: int


class ChunkedItems(Sequence[tuple[str, "LeaseRecord | None"]]):
    """``TokenChunks`` as the items of a listing: ``len``, slices and iteration decode
    (``loads``) only the chunks they reach, the last one kept for the next slice."""

    def __init__(self, wire: TokenChunks, loads: Callable[[bytes], Any]) -> None:
        self._wire = wire
        self._loads = loads
        self._at = -1
        self._decoded: list[tuple[str, LeaseRecord | None]] = []

    def __len__(self) -> int:
        return self._wire.length

    def _chunk(self, n: int) -> list[tuple[str, LeaseRecord | None]]:
        if n != self._at:
            self._decoded, self._at = self._loads(self._wire.chunks[n]), n
        return self._decoded

    def __iter__(self) -> Iterator[tuple[str, LeaseRecord | None]]:
        for n in range(len(self._wire.chunks)):
            yield from self._chunk(n)

    @overload
    def __getitem__(self, index: int) -> tuple[str, LeaseRecord | None]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, LeaseRecord | None]]: ...

    def __getitem__(
        self, index: int | slice
    ) -> tuple[str, LeaseRecord | None] | list[tuple[str, LeaseRecord | None]]:
        size = self._wire.size
        if isinstance(index, int):
            at = range(len(self))[index]  # IndexError past the end, as a list's
            return self._chunk(at // size)[at % size]
        start, stop, step = index.indices(len(self))
        if step != 1:
            return list(self)[index]
        out: list[tuple[str, LeaseRecord | None]] = []
        for n in range(start // size, (stop - 1) // size + 1 if stop > start else 0):
            chunk = self._chunk(n)
            out += chunk[max(start - n * size, 0) : stop - n * size]
        return out


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
        self.match = None if match is None else check_pattern(match, "MATCH")

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
            matches = matcher(self.match)
            ids = [i for i in ids if matches(i)]
        return TokenIds(cursor, ids)
