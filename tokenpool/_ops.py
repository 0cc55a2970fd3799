"""Operations as values, so one actor message can carry many of them.

``Pool.batch([...])`` sends a list of these in one message; the actor applies
them in order and answers each (a result, or the ``TokenPoolError`` it
raised), the way a Redis pipeline answers each command. The command layer
turns a pipeline of commands into one batch.

``apply`` returns the state's own values (records, slots): the RESP layer
formats replies straight from them. ``value`` turns a result into the public
values (``Lease``, ``Usage``...) for library callers. Ops are plain classes
with ``__slots__``, not attrs: one is made per pipelined command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ._model import SLOT, lease_value, token_value, usage_value
from ._state import PoolState

Names = Callable[[int], str]  # slot -> token id


class Op:
    """Base of the operations. ``needs_room``: refused while the store's backlog is full;
    ``changes``: may change the state, so refused once the store is lost (a change
    that can never be written is not acknowledged)."""

    __slots__ = ()
    needs_room: ClassVar[bool] = False
    changes: ClassVar[bool] = False
    vouches: ClassVar[bool] = False
    """Its answer vouches for a lease (grants, renews, validates or shows a holder): a
    pool that cannot show it still owns its store refuses it (``UnavailableError``)."""

    cost: ClassVar[int] = 1
    """Work on the actor, in units of about one activation: it bounds a batch (a class
    attribute where it is constant, so reading it costs nothing on the hot path)."""

    def apply(self, state: PoolState, now: int) -> Any:
        raise NotImplementedError

    def value(self, result: Any, names: Names) -> Any:
        return result

    def _fields(self) -> tuple[object, ...]:
        names: tuple[str, ...] = self.__slots__
        return tuple(getattr(self, name) for name in names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._fields()!r}"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Op)
            and type(other) is type(self)
            and self._fields() == other._fields()
        )

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))


def _lease(result: Any, names: Names) -> Any:
    return None if result is None else lease_value(result, names(result[SLOT]))


class Activate(Op):
    """``pool.activate(user_id, wait=None)``: the user's lease."""

    __slots__ = ("user_id", "wait")
    vouches = True
    needs_room = True
    changes = True

    def __init__(self, user_id: str, wait: float | None = None) -> None:
        self.user_id = user_id
        self.wait = wait

    def apply(self, state: PoolState, now: int) -> Any:
        if self.wait:
            raise AssertionError("a waiting Activate is applied by the actor")  # pragma: no cover
        return state.activate(self.user_id, now)

    def value(self, result: Any, names: Names) -> Any:
        return _lease(result, names)


class ActivateMany(Op):
    """``pool.activate_many(user_ids)``: a lease (or an ``InvalidArgumentError``) per user."""

    __slots__ = ("user_ids",)
    vouches = True
    needs_room = True
    changes = True

    def __init__(self, user_ids: tuple[str, ...]) -> None:
        self.user_ids = user_ids

    @property
    def cost(self) -> int:  # type: ignore[override]
        return len(self.user_ids)

    def apply(self, state: PoolState, now: int) -> Any:
        activate = state.activate
        out: list[Any] = []
        for user_id in self.user_ids:
            try:
                out.append(activate(user_id, now))
            except Exception as error:  # InvalidArgumentError, FullError: a value per user
                out.append(error)
        return out

    def value(self, result: Any, names: Names) -> Any:
        return [r if isinstance(r, BaseException) else _lease(r, names) for r in result]


class Release(Op):
    """``pool.release(token_id, user_id=None)``: the usage entry of the ended lease."""

    __slots__ = ("token_id", "user_id")
    changes = True

    def __init__(self, token_id: str, user_id: str | None = None) -> None:
        self.token_id = token_id
        self.user_id = user_id

    def apply(self, state: PoolState, now: int) -> Any:
        return state.release(self.token_id, self.user_id, now)

    def value(self, result: Any, names: Names) -> Any:
        return usage_value(result, names(result[SLOT]))


class ReleaseLease(Op):
    """End exactly this lease if it is still current (the undo of a grant nobody received)."""

    __slots__ = ("lease_id", "slot")
    changes = True

    def __init__(self, slot: int, lease_id: str) -> None:
        self.slot = slot
        self.lease_id = lease_id

    def apply(self, state: PoolState, now: int) -> Any:
        state.release_lease(self.slot, self.lease_id, now)


