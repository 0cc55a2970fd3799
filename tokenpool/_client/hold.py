"""``pool.hold(user)``: a lease kept for the length of a block (a lock watchdog).

The rules it keeps (Redisson's watchdog, etcd's keep-alive, Chubby's sessions):
- The lease is renewed every third of the time it has left (or every
  ``renew_every``), so two renewals may fail before it runs out.
- The time it has left is counted from when each renewal was **sent** (the server
  renewed it later than that, so the client's idea of ``expires_at`` is never later
  than the server's), from the wall-clock gap the server's ``expires_at`` states:
  client and server clocks are assumed to agree within a small part of the TTL.
- The lease is **lost** when a renewal is refused (``NotHolderError``: evicted,
  released elsewhere, cleared, expired; ``UnknownTokenError``/``UnknownPoolError``;
  ``UnavailableError``: the server will not renew) or when the counted expiry passes
  with no renewal (the server unreachable, stalled or rate-limiting): from then on
  the holder cannot show it holds the token, so it stops acting as if it did.
- Lost, the block is cancelled and ``LeaseLostError`` raised (``on_lost="cancel"``), or
  ``lost`` is set and the block runs on (``"notify"``): the block then checks it
  before each step that needs the token, and proves the hold with ``fence``.
- On exit a lease not lost is released with its user (``release(token_id, user_id)``),
  shielded from cancellation and bounded by the client's timeout; if that fails the
  lease simply expires.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from .._commands.connection import BusyError
from .._errors import LeaseLostError, TokenPoolError, UnreachableError, lone_error
from .._model import Lease

if TYPE_CHECKING:
    from .remote import RemotePool


class Hold:
    """A lease held by ``pool.hold()``: the current ``lease`` (renewals replace it), its
    ``fence``, and whether it was ``lost`` (``lost_error`` says how)."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lost_error: TokenPoolError | None = None
        self.renewals = 0
        self._lost = anyio.Event()

    @property
    def id(self) -> str:
        return self.lease.id

    @property
    def token_id(self) -> str:
        return self.lease.token_id

    @property
    def user_id(self) -> str:
        return self.lease.user_id

    @property
    def fence(self) -> int:
        """The revision that granted the lease: a guarded resource refuses smaller ones."""
        return self.lease.fence

    @property
    def expires_at(self) -> datetime:
        return self.lease.expires_at

    @property
    def lost(self) -> bool:
        return self.lost_error is not None

    async def wait_lost(self) -> TokenPoolError:
        """Wait until the lease is lost; the error that lost it."""
        await self._lost.wait()
        assert self.lost_error is not None
        return self.lost_error

    def _lose(self, error: TokenPoolError) -> None:
        self.lost_error = error
        self._lost.set()

    def __repr__(self) -> str:
        state = f"lost: {self.lost_error}" if self.lost else "held"
        return f"<Hold {self.lease.token_id} by {self.lease.user_id!r} fence {self.fence} {state}>"


def _left(lease: Lease, sent_wall: datetime) -> float:
    """Seconds the lease had left when its request was sent, by the server's expires_at."""
    return (lease.expires_at - sent_wall).total_seconds()


async def _keep(
    pool: RemotePool, held: Hold, renew_every: float | None, sent: tuple[float, datetime]
) -> None:
    """Renew until cancelled; when the lease is lost, ``held._lose`` and return."""
    sent_mono, sent_wall = sent
    deadline = sent_mono + _left(held.lease, sent_wall)  # on anyio's clock
    while True:
        gap = (deadline - anyio.current_time()) / 3 if renew_every is None else renew_every
        await anyio.sleep(max(min(gap, deadline - anyio.current_time()), 0.0))
        failure: TokenPoolError | None = None
        pause = 0.05
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0.0)):
            while True:
                sent_mono, sent_wall = anyio.current_time(), datetime.now(UTC)
                try:
                    lease = await pool.renew(held.lease.token_id, held.lease.id)
                except (UnreachableError, BusyError) as error:
                    failure = error  # may pass: try again while the lease lasts
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                except TokenPoolError as error:
                    held._lose(error)  # refused: evicted, released, cleared, unavailable
                    return
                held.lease = lease
                held.renewals += 1
                deadline = sent_mono + _left(lease, sent_wall)
                break
        if anyio.current_time() >= deadline:
            why = f" (last try: {failure})" if failure is not None else ""
            held._lose(UnreachableError(f"expired at {held.lease.expires_at}, not renewed{why}"))
            return


@asynccontextmanager
async def hold(
    pool: RemotePool,
    user_id: str,
    wait: float | None,
    renew_every: float | None,
    on_lost: str,
    timeout: float,
) -> AsyncIterator[Hold]:
    sent = (anyio.current_time(), datetime.now(UTC))
    held = Hold(await pool.activate(user_id, wait))
    block = anyio.CancelScope()
    try:
        async with anyio.create_task_group() as tg:

            async def watchdog() -> None:
                await _keep(pool, held, renew_every, sent)
                if held.lost and on_lost == "cancel":
                    block.cancel()

            tg.start_soon(watchdog)
            try:
                with block:
                    yield held
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise lone_error(group) from None
    finally:
        if not held.lost:
            # Lost meanwhile, or unreachable: the lease then expires by itself.
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(timeout),
                contextlib.suppress(TokenPoolError),
            ):
                await pool.release(held.token_id, held.user_id)
    if held.lost_error is not None and on_lost == "cancel":
        raise LeaseLostError(
            f"lost the lease of {held.token_id} (fence {held.fence}): {held.lost_error}",
            held.lease,
            held.lost_error,
        ) from held.lost_error
