"""The one trio task that owns a pool's state, like an Erlang GenServer.

Callers in any number of tasks put requests on a bounded memory channel and
wait for a one-shot reply. The actor takes everything queued at once, moves
the state's time to ``now`` (ending leases that expired), applies the
requests in order, hands the batch's change records to the writer and to
the event log, and wakes each caller. Its only timer is the next deadline (a
lease's expiry or a waiter's time running out), so an idle pool expires
leases on time without polling.

Cancellation rule: a request whose caller is cancelled while it is still
queued is never applied; one waiting for a token (a ``wait`` pool) is taken
off the wait queue at once and is never granted one (the one call into the
state from outside this task, made synchronously in trio's abort hook, where
no operation can be half done). A request that was applied but whose caller
was cancelled before the reply reached it (in ``sync`` durability, while the
commit is pending) is *abandoned*: the leases it newly granted are released
(reason ``released``) so no lease is left held by nobody.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter, time_ns
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from . import _trace
from ._errors import InvalidArgumentError, TokenPoolError, UnavailableError
from ._log import get_logger
from ._model import FENCE, GRANT, ID, KIND, SLOT, LeaseRecord, Record, is_lease
from ._ops import Activate, EndWaits, Op, ReleaseLease, Revision
from ._state import WAITING

if TYPE_CHECKING:
    from ._state import PoolState
    from ._store import LinkState

log = get_logger("tokenpool.actor")

SHUTTING_DOWN = "the server is shutting down; retry on another server or after it restarts"
_NOT_IN_TIME = (
    "the store did not commit this change in time: a lease it granted is given back at"
    " once (its history says released); a release, renewal or clear stays made and is"
    " written when the store is back"
)
MAX_BATCH = 1024
"""The most requests the actor applies before it hands changes on and replies."""
BATCH_COST = 2048
"""The most work (``Op.cost`` units, about one activation each: a few milliseconds) the
actor takes into one batch before it yields: one client's big request never holds
everyone else's for long."""

# Request states.
QUEUED, WAITING_TOKEN, APPLIED, DONE, CANCELLED, ABANDONED, TIMED_OUT = range(7)


class Request:
    """One message to the actor: a list of ops and, once answered, their results.

    A hand-made one-shot reply (the caller parks with
    ``wait_task_rescheduled``; the actor reschedules it) costs one task
    switch, and its abort hook implements the cancellation rule above.
    """

    __slots__ = (
        "actor",
        "changed",
        "grants",
        "ops",
        "results",
        "state",
        "task",
        "trace",
        "wait_index",
    )

    def __init__(self, ops: Sequence[Op], actor: Actor | None = None) -> None:
        self.trace: list[Any] | None = None  # the span contexts of its commands (_trace)
        self.ops = ops
        self.results: list[object] = []
        self.state = QUEUED
        self.task: trio.lowlevel.Task | None = None
        self.grants: list[LeaseRecord] = []
        self.changed = False
        self.wait_index = -1
        self.actor = actor

    def finish(self) -> None:
        """Mark answered and wake the caller if it is parked. An abandoned request stays
        abandoned: its caller was cancelled after it was applied and, once it runs,
        undoes what it was granted (the answer came between the cancellation and that
        run: marked done, the caller would undo nothing, a lease held by nobody)."""
        if self.state != ABANDONED:
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
        """Answer ``error`` to a request applied but not committed (``sync`` mode).

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
                if self.state == QUEUED:
                    self.state = CANCELLED
                elif self.state == WAITING_TOKEN:
                    self.state = CANCELLED
                    if self.actor is not None:
                        self.actor.state.cancel_wait(self)
                else:
                    self.state = ABANDONED
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self.results


class Writer(Protocol):
    """What the actor needs of the write-behind (the seam for persistence).

    The writer only reports; the actor answers its own callers from what it reports.
    """

    committed: int
    """Every change up to this revision is committed."""
    committed_seq: int
    """Every batch up to this sequence number is written (or refused: ``refused_seqs``)."""
    refused_seqs: dict[int, str]
    gave_up: bool
    state: LinkState

    @property
    def last_seq(self) -> int: ...

    @property
    def progress(self) -> trio.Event: ...

    def full(self) -> bool:
        """Whether activations are refused (backlog at its bound, or the store lost)."""

    def refusal(self) -> str: ...

    def owns(self) -> bool:
        """Whether the pool can show it still owns its store (``Op.vouches``)."""

    def disowned(self) -> str: ...

    def submit(
        self, records: list[Record], counters: dict[str, int], clock_us: int, last_rev: int
    ) -> int | None:
        """Queue one batch's changes; its sequence number, or None when the store is lost."""

    def traced(self, seq: int, context: Any) -> None:
        """The span context of the actor batch that submitted ``seq`` (``_trace``)."""


