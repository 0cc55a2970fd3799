"""Leases: ACTIVATE, RELEASE, RENEW, VALIDATE, LEASE, CLEAR."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, cast

from .. import _ops as ops
from .._model import SLOT, EndRecord, LeaseRecord
from .._ops import END_STEP
from ._base import PoolRequest, bare

if TYPE_CHECKING:
    from .._pool import PoolCore


_new = tuple.__new__  # a named tuple without NamedTuple.__new__'s Python frame


class Granted(NamedTuple):
    """A lease as a command answers it: the record, its token's id and (after a change)
    the pool's revision; ``revision`` is None for a read (``LEASE``)."""

    lease: LeaseRecord
    token_id: str
    revision: int | None


class Released(NamedTuple):
    """The lease a RELEASE ended (its usage-history entry) and the pool's revision."""

    usage: EndRecord
    token_id: str
    revision: int


class Cleared(NamedTuple):
    """How many leases a CLEAR ended, and the pool's revision after them."""

    ended: int
    revision: int


class Activate(PoolRequest):
    """Lease a token of ``pool`` to ``user_id`` (the one the user holds, if any);
    ``wait``: seconds a full ``wait`` pool may make the caller wait (None or 0: none)."""

    __slots__ = ("user_id", "wait", "waits")
    name = "activate"
    revised = True

    def __init__(self, pool: str, user_id: str, wait: float | None = None) -> None:
        self.pool = pool
        self.user_id = user_id
        self.wait = wait or None
        self.waits = self.wait is not None

    def no_wait(self) -> None:
        """Inside MULTI nobody waits: a full ``wait`` pool refuses at once."""
        self.wait = None
        self.waits = False

    def op(self) -> ops.Op:
        op = bare(ops.Activate)  # the hot path: no __init__ frame
        op.user_id = self.user_id
        op.wait = self.wait
        return op

    def result(self, core: PoolCore, raw: LeaseRecord, revision: int) -> Granted:
        return _new(Granted, (raw, core.names(raw[SLOT]), revision))  # the hot path


class Renew(PoolRequest):
    __slots__ = ("lease_id", "token_id")
    name = "renew"
    revised = True

    def __init__(self, pool: str, token_id: str, lease_id: str) -> None:
        self.pool = pool
        self.token_id = token_id
        self.lease_id = lease_id

    def op(self) -> ops.Op:
        return ops.Renew(self.token_id, self.lease_id)

    def result(self, core: PoolCore, raw: LeaseRecord, revision: int) -> Granted:
        return Granted(raw, core.names(raw[SLOT]), revision)


class Release(PoolRequest):
    """End the token's lease; with ``user_id``, only if that user holds it."""

    __slots__ = ("token_id", "user_id")
    name = "release"
    revised = True

    def __init__(self, pool: str, token_id: str, user_id: str | None = None) -> None:
        self.pool = pool
        self.token_id = token_id
        self.user_id = user_id

    def op(self) -> ops.Op:
        return ops.Release(self.token_id, self.user_id)

    def result(self, core: PoolCore, raw: EndRecord, revision: int) -> Released:
        return Released(raw, core.names(raw[SLOT]), revision)


class Validate(PoolRequest):
    """Whether ``lease_id`` is the token's current lease: what a guarded resource asks."""

    __slots__ = ("lease_id", "token_id")
    name = "validate"

    def __init__(self, pool: str, token_id: str, lease_id: str) -> None:
        self.pool = pool
        self.token_id = token_id
        self.lease_id = lease_id

    def op(self) -> ops.Op:
        return ops.Validate(self.token_id, self.lease_id)

    def result(self, core: PoolCore, raw: Any, revision: int) -> bool:
        return bool(raw)


class LeaseOf(PoolRequest):
    """The lease ``user_id`` holds in ``pool`` now, or None."""

    __slots__ = ("user_id",)
    name = "lease"

    def __init__(self, pool: str, user_id: str) -> None:
        self.pool = pool
        self.user_id = user_id

    def op(self) -> ops.Op:
        return ops.GetLease(self.user_id)

    def result(self, core: PoolCore, raw: LeaseRecord | None, revision: int) -> Granted | None:
        return None if raw is None else Granted(raw, core.names(raw[SLOT]), None)


class Clear(PoolRequest):
    """End every lease of ``pool`` (``cleared``): ``END_STEP`` of them at its place in
    the batch, the rest a step at a time after it (others served between; leases
    granted meanwhile are not ended). The reply counts them all."""

    __slots__ = ()
    name = "clear"
    admin = True
    revised = True
    completes = True

    def op(self) -> ops.Op:
        return ops.Clear(END_STEP)

    def result(self, core: PoolCore, raw: int, revision: int) -> Cleared:
        return Cleared(raw, revision)

    async def complete(self, core: PoolCore, result: Any) -> Cleared:
        if result.ended < END_STEP:
            return cast(Cleared, result)
        return Cleared(*await core.clear_rest(result.ended, result.revision))
