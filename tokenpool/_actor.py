"""The one trio task that owns a pool's state, like an Erlang GenServer.

Callers in any number of tasks put requests on a bounded memory channel and
wait for a one-shot reply. The actor takes everything queued at once, moves
the state's time to ``now`` (ending leases that expired), applies the
requests in order, hands the changes to the store's writer, and wakes each
caller. Its only timer is the next lease deadline, so an idle pool expires
leases on time without polling.

Cancellation rule: a request whose caller is cancelled while it is still
queued is never applied. A request that was applied but whose caller was
cancelled before the reply reached it (in ``sync`` durability, while the
commit is pending) is *abandoned*: the leases it newly granted are released
(reason ``released``) so no lease is left held by nobody. Other changes it
made stay (they end leases, which a retry cannot undo or repeat harmfully).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from ._errors import TokenPoolError, UnavailableError
from ._model import Change, Lease
from ._ops import Op, ReleaseLease

if TYPE_CHECKING:
    from ._clock import Clock
    from ._state import PoolState

log = structlog.get_logger("tokenpool.actor")

MAX_BATCH = 1024
"""The most requests the actor applies before it hands changes on and replies."""

# Request states.
QUEUED, APPLIED, DONE, CANCELLED, ABANDONED, TIMED_OUT = range(6)


class Request:
    """One message to the actor: a list of ops and, once answered, their results.

    A hand-made one-shot reply (the caller parks with
    ``wait_task_rescheduled``; the actor reschedules it) costs one task
    switch, and its abort hook implements the cancellation rule above.
    """

    __slots__ = ("changed", "grants", "ops", "results", "state", "task")

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = ops
        self.results: list[object] = []
        self.state = QUEUED
        self.task: trio.lowlevel.Task | None = None
        self.grants: list[Lease] = []
        self.changed = False

    def finish(self) -> None:
        """Mark answered and wake the caller if it is parked."""
        self.state = DONE
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def fail(self, error: TokenPoolError) -> None:
        """Answer every op with ``error`` (the request could not be carried out)."""
        if self.state in (DONE, CANCELLED, ABANDONED, TIMED_OUT):
            return
        self.results = [error] * len(self.ops)
        self.finish()

    def time_out(self, error: TokenPoolError) -> None:
        """Answer ``error`` to a request applied but not committed in time (``sync`` mode).

        Its caller then releases the leases it was granted, as for a cancelled caller.
        """
        if self.state != APPLIED:
            return
        self.results = [error] * len(self.ops)
        self.finish()
        self.state = TIMED_OUT

    async def wait(self) -> list[object]:
        """Park until answered; see the module's cancellation rule."""
        if self.state != DONE:
            self.task = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self.task = None
                self.state = CANCELLED if self.state == QUEUED else ABANDONED
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self.results


class Writer(Protocol):
    """What the actor needs of the write-behind store (the seam for persistence)."""

    committed_fence: int
    """The highest fence of a grant known committed."""

    def full(self) -> bool:
        """Whether the backlog is at its bound (activations are refused)."""

    def submit(self, changes: list[Change], waiters: list[Request] | None) -> None:
        """Queue changes; when ``waiters`` is given, finish them once committed."""


