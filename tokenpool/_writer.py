"""Write-behind, the server's side: one backlog per pool.

The actor never waits on the database: it hands each batch's change records
to ``Writer.submit`` (no await, no I/O), gets a sequence number back, and
moves on. The store link (``_store/link.py``) takes what was submitted and
ships it to the store process, then reports back what happened to it. The
writer only reports in turn: what committed (``committed_seq``,
``committed``), what the store refused for good (``refused``), and whether it
lost the store; the actor, which owns its callers, answers them. Nothing here
knows a request. Calls flow one way: the link calls the writer's report
methods; the writer only ever calls ``link.wake()``.

Rules it keeps:
- The backlog (changes not yet acknowledged) is bounded: at ``max_backlog``
  ``full()`` turns true and the actor refuses activations with
  ``UnavailableError`` until it drains. Crossing the high-water mark and
  draining are logged once each.
- A change the store refused for good is logged with the reason and reported
  by its sequence number. A store process that died, or a pool fenced by a
  newer owner, turns the link ``failed``/``fenced``: activations are refused
  and readiness reports it.
- Shutdown is bounded: ``give_up`` counts what was not written when the
  link's shutdown ran out of time.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import trio

from . import _trace
from ._errors import UnavailableError
from ._log import get_logger
from ._model import Record
from ._store import MAX_BATCH_RECORDS, LinkState

log = get_logger("tokenpool.writer")

LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Upper bounds (seconds) of the write-lag histogram (submitted to committed, per batch)."""
SLOW_DOWN = 0.5
"""Of ``max_backlog``: past it the RESP server delays activations a little (a write stall,
as RocksDB slows writes before it stops them), so a load the store cannot keep up with
is slowed to the store's pace instead of running into the full backlog's refusals."""
MAX_STALL = 0.1  # seconds: the delay just short of a full backlog (none once full: refused)
HIGH_WATER = 0.5  # of max_backlog: log once when crossed, once when drained below LOW_WATER
LOW_WATER = 0.1


@attrs.frozen
class WriterStatistics:
    """The write-behind of one pool, as ``Pool.statistics()`` reports it."""

    link: LinkState
    backlog: int
    max_backlog: int
    unsent: int
    committed_revision: int
    last_commit_at_us: int | None
    write_lag: float  # seconds the oldest unacknowledged change has waited; 0 when none
    last_batch_lag: float
    lag_p50: float
    lag_p99: float
    lags: tuple[float, ...]  # the recent batches' lags (seconds), for percentiles elsewhere
    lag_histogram: tuple[tuple[float, int], ...]  # (upper bound, cumulative batches) since start
    batches: int
    changes_written: int
    batch_p50: float  # changes per committed batch, median of the recent ones
    rejected: int
    lost: int
    stalls: int  # activation batches delayed because the backlog was past SLOW_DOWN
    stall_seconds: float  # the time they were delayed in all


class Link(Protocol):
    """What a writer needs of its store link: a nudge when there is something to send,
    and the wall clock it stamps commits with."""

    def wake(self, now: bool = False) -> None: ...

    def now_us(self) -> int: ...

    def owns(self) -> bool: ...

    def disowned(self) -> str: ...


class _Entry:
    __slots__ = ("clock_us", "counters", "last_rev", "records", "seq", "size", "submitted", "trace")

    def __init__(
        self,
        seq: int,
        records: list[Record],
        submitted: float,
        last_rev: int,
        counters: dict[str, int],
        clock_us: int,
    ) -> None:
        self.trace: Any = None  # the span context of the actor batch that submitted it
        self.seq = seq
        self.records = records
        self.size = len(records)
        self.submitted = submitted
        self.last_rev = last_rev
        # the pool's counters and clock as of this batch: a frame that ends here carries
        # them, never later ones its records do not reach
        self.counters = counters
        self.clock_us = clock_us