class Renew(Op):
    """``pool.renew(token_id, lease_id)``: the renewed lease."""

    __slots__ = ("lease_id", "token_id")
    vouches = True
    needs_room = True
    changes = True

    def __init__(self, token_id: str, lease_id: str) -> None:
        self.token_id = token_id
        self.lease_id = lease_id

    def apply(self, state: PoolState, now: int) -> Any:
        return state.renew(self.token_id, self.lease_id, now)

    def value(self, result: Any, names: Names) -> Any:
        return _lease(result, names)


END_STEP = 2_000
"""Leases (or tokens) ended per actor batch by CLEAR, POOL DROP and a shrinking ALTER."""


class Clear(Op):
    """``pool.clear()``: how many leases ended (at most ``limit``, granted at or before
    revision ``before``: see ``PoolState.clear``)."""

    __slots__ = ("before", "limit")
    changes = True

    def __init__(self, limit: int | None = None, before: int | None = None) -> None:
        self.limit = limit
        self.before = before

    def apply(self, state: PoolState, now: int) -> int:
        return state.clear(now, self.limit, self.before)


class Validate(Op):
    """``pool.validate(token_id, lease_id)``: whether that lease is current."""

    __slots__ = ("lease_id", "token_id")
    vouches = True

    def __init__(self, token_id: str, lease_id: str) -> None:
        self.token_id = token_id
        self.lease_id = lease_id

    def apply(self, state: PoolState, now: int) -> bool:
        return state.validate(self.token_id, self.lease_id)


class GetLease(Op):
    """``pool.lease_of(user_id)``: the user's lease or ``None``."""

    __slots__ = ("user_id",)
    vouches = True

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id

    def apply(self, state: PoolState, now: int) -> Any:
        return state.lease_of(self.user_id)

    def value(self, result: Any, names: Names) -> Any:
        return _lease(result, names)


class GetToken(Op):
    """``pool.token(token_id)``: one token's status."""

    __slots__ = ("token_id",)
    vouches = True

    def __init__(self, token_id: str) -> None:
        self.token_id = token_id

    def apply(self, state: PoolState, now: int) -> Any:
        return state.token(self.token_id)

    def value(self, result: Any, names: Names) -> Any:
        return token_value(names(result[0]), result[1])


class GetTokens(Op):
    """``pool.tokens(cursor, count)``: a page of token statuses and the next cursor."""

    __slots__ = ("count", "cursor")
    vouches = True

    def __init__(self, cursor: int = 0, count: int = 1000) -> None:
        self.cursor = cursor
        self.count = count

    @property
    def cost(self) -> int:  # type: ignore[override]
        return 1 + self.count // 50

    def apply(self, state: PoolState, now: int) -> Any:
        return state.tokens_page(self.cursor, self.count)

    def value(self, result: Any, names: Names) -> Any:
        cursor, page = result
        return cursor, [token_value(names(slot), lease) for slot, lease in page]


class GetHistory(Op):
    """The history kept in memory, newest first, and where the store must take over."""

    __slots__ = ("before", "limit", "token_id")

    def __init__(self, token_id: str, limit: int = 100, before: int | None = None) -> None:
        self.token_id = token_id
        self.limit = limit
        self.before = before

    def apply(self, state: PoolState, now: int) -> Any:
        return state.history(self.token_id, self.limit, self.before)


class GetUserHistory(Op):
    """As ``GetHistory``, for one user's leases."""

    __slots__ = ("before", "limit", "user_id")

    def __init__(self, user_id: str, limit: int = 100, before: int | None = None) -> None:
        self.user_id = user_id
        self.limit = limit
        self.before = before

    def apply(self, state: PoolState, now: int) -> Any:
        return state.user_history(self.user_id, self.limit, self.before)


class EndWaits(Op):
    """Shutdown: take every queued waiter off the queue; their tickets (the actor's
    caller answers them)."""

    __slots__ = ()

    def apply(self, state: PoolState, now: int) -> list[object]:
        return state.end_waits()


class Revision(Op):
    """The pool's revision now. The command layer sends one after each mutating command
    in the same batch, so the reply can carry the revision that applied it."""

    __slots__ = ()

    def apply(self, state: PoolState, now: int) -> int:
        return state.revision


class GetStats(Op):
    """The pool's counters as a ``Stats`` (the pool adds the store's figures)."""

    __slots__ = ()

    def apply(self, state: PoolState, now: int) -> Any:
        from ._model import Stats

        return Stats(
            size=state.size,
            active=state.active,
            available=state.available,
            revision=state.revision,
            waiting=state.waiting,
            **state.counters(),  # type: ignore[arg-type]
        )