class Actor:
    """Owns a ``PoolState``; run ``run`` in a task and talk to it with ``call``."""

    def __init__(
        self,
        state: PoolState,
        clock: Clock,
        *,
        writer: Writer | None = None,
        sync: bool = False,
        queue_size: int = 4096,
    ) -> None:
        self.state = state
        self.clock = clock
        self.writer = writer
        self.sync = sync and writer is not None
        self.send, self._receive = trio.open_memory_channel[Request](queue_size)
        self.closed = False
        self.batches = 0
        self.requests = 0

    async def call(self, ops: Sequence[Op]) -> list[object]:
        """Apply ``ops`` in one message; return a result or an error per op."""
        request = Request(ops)
        try:
            try:
                self.send.send_nowait(request)
            except trio.WouldBlock:
                await self.send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise UnavailableError("the pool is closed") from None
        try:
            results = await request.wait()
        except trio.Cancelled:
            if request.state == ABANDONED and request.grants:
                await self._undo(request.grants)
            raise
        if request.state == TIMED_OUT and request.grants:
            await self._undo(request.grants)
        return results

    async def _undo(self, grants: list[Lease]) -> None:
        """Release the leases an abandoned request granted (shielded: we are cancelled)."""
        ops = [ReleaseLease(lease.token_id, lease.id) for lease in grants]
        with trio.CancelScope(shield=True):
            try:
                await self.send.send(Request(ops))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                log.warning("undo_lost", leases=[lease.id for lease in grants])

    def close(self) -> None:
        """Stop taking requests; the actor answers what is queued, then returns."""
        self.closed = True
        self.send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The actor's loop. Returns once ``close()`` was called and the queue is empty."""
        receive = self._receive
        state = self.state
        clock = self.clock
        task_status.started()
        try:
            while True:
                deadline = state.next_deadline()
                first: Request | None = None
                if deadline is None:
                    try:
                        first = await receive.receive()
                    except trio.EndOfChannel:
                        return
                else:
                    with trio.move_on_at(clock.trio_time(deadline)):
                        try:
                            first = await receive.receive()
                        except trio.EndOfChannel:
                            return
                now = clock.now()
                if first is None and deadline is not None and now < deadline:
                    # trio woke us at the deadline; float rounding must not leave it pending.
                    now = deadline
                changes = state.advance(now)
                batch: list[Request] = []
                if first is not None:
                    batch.append(first)
                    while len(batch) < MAX_BATCH:
                        try:
                            batch.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    self._apply(batch, now, changes)
                self.batches += 1
                self.requests += len(batch)
                self._deliver(batch, changes)
        finally:
            self._fail_pending()

    def _apply(self, batch: list[Request], now: Any, changes: list[Change]) -> None:
        state = self.state
        writer = self.writer
        full = writer is not None and writer.full()
        track = self.sync
        for request in batch:
            if request.state != QUEUED:
                continue  # its caller was cancelled before we got to it
            results = request.results
            mark = len(changes)
            for op in request.ops:
                if full and op.needs_room:
                    results.append(
                        UnavailableError("the store's write backlog is full; retry shortly")
                    )
                    continue
                try:
                    results.append(op.apply(state, now, changes))
                except TokenPoolError as error:
                    results.append(error)
                except Exception as error:  # a bug: answer it, keep serving everyone else
                    log.exception("op_failed", op=repr(op))
                    results.append(error)
            if track and len(changes) > mark:
                request.changed = True
                request.grants = [c for c in changes[mark:] if type(c) is Lease]
            request.state = APPLIED

    def _deliver(self, batch: list[Request], changes: list[Change]) -> None:
        writer = self.writer
        if writer is None:
            for request in batch:
                if request.state == APPLIED:
                    request.finish()
            return
        if self.sync:
            # Requests that changed something wait for their commit; the rest
            # (reads, an activate that found the user's lease) are answered
            # now, so reads keep working while the store is down.
            waiting = []
            for request in batch:
                if request.state == APPLIED:
                    if request.changed or _holds_uncommitted(request.results, writer):
                        waiting.append(request)
                    else:
                        request.finish()
            writer.submit(changes, waiting)
        else:
            if changes:
                writer.submit(changes, None)
            for request in batch:
                if request.state == APPLIED:
                    request.finish()

    def _fail_pending(self) -> None:
        """Answer whatever is still queued when the actor stops (closed or crashed)."""
        self.closed = True
        self.send.close()
        error = UnavailableError("the pool is closed")
        while True:
            try:
                self._receive.receive_nowait().fail(error)
            except (trio.WouldBlock, trio.EndOfChannel):
                break


def _holds_uncommitted(results: list[object], writer: Writer) -> bool:
    """Whether a result hands out a lease whose grant is not committed yet.

    In ``sync`` mode a caller told "this is your lease" must be able to rely on it
    surviving a crash, even when its activation only found the lease another caller's
    pending grant made (two activations of one user in one batch).
    """
    committed = writer.committed_fence
    for result in results:
        if type(result) is Lease:
            if result.fence > committed:
                return True
        elif type(result) is list:
            for item in result:  # activate_many
                if type(item) is Lease and item.fence > committed:
                    return True
    return False
