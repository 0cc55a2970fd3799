"""Operations as values, so one actor message can carry many of them.

``Pool.batch([...])`` sends a list of these in one message; the actor applies
them in order and answers each (a result, or the ``TokenPoolError`` it
raised), the way a Redis pipeline answers each command. The RESP server turns
a pipeline of commands into one batch.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

import attrs

from ._errors import InvalidArgumentError
from ._model import Change, Lease, Stats, TokenStatus, Usage
from ._state import PoolState


@attrs.frozen(slots=True)
class Op:
    """Base of the operations. ``writes``: the op may add changes for the store."""

    writes: ClassVar[bool] = False
    needs_room: ClassVar[bool] = False  # refused while the store's backlog is full

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> object:
        raise NotImplementedError


@attrs.frozen(slots=True)
class Activate(Op):
    """``pool.activate(user_id)``: the user's lease."""

    user_id: str
    writes: ClassVar[bool] = True
    needs_room: ClassVar[bool] = True

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> Lease:
        lease, made = state.activate(self.user_id, now)
        changes += made
        return lease


@attrs.frozen(slots=True)
class ActivateMany(Op):
    """``pool.activate_many(user_ids)``: a lease (or an ``InvalidArgumentError``) per user."""

    user_ids: tuple[str, ...]
    writes: ClassVar[bool] = True
    needs_room: ClassVar[bool] = True

    def apply(
        self, state: PoolState, now: datetime, changes: list[Change]
    ) -> list[Lease | InvalidArgumentError]:
        results, made = state.activate_many(self.user_ids, now)
        changes += made
        return results


@attrs.frozen(slots=True)
class Release(Op):
    """``pool.release(token_id, user_id=None)``: the usage entry of the ended lease."""

    token_id: str
    user_id: str | None = None
    writes: ClassVar[bool] = True

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> Usage:
        usage, made = state.release(self.token_id, self.user_id, now)
        changes += made
        return usage


@attrs.frozen(slots=True)
class ReleaseLease(Op):
    """End exactly this lease if it is still current (the undo of a grant nobody received)."""

    token_id: str
    lease_id: str
    writes: ClassVar[bool] = True

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> None:
        changes += state.release_lease(self.token_id, self.lease_id, now)


@attrs.frozen(slots=True)
class Renew(Op):
    """``pool.renew(token_id, lease_id)``: the renewed lease."""

    token_id: str
    lease_id: str
    writes: ClassVar[bool] = True
    needs_room: ClassVar[bool] = True

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> Lease:
        lease, made = state.renew(self.token_id, self.lease_id, now)
        changes += made
        return lease


@attrs.frozen(slots=True)
class Clear(Op):
    """``pool.clear()``: how many leases ended."""

    writes: ClassVar[bool] = True

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> int:
        count, made = state.clear(now)
        changes += made
        return count


@attrs.frozen(slots=True)
class Validate(Op):
    """``pool.validate(token_id, lease_id)``: whether that lease is current."""

    token_id: str
    lease_id: str

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> bool:
        return state.validate(self.token_id, self.lease_id)


@attrs.frozen(slots=True)
class GetLease(Op):
    """``pool.lease_of(user_id)``: the user's lease or ``None``."""

    user_id: str

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> Lease | None:
        return state.lease_of(self.user_id)


@attrs.frozen(slots=True)
class GetToken(Op):
    """``pool.token(token_id)``: one token's status."""

    token_id: str

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> TokenStatus:
        return state.token(self.token_id)


@attrs.frozen(slots=True)
class GetTokens(Op):
    """``pool.tokens()``: every token's status."""

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> list[TokenStatus]:
        return state.tokens()


@attrs.frozen(slots=True)
class GetHistory(Op):
    """``pool.history(token_id, limit)``: the history kept in memory, newest first."""

    token_id: str
    limit: int = 100

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> list[Usage]:
        return state.history(self.token_id, self.limit)


@attrs.frozen(slots=True)
class Revision(Op):
    """The pool's revision now. The RESP server sends one after each mutating command
    in the same batch, so the reply can carry the revision that applied it."""

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> int:
        return state.revision


@attrs.frozen(slots=True)
class GetStats(Op):
    """``pool.stats()``: the pool's counters (the store's figures are added by the pool)."""

    def apply(self, state: PoolState, now: datetime, changes: list[Change]) -> Stats:
        return state.stats()