@attrs.frozen
class ActorStatistics:
    """The actor of one pool, as ``Pool.statistics()`` reports it."""

    batches: int
    requests: int
    queued: int
    waiting: int
    history_in_memory: int
    deadlines: int
    wait_grants: int = 0  # tokens granted to a caller that waited, and their total wait
    waited_us: int = 0


class Actor:
    """Owns a ``PoolState``; run ``run`` in a task and talk to it with ``call``."""

    def __init__(
        self,
        state: PoolState,
        now_us: Callable[[], int],
        to_trio: Callable[[int], float],
        *,
        writer: Writer | None = None,
        sync: bool = False,
        queue_size: int = 4096,
        publish: Callable[[list[Record]], None] | None = None,
        write_timeout: float = 5.0,
        name: str = "",
    ) -> None:
        self.name = name  # the pool's, for its spans
        self.state = state
        self.write_timeout = write_timeout
        # sync callers waiting for their batch to commit, oldest first:
        # (sequence number, requests, trio time they are answered "not in time" at)
        self._replies: deque[tuple[int, list[Request], float]] = deque()
        self._replies_added = trio.Event()  # set when a reply is queued: wakes an idle waiter
        self.now_us = now_us
        self.to_trio = to_trio
        self.writer = writer
        self.sync = sync and writer is not None
        self.publish = publish
        self.send, self._receive = trio.open_memory_channel[Request](queue_size)
        self.closed = False
        self.draining = False  # shutdown began: activations do not wait (``stop_waiting``)
        self._last: Request | None = None
        self._ended = False  # the last request was applied: refuse what follows it
        # Told how long each batch held the loop (the server's pause histogram).
        self.on_batch: Callable[[float], None] | None = None
        self._refusals_sent = state.refusals  # as the last batch to the writer had them
        self.batches = 0
        self.requests = 0

    async def call(self, ops: Sequence[Op], trace: list[Any] | None = None) -> list[object]:
        """Apply ``ops`` in one message; return a result or an error per op. ``trace``:
        the span contexts of the commands they carry, linked from the batch's span."""
        request = Request(ops, self)
        request.trace = trace
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

    async def call_last(self, ops: Sequence[Op]) -> list[object]:
        """Apply ``ops`` as the last message this actor takes: the queue is closed the
        moment they are in it, so nothing sent after them is applied (``POOL DROP``
        ends every lease, and no activation may slip in behind it)."""
        request = Request(ops, self)
        self._last = request  # whatever reaches the queue after it is refused
        try:
            await self.send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise UnavailableError("the pool is closed") from None
        self.close()
        return await request.wait()  # the actor answers what is queued before it returns

    async def _undo(self, grants: list[LeaseRecord]) -> None:
        """Release the leases an abandoned request granted (shielded: we are cancelled)."""
        ops = [ReleaseLease(lease[SLOT], lease[ID]) for lease in grants]
        with trio.CancelScope(shield=True):
            try:
                await self.send.send(Request(ops))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                log.warning("undo_lost", leases=[lease[ID] for lease in grants])

    async def stop_waiting(self) -> None:
        """Shutdown begins: answer every waiting activation now (``UnavailableError``)
        and every later one at once, so no client holds the shutdown for its wait."""
        self.draining = True
        try:
            (tickets,) = await self.call((EndWaits(),))
        except UnavailableError:
            return  # closed already: its waiters were answered
        error = UnavailableError(SHUTTING_DOWN)
        for ticket in tickets:  # type: ignore[attr-defined]
            if isinstance(ticket, Request) and ticket.state == WAITING_TOKEN:
                ticket.state = APPLIED
                ticket.fail(error)

    def close(self) -> None:
        """Stop taking requests; the actor answers what is queued, then returns."""
        self.closed = True
        self.send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The actor's loop. Returns once ``close()`` was called and the queue is empty
        (and, in ``sync`` mode, its waiting callers are answered)."""
        if not self.sync:
            await self._loop(task_status)
            self._write_last_counters()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer_commits)
            await self._loop(task_status)
            self._write_last_counters()
            with trio.move_on_after(self.write_timeout + 1):
                while self._replies and self._settle():
                    await self.writer.progress.wait()  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()
        self._fail_replies(UnavailableError("the pool closed before the change was written"))

    def _write_last_counters(self) -> None:
        """Refusals change no lease, so no batch carried the latest ones: send them."""
        state = self.state
        if self.writer is not None and state.refusals != self._refusals_sent:
            self.writer.submit([], state.counters(), self.now_us(), state.revision)

    async def _answer_commits(self) -> None:
        """Answer sync callers as their batches commit, are refused, or run out of time.

        Sleeps until the writer reports progress or the oldest caller's time runs out
        (the replies are in order, so that is the earliest deadline); with no caller
        waiting, until one is queued.
        """
        writer = self.writer
        assert writer is not None
        while True:
            progress = writer.progress
            if self._settle():
                with trio.move_on_at(self._replies[0][2]):
                    await progress.wait()
            else:
                self._replies_added = trio.Event()
                await self._replies_added.wait()

    def _settle(self) -> bool:
        """Answer what the writer's figures now decide; whether any wait is left."""
        writer = self.writer
        assert writer is not None
        replies = self._replies
        committed = writer.committed_seq
        refused = writer.refused_seqs
        while replies and replies[0][0] <= committed:
            seq, requests, _deadline = replies.popleft()
            why = refused.get(seq)
            if why is None:
                for request in requests:
                    request.finish()
            else:
                error = UnavailableError(f"the store refused this change: {why}")
                for request in requests:
                    request.time_out(error)
        for seq in [s for s in refused if s <= committed]:
            del refused[seq]
        if writer.state.lost or writer.gave_up:
            self._fail_replies(UnavailableError(writer.refusal()))
            return False
        now = trio.current_time()
        while replies and replies[0][2] <= now:
            _seq, requests, _deadline = replies.popleft()
            error = UnavailableError(_NOT_IN_TIME)
            for request in requests:
                request.time_out(error)
        return bool(replies)

    def _fail_replies(self, error: TokenPoolError) -> None:
        while self._replies:
            _seq, requests, _deadline = self._replies.popleft()
            for request in requests:
                request.time_out(error)

    async def _loop(self, task_status: trio.TaskStatus[None]) -> None:
        receive = self._receive
        state = self.state
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
                    with trio.move_on_at(self.to_trio(deadline)):
                        try:
                            first = await receive.receive()
                        except trio.EndOfChannel:
                            return
                started = perf_counter()
                now = self.now_us()
                if first is None and deadline is not None and now < deadline:
                    # trio woke us at the deadline; float rounding must not leave it pending.
                    now = deadline
                state.advance(now)
                batch: list[Request] = []
                if first is not None:
                    batch.append(first)
                    cost = _cost(first)
                    while len(batch) < MAX_BATCH and cost < BATCH_COST:
                        try:
                            request = receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        batch.append(request)
                        cost += _cost(request)
                    self._apply(batch, now)
                self.batches += 1
                self.requests += len(batch)
                if _trace.on:
                    self._traced(batch, now, started)
                else:
                    self._deliver(batch, now)
                if self.on_batch is not None:
                    self.on_batch(perf_counter() - started)
        finally:
            self._fail_pending()

    def _apply(self, batch: list[Request], now: int) -> None:
        state = self.state
        writer = self.writer
        full = writer is not None and writer.full()
        lost = writer is not None and writer.state.lost  # nothing changed now is written
        # One check per batch: a pool that cannot show it owns its store vouches for no
        # lease, whichever transport asked (the one place every request passes).
        disowned = writer is not None and not writer.owns()
        track = self.sync
        changes = state.changes
        for request in batch:
            if request.state != QUEUED:
                continue  # its caller was cancelled before we got to it
            if self._ended:
                request.results = [UnavailableError("the pool is closed")] * len(request.ops)
                request.state = APPLIED
                continue
            if request is self._last:
                self._ended = True
            results = request.results
            mark = len(state.changes)
            for op in request.ops:
                if request.wait_index >= 0:
                    # Only a Revision may follow a waiting activation: it is read when the
                    # wait ends (the command layer asks for the revision after each change).
                    results.append(
                        None
                        if type(op) is Revision
                        else InvalidArgumentError(
                            "a waiting activation must be the last op of a batch"
                        )
                    )
                    continue
                if full and (op.needs_room or (lost and op.changes)):
                    assert writer is not None
                    results.append(UnavailableError(writer.refusal()))
                    continue
                if disowned and op.vouches:
                    assert writer is not None
                    results.append(UnavailableError(writer.disowned()))
                    continue
                try:
                    kind = type(op)
                    if kind is Activate:  # the hot path: no method call in between
                        if op.wait:  # type: ignore[attr-defined]
                            if self.draining:  # shutting down: nobody waits now
                                results.append(UnavailableError(SHUTTING_DOWN))
                                continue
                            result = state.activate_or_wait(
                                op.user_id,  # type: ignore[attr-defined]
                                now,
                                request,
                                op.wait,  # type: ignore[attr-defined]
                            )
                            if result is WAITING:
                                request.wait_index = len(results)
                        else:
                            result = state.activate(op.user_id, now)  # type: ignore[attr-defined]
                    elif kind is Revision:
                        result = state.revision
                    else:
                        result = op.apply(state, now)
                    results.append(result)
                except TokenPoolError as error:
                    results.append(error)
                except Exception as error:  # a bug: answer it, keep serving everyone else
                    log.exception("op_failed", op=repr(op))
                    results.append(error)
            changes = state.changes
            if track and len(changes) > mark:
                request.changed = True
                request.grants = [c for c in changes[mark:] if c[KIND] == GRANT]
            request.state = WAITING_TOKEN if request.wait_index >= 0 else APPLIED

    def _traced(self, batch: list[Request], now: int, started: float) -> None:
        """``_deliver``, and the batch's span: linked to its commands' spans, and handed
        to the writer with the batch's changes (the store batch links to it)."""
        start_ns = time_ns() - int((perf_counter() - started) * 1e9)
        writer = self.writer
        last_seq = writer.last_seq if writer is not None else 0
        changes = len(self.state.changes)
        self._deliver(batch, now)
        links = [c for request in batch if request.trace for c in request.trace]
        if not links:
            return
        context = _trace.actor_batch(self.name, links, start_ns, len(batch), changes)
        if writer is not None and writer.last_seq != last_seq:
            writer.traced(writer.last_seq, context)

    def _woken(self) -> list[Request]:
        """Callers a freed token (or a run-out wait) answered in this batch."""
        woken = self.state.woken
        if not woken:
            return []
        self.state.woken = []
        out: list[Request] = []
        for ticket, result in woken:
            request = ticket
            assert isinstance(request, Request)
            if request.state != WAITING_TOKEN:
                continue
            results = request.results
            results[request.wait_index] = result
            for j in range(request.wait_index + 1, len(results)):
                if type(request.ops[j]) is Revision:
                    results[j] = self.state.revision
            request.wait_index = -1
            request.state = APPLIED
            if self.sync and is_lease(result):
                request.changed = True
                request.grants = [result] if result[KIND] == GRANT else []  # type: ignore[index, list-item]
            out.append(request)
        return out

    def _deliver(self, batch: list[Request], now: int) -> None:
        state = self.state
        batch += self._woken()
        changes = state.changes
        if changes:
            state.changes = []
            if self.publish is not None:
                self.publish(changes)
        writer = self.writer
        if writer is None:
            for request in batch:
                if request.state == APPLIED:
                    request.finish()
            return
        seq = None
        if changes:
            seq = writer.submit(changes, state.counters(), now, state.revision)
            self._refusals_sent = state.refusals
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
            if not waiting:
                return
            if changes and seq is None:  # the store is lost: nothing will commit
                error = UnavailableError(writer.refusal())
                for request in waiting:
                    request.time_out(error)
                return
            # Without changes of their own they saw changes still queued: they are
            # answered when the newest batch commits.
            target = seq if seq is not None else writer.last_seq
            if target > writer.committed_seq:
                self._replies.append((target, waiting, trio.current_time() + self.write_timeout))
                self._replies_added.set()
            else:
                for request in waiting:
                    request.finish()
        else:
            for request in batch:
                if request.state == APPLIED:
                    request.finish()

    def _fail_pending(self) -> None:
        """Answer whatever is still queued or waiting when the actor stops."""
        self.closed = True
        self.send.close()
        error = UnavailableError("the pool is closed")
        while True:
            try:
                self._receive.receive_nowait().fail(error)
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        for ticket in self.state.end_waits():
            if isinstance(ticket, Request) and ticket.state == WAITING_TOKEN:
                ticket.state = APPLIED
                ticket.fail(error)

    def statistics(self) -> ActorStatistics:
        state = self.state.statistics()
        return ActorStatistics(
            batches=self.batches,
            requests=self.requests,
            queued=self._receive.statistics().current_buffer_used,
            waiting=self.state.waiting,
            history_in_memory=state["history_in_memory"],
            deadlines=state["deadlines"],
            wait_grants=self.state.wait_grants,
            waited_us=self.state.waited_us,
        )


def _cost(request: Request) -> int:
    ops = request.ops
    if len(ops) == 1:
        return ops[0].cost
    return sum(op.cost for op in ops)


def _holds_uncommitted(results: list[object], writer: Writer) -> bool:
    """Whether a result hands out a lease whose grant is not committed yet.

    In ``sync`` mode a caller told "this is your lease" must be able to rely on it
    surviving a crash, even when its activation only found the lease another caller's
    pending grant made (two activations of one user in one batch).
    """
    committed = writer.committed
    for result in results:
        if is_lease(result):
            if result[FENCE] > committed:  # type: ignore[index]
                return True
        elif type(result) is list:
            for item in result:  # activate_many
                if is_lease(item) and item[FENCE] > committed:
                    return True
    return False