class Writer:
    """One pool's write-behind: the actor submits, the link sends, acknowledgements commit."""

    def __init__(
        self,
        link: Link,
        key: int,
        name: str,
        *,
        max_backlog: int,
        write_timeout: float,
        committed: int,
        hold_after_refusal: float = 0.0,
        vouch_from: float = 0.0,
        gather: float = 0.0,
    ) -> None:
        self._link = link
        # how long the link may hold a change back to send it with the next ones (an
        # async store's ``flush_interval``): not a stall
        self.gather = gather
        # time.monotonic() before which this pool vouches for nothing: a predecessor that
        # did not release the store may still vouch until then (OWNERSHIP_VALIDITY)
        self.vouch_from = vouch_from
        # cluster mode: whether this node's lease on the pool's hash slot is still valid
        # (checked with the store's ownership: a node vouches only while both hold)
        self.lease: Callable[[], bool] | None = None
        # async pools: after the store refused a batch for good, activations are refused
        # until a write commits again, or for this long (what was acknowledged is lost:
        # do not go on promising what may not be kept).
        self.hold_after_refusal = hold_after_refusal
        self._refusing_until = 0.0
        self._refused_why = ""
        self.key = key
        self.name = name
        self.max_backlog = max_backlog
        self.write_timeout = write_timeout
        self._entries: deque[_Entry] = deque()  # unacknowledged, oldest first
        self._unsent: deque[_Entry] = deque()
        self._clock_us = 0
        self._seq = 0
        self.backlog = 0
        self.state = LinkState.UP
        self.committed = committed  # every change up to this revision is committed
        self.committed_seq = 0  # every batch up to this sequence number is written (or refused)
        self.refused_seqs: dict[int, str] = {}  # refused batches, until the actor takes them
        self.gave_up = False  # shutdown ran out of time: what was pending never will be written
        self.last_commit_at_us: int | None = None
        self.last_batch_lag = 0.0
        self._lags: deque[float] = deque(maxlen=4096)
        self._batch_sizes: deque[int] = deque(maxlen=4096)
        self._histogram = [0] * (len(LAG_BUCKETS) + 1)
        self.batches = 0
        self.changes_written = 0
        self.rejected = 0
        self.lost = 0
        self.stalls = 0
        self.stall_seconds = 0.0
        self._high = False
        self._progress = trio.Event()
        self._last_ack = 0.0
        self._sent: deque[tuple[int, int]] = deque()  # (last seq, frame bytes), tracing on

    # -- the actor's side (no await) --------------------------------------------

    def slowing(self) -> bool:
        """Whether the backlog is past ``SLOW_DOWN`` (cheap: asked before every batch)."""
        return self.backlog > SLOW_DOWN * self.max_backlog

    def stall(self) -> float:
        """Seconds to delay the next activations: none up to ``SLOW_DOWN`` of the backlog,
        then growing with it to ``MAX_STALL`` just short of full, and none once full (the
        actor refuses at once, as before). Counted as a stall."""
        most = self.max_backlog
        if not self.slowing() or self.backlog >= most:
            return 0.0
        mark = SLOW_DOWN * most
        delay = MAX_STALL * (self.backlog - mark) / (most - mark)
        self.stalls += 1
        self.stall_seconds += delay
        return delay

    def full(self) -> bool:
        return (
            self.backlog >= self.max_backlog
            or self.state.lost
            or (self._refusing_until > 0.0 and self._still_refusing())
        )

    def _still_refusing(self) -> bool:
        if trio.current_time() < self._refusing_until:
            return True
        self._refusing_until = 0.0
        return False

    def owns(self) -> bool:
        """Whether this pool can show it still owns its store: only then may it answer
        what vouches for a lease (``Op.vouches``)."""
        if self.state.lost or not self._link.owns():
            return False
        if self.lease is not None and not self.lease():
            return False
        if self.vouch_from and time.monotonic() < self.vouch_from:
            return False
        self.vouch_from = 0.0
        return True

    def disowned(self) -> str:
        """Why ``owns()`` is false (for the ``UnavailableError``)."""
        if self.state.lost:
            return self.refusal()
        if self.lease is not None and not self.lease():
            return (
                "this node's lease on the pool's hash slot ran out (cluster): another node"
                " may own the pool now"
            )
        if self.vouch_from and time.monotonic() < self.vouch_from:
            return (
                "taking over from an owner that did not release the store; it may still"
                f" vouch for {self.vouch_from - time.monotonic():.1f} s more"
            )
        return self._link.disowned()

    def refusal(self) -> str:
        """Why activations are refused now (for the error the actor answers)."""
        if self.state is LinkState.FENCED:
            return "this process no longer owns the pool (fenced); restart it"
        if self.state is LinkState.FAILED:
            return "the store process failed; see the server log"
        if self._refusing_until > 0.0 and self.backlog < self.max_backlog:
            return (
                f"the store refused changes for good ({self._refused_why[:200]});"
                " activations resume once a write commits, see the server log"
            )
        return "the store's write backlog is full; retry shortly"

    def submit(
        self, records: list[Record], counters: dict[str, int], clock_us: int, last_rev: int
    ) -> int | None:
        """Queue one actor batch's records; returns its sequence number (``committed_seq``
        reaches it once it is written), or ``None`` when the store is lost for good."""
        if self.state.lost:
            self.lost += len(records)
            return None
        self._seq += 1
        self._clock_us = max(self._clock_us, clock_us)
        entry = _Entry(self._seq, records, trio.current_time(), last_rev, counters, self._clock_us)
        self._entries.append(entry)
        self._unsent.append(entry)
        self.backlog += entry.size
        if not self._high and self.backlog >= HIGH_WATER * self.max_backlog:
            self._high = True
            log.warning(
                "write_backlog_high",
                pool=self.name,
                backlog=self.backlog,
                max_backlog=self.max_backlog,
                link=self.state,
                note="activations are refused when the backlog is full",
            )
        self._link.wake()
        return self._seq

    @property
    def last_seq(self) -> int:
        """The newest sequence number handed out."""
        return self._seq

    @property
    def progress(self) -> trio.Event:
        """Set (and replaced) whenever something committed, was refused, or failed."""
        return self._progress

    # -- the link's side --------------------------------------------------------

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def take_unsent(self) -> tuple[Any, ...] | None:
        """The frame for the oldest batches not sent yet, or ``None``: up to
        ``MAX_BATCH_RECORDS`` changes (always one batch at least), so a backlog that
        gathered while the store process was stopped goes as several frames, which the
        store process writes as as many transactions, answering proofs between them."""
        unsent = self._unsent
        if not unsent:
            return None
        entries = [unsent.popleft()]
        size = entries[0].size
        while unsent and size + unsent[0].size <= MAX_BATCH_RECORDS:
            entry = unsent.popleft()
            size += entry.size
            entries.append(entry)
        last = entries[-1]
        return (
            "write",
            self.key,
            last.seq,
            [e.records for e in entries],
            last.counters,
            last.clock_us,
        )

    def take_all_unsent(self) -> list[tuple[Any, ...]]:
        """Every frame not sent yet, oldest first (before a request that must follow them)."""
        frames = []
        while (frame := self.take_unsent()) is not None:
            frames.append(frame)
        return frames

    def traced(self, seq: int, context: Any) -> None:
        """The span context of the actor batch that submitted ``seq`` (tracing on)."""
        if self._entries and self._entries[-1].seq == seq:
            self._entries[-1].trace = context

    def sent(self, seq: int, size: int) -> None:
        """The link sent the batches up to ``seq`` in a frame of ``size`` bytes (tracing on)."""
        self._sent.append((seq, size))

    def acknowledged(self, seq: int, written: int, timing: tuple[int, ...] = ()) -> None:
        """Batches up to ``seq`` committed (``written`` changes); ``timing``: when the
        transaction began and committed (ns) and its rows, for its span."""
        now = self._last_ack = trio.current_time()
        entries = self._entries
        if _trace.on and timing:
            self._trace_commit(seq, written, timing)
        while entries and entries[0].seq <= seq:
            entry = entries.popleft()
            self.backlog -= entry.size
            self.committed = max(self.committed, entry.last_rev)
            lag = now - entry.submitted
            self._lags.append(lag)
            self._histogram[bisect_left(LAG_BUCKETS, lag)] += 1
            self.last_batch_lag = lag
        self.committed_seq = max(self.committed_seq, seq)
        self.batches += 1
        self.changes_written += written
        if written:
            self._batch_sizes.append(written)
            if self._refusing_until > 0.0:
                self._refusing_until = 0.0  # the store takes writes again
                log.warning("store_accepts_changes_again", pool=self.name)
        self.last_commit_at_us = self._link.now_us()
        if self.state is LinkState.RETRYING or self.state is LinkState.DOWN:
            self.state = LinkState.UP
        self._drained()
        self._wake()

    def _trace_commit(self, seq: int, written: int, timing: tuple[int, ...]) -> None:
        links = [e.trace for e in self._entries if e.seq <= seq and e.trace is not None]
        sent = 0
        while self._sent and self._sent[0][0] <= seq:
            sent += self._sent.popleft()[1]
        if links:
            began, committed, rows = timing
            _trace.store_batch(self.name, links, began, committed, rows, sent, written)

    def refused(self, seq: int, changes: int, message: str) -> None:
        """The store refused one batch for good: say it loudly, report it by number."""
        self.rejected += changes
        if self.hold_after_refusal > 0.0:  # async: nobody waits to be told
            self._refusing_until = trio.current_time() + self.hold_after_refusal
            self._refused_why = message
        else:  # sync: the actor answers the batch's callers, then forgets it
            self.refused_seqs[seq] = message
        log.error(
            "store_refused_changes",
            pool=self.name,
            changes=changes,
            error=message,
            note="these changes are not in the store; the rest is written as usual"
            + (
                "; activations are refused until a write commits again"
                if self.hold_after_refusal > 0.0
                else ""
            ),
        )
        self.acknowledged(seq, 0)

    def fail(self, state: LinkState, message: str) -> None:
        """Fenced or failed for good: refuse what comes."""
        if self.state == state:
            return
        self.state = state
        log.error(f"store_{state}", pool=self.name, error=message, backlog=self.backlog)
        self._wake()

    def link_state(self, state: LinkState) -> None:
        if not self.state.lost:
            self.state = state

    def stall_deadline(self) -> float | None:
        """The trio time from which ``check_stalled`` finds this writer stalled (a second
        past ``write_timeout`` and the gathering without an acknowledgement while changes
        wait), or ``None`` while it cannot stall (nothing pending, or the link is not up).

        An acknowledgement only moves it later; it appears when changes are submitted to
        an empty backlog, or when the link comes back up.
        """
        if not self._entries or self.state is not LinkState.UP:
            return None
        waited = max(self._last_ack, self._entries[0].submitted)
        return waited + self.gather + self.write_timeout + 1

    def check_stalled(self) -> None:
        """No acknowledgement for longer than a write may take: the store hangs (a
        paused server, a dead link not yet noticed). Say so; the next ack clears it."""
        deadline = self.stall_deadline()
        now = trio.current_time()
        if deadline is not None and now >= deadline:
            self.state = LinkState.RETRYING
            log.warning(
                "store_link_stalled",
                pool=self.name,
                seconds=round(now - deadline + self.gather + self.write_timeout + 1, 3),
                backlog=self.backlog,
                note="no write has committed for longer than write_timeout",
            )

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _drained(self) -> None:
        if self._high and self.backlog <= LOW_WATER * self.max_backlog:
            self._high = False
            log.info("write_backlog_drained", pool=self.name, backlog=self.backlog)

    # -- for the pool -------------------------------------------------------------

    @property
    def write_lag(self) -> float:
        """Seconds the oldest unacknowledged change has waited: 0 when nothing is pending."""
        if not self._entries:
            return 0.0
        return trio.current_time() - self._entries[0].submitted

    async def wait_committed(self, revision: int, timeout: float) -> bool:
        """Wait until every change up to ``revision`` is committed; False on timeout/failure."""
        if self.committed < revision and self._entries:
            self._link.wake(now=True)  # not held back for the gathering of later changes
        with trio.move_on_after(timeout):
            while self.committed < revision and self._entries:
                if self.state.lost:
                    return False
                await self._progress.wait()
            return True
        return False

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed.

        Raises ``UnavailableError`` if the pool no longer owns the store.
        """
        target = self._seq
        if self._entries:
            self._link.wake(now=True)  # not held back for the gathering of later changes
        while self._entries and self._entries[0].seq <= target:
            if self.state.lost:
                raise UnavailableError(self.refusal())
            await self._progress.wait()

    def give_up(self) -> int:
        """Shutdown ran out of time: count what was not written (and never will be)."""
        lost = sum(e.size for e in self._entries)
        self.gave_up = True
        self._entries.clear()
        self._unsent.clear()
        self.backlog = 0
        self.lost += lost
        self._wake()
        return lost

    def lag_histogram(self) -> tuple[tuple[float, int], ...]:
        """Cumulative counts of batches by write lag, as Prometheus buckets (``inf`` last)."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip((*LAG_BUCKETS, float("inf")), self._histogram, strict=True):
            total += count
            out.append((bound, total))
        return tuple(out)

    def statistics(self) -> WriterStatistics:
        lags = sorted(self._lags)

        def pct(p: float) -> float:
            return lags[min(len(lags) - 1, int(p * len(lags)))] if lags else 0.0

        sizes = sorted(self._batch_sizes)
        return WriterStatistics(
            link=self.state,
            backlog=self.backlog,
            max_backlog=self.max_backlog,
            unsent=sum(e.size for e in self._unsent),
            committed_revision=self.committed,
            last_commit_at_us=self.last_commit_at_us,
            write_lag=self.write_lag,
            last_batch_lag=self.last_batch_lag,
            lag_p50=pct(0.5),
            lag_p99=pct(0.99),
            lags=tuple(lags),
            lag_histogram=self.lag_histogram(),
            batches=self.batches,
            changes_written=self.changes_written,
            batch_p50=float(sizes[len(sizes) // 2]) if sizes else 0.0,
            rejected=self.rejected,
            # a failed or fenced link writes nothing more: its backlog is lost already
            # (shutdown counts it so), not only once shutdown comes
            lost=self.lost + (self.backlog if self.state.lost else 0),
            stalls=self.stalls,
            stall_seconds=self.stall_seconds,
        )
