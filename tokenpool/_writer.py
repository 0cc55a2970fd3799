"""Write-behind: the task that carries the actor's changes to the store in batches.

The actor never waits on the database: it hands each batch of changes to
``submit`` (no await, no I/O) and moves on. This task takes everything
queued, coalesces it into one ``Batch`` and writes it in ONE transaction on
the store's thread (one thread per pool, so writes keep their order). While
a write is in flight new changes queue up, so the next batch is bigger: group
commit falls out of the design.

Rules it keeps:
- A batch is idempotent (rows keyed by lease id), so after an ambiguous
  failure it is retried whole, grown by whatever arrived meanwhile.
- Every attempt has a deadline (the store's ``statement_timeout`` and a
  client-side ``fail_after``); failures back off exponentially with jitter,
  capped at ``retry_cap``. The link's state changes (up, retrying, down,
  fenced) are logged once each, not once per attempt.
- The backlog (changes not yet committed) is bounded: at ``max_backlog``
  ``full()`` turns true and the actor refuses activations with
  ``UnavailableError`` until it drains.
- ``sync`` durability: callers are answered only when the batch holding
  their change has committed; one waiting longer than ``write_timeout`` is
  answered ``UnavailableError`` (and the leases it was granted are released).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import structlog
import trio

from ._errors import UnavailableError
from ._model import Change, Lease
from ._store import Batch, FencedError, Store, StoreError

if TYPE_CHECKING:
    from ._actor import Request

log = structlog.get_logger("tokenpool.writer")

MAX_BATCH_CHANGES = 50_000


_NOT_IN_TIME = "the store did not commit in time; the change is kept and will be written"


class _Entry:
    __slots__ = ("changes", "submitted", "waiters")

    def __init__(self, changes: list[Change], waiters: list[Request], submitted: float) -> None:
        self.changes = changes
        self.waiters = waiters
        self.submitted = submitted


class Writer:
    """Write-behind for one pool's store. Run ``run`` in a task; ``close`` drains it."""

    def __init__(
        self,
        store: Store,
        *,
        now: Callable[[], datetime],
        max_backlog: int = 100_000,
        flush_interval: float = 0.002,
        write_timeout: float = 5.0,
        retry_cap: float = 5.0,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.store = store
        self._now = now
        self.max_backlog = max_backlog
        self.flush_interval = flush_interval
        self.write_timeout = write_timeout
        self.retry_cap = retry_cap
        self.shutdown_timeout = shutdown_timeout
        self._entries: deque[_Entry] = deque()
        self._wakeup = trio.Event()
        self._closing = False
        self._limiter = trio.CapacityLimiter(1)
        self.backlog = 0
        self.link = "up"
        self.fenced = False
        self.last_commit_at: datetime | None = None
        self.last_lag: float | None = None
        self.lags: deque[float] = deque(maxlen=10_000)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self.lost = 0
        # The highest fence of a grant known committed: a sync caller handed a lease
        # granted earlier (an idempotent activate) waits until it is past this.
        self.committed_fence = 0
        self._submitted = 0  # entries ever queued
        self._done = 0  # entries ever committed (or given up)
        self._progress = trio.Event()

    # -- the actor's side (no await) --------------------------------------------

    def full(self) -> bool:
        return self.fenced or self.backlog >= self.max_backlog

    def submit(self, changes: list[Change], waiters: list[Request] | None) -> None:
        if not changes:
            if waiters and self._entries:
                # They saw changes still queued: answer them when the newest commits.
                self._entries[-1].waiters.extend(waiters)
                return
            for request in waiters or ():
                request.finish()  # nothing of theirs to commit
            return
        self._entries.append(_Entry(changes, waiters or [], trio.current_time()))
        self._submitted += 1
        self.backlog += len(changes)
        self._wakeup.set()

    # -- the task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._entries:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self.fenced:
                self._fail_waiters(0.0, "this process no longer owns the pool (fenced)")
                if self._closing:
                    self._give_up()
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self.flush_interval and not self._closing:
                await trio.sleep(self.flush_interval)
            await self._flush()

    async def flush(self) -> None:
        """Wait until every change submitted so far is committed.

        Raises ``UnavailableError`` if the pool no longer owns the store.
        """
        target = self._submitted
        while self._done < target:
            if self.fenced:
                raise UnavailableError("this process no longer owns the pool (fenced)")
            await self._progress.wait()

    async def close(self) -> None:
        """Stop once everything queued is written (or ``shutdown_timeout`` passed)."""
        self._closing = True
        self._wakeup.set()

    async def _flush(self) -> None:
        batch = Batch()
        taken = 0
        for entry in self._entries:
            if batch.changes and batch.changes + len(entry.changes) > MAX_BATCH_CHANGES:
                break
            batch.add(entry.changes)
            taken += 1
        attempt = 0
        started = trio.current_time()
        while batch:
            try:
                with trio.fail_after(self.write_timeout + 1):
                    await trio.to_thread.run_sync(
                        self.store.write, batch, limiter=self._limiter, abandon_on_cancel=True
                    )
                break
            except FencedError as error:
                self.fenced = True
                self._set_link("fenced", error)
                self._progress.set()  # flush() callers: raise rather than wait forever
                return
            except (StoreError, trio.TooSlowError) as error:
                attempt += 1
                self._set_link("retrying" if attempt < 3 else "down", error)
                self._fail_waiters(self.write_timeout, _NOT_IN_TIME)
                if self._closing and trio.current_time() - started > self.shutdown_timeout:
                    self._give_up()
                    return
                delay = min(self.retry_cap, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                await self._back_off(delay)
                # Retry with whatever arrived meanwhile: the same rows again plus newer ones.
                # The failed attempt may have committed after all (a hung database that
                # woke up): its leases' assignment rows may exist, so a newer entry that
                # ends one of them must delete the row, not skip it as never written.
                batch.fresh.clear()
                for entry in list(self._entries)[taken:]:
                    if batch.changes + len(entry.changes) > MAX_BATCH_CHANGES:
                        break
                    batch.add(entry.changes)
                    taken += 1
        now = trio.current_time()
        if batch:
            self._set_link("up", None)
            self.last_commit_at = self._now()
            self.batch_sizes.append(batch.changes)
        self._done += taken
        self._progress.set()
        self._progress = trio.Event()
        for _ in range(taken):
            entry = self._entries.popleft()
            self.backlog -= len(entry.changes)
            # Fences grow in change order, so an entry's newest grant is its last Lease:
            # scan from the end and stop there (this runs on the actor's thread).
            for change in reversed(entry.changes):
                if type(change) is Lease:
                    self.committed_fence = max(self.committed_fence, change.fence)
                    break
            if entry.changes:
                self.last_lag = now - entry.submitted
                self.lags.append(self.last_lag)
            for request in entry.waiters:
                request.finish()

    async def _back_off(self, delay: float) -> None:
        """Sleep ``delay`` before a retry, answering sync callers whose time runs out
        meanwhile: a backoff of up to ``retry_cap`` must not stretch their deadline."""
        wake = trio.current_time() + delay
        while (now := trio.current_time()) < wake:
            await trio.sleep(min(wake - now, 0.1))
            self._fail_waiters(self.write_timeout, _NOT_IN_TIME)

    def _fail_waiters(self, older_than: float, why: str) -> None:
        """Answer ``UnavailableError`` to sync callers waiting longer than ``older_than`` s."""
        now = trio.current_time()
        for entry in self._entries:
            if now - entry.submitted < older_than:
                break  # entries queue in submission order: the rest are younger
            if entry.waiters:
                error = UnavailableError(why)
                for request in entry.waiters:
                    request.time_out(error)
                entry.waiters = []

    def _give_up(self) -> None:
        lost = sum(len(e.changes) for e in self._entries)
        self.lost += lost
        if lost:
            log.error("changes_not_written", changes=lost, store=self.store.url, link=self.link)
        for entry in self._entries:
            for request in entry.waiters:
                request.time_out(UnavailableError("the pool closed before the change was written"))
        self._done += len(self._entries)
        self._entries.clear()
        self.backlog = 0
        self._progress.set()

    def _set_link(self, state: str, error: BaseException | None) -> None:
        if state == self.link:
            return
        previous, self.link = self.link, state
        if state == "up":
            log.info("store_link_up", store=self.store.url, was=previous, backlog=self.backlog)
        elif state == "fenced":
            log.error("store_fenced", store=self.store.url, error=str(error))
        else:
            log.warning(
                f"store_link_{state}", store=self.store.url, error=str(error), backlog=self.backlog
            )
