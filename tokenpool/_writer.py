"""Write-behind, the server's side: per-pool backlogs and the link to the store process.

The actor never waits on the database: it hands each batch's change records
to ``Writer.submit`` (no await, no I/O), gets a sequence number back, and
moves on. ``StoreLink`` owns one store process (``_store/child.py``) per
store: a sender task ships what was submitted, as it is, in one frame per
pool (pickle of lists of tuples: C speed), and a receiver task reads the
acknowledgements. The writer only reports: what committed (``committed_seq``,
``committed``), what the store refused for good (``refused``), and whether it
lost the store; the actor, which owns its callers, answers them. Nothing here
knows a request.

Rules it keeps:
- The backlog (changes not yet acknowledged) is bounded: at ``max_backlog``
  ``full()`` turns true and the actor refuses activations with
  ``UnavailableError`` until it drains. Crossing the high-water mark and
  draining are logged once each.
- A change the store refused for good is logged with the reason and reported
  by its sequence number. A store process that died, or a pool fenced by a
  newer owner, turns the link ``failed``/``fenced``: activations are refused
  and readiness reports it.
- Shutdown is bounded: ``close`` waits at most ``shutdown_timeout`` for the
  backlog, then says how many changes were not written and stops the process.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import struct
import subprocess
import sys
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ._errors import TokenPoolError, UnavailableError
from ._log import get_logger
from ._model import Record, to_wire
from ._store import Snapshot, redact

log = get_logger("tokenpool.writer")

_LEN = struct.Struct(">I")
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Upper bounds (seconds) of the write-lag histogram (submitted to committed, per batch)."""
HIGH_WATER = 0.5  # of max_backlog: log once when crossed, once when drained below LOW_WATER
LOW_WATER = 0.1


@attrs.frozen
class WriterStatistics:
    """The write-behind of one pool, as ``Pool.statistics()`` reports it."""

    link: str
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


class _Entry:
    __slots__ = ("last_rev", "records", "seq", "size", "submitted")

    def __init__(self, seq: int, records: list[Record], submitted: float, last_rev: int) -> None:
        self.seq = seq
        self.records = records
        self.size = len(records)
        self.submitted = submitted
        self.last_rev = last_rev


class Writer:
    """One pool's write-behind: the actor submits, the link sends, acknowledgements commit."""

    def __init__(
        self,
        link: StoreLink,
        key: int,
        name: str,
        *,
        max_backlog: int,
        write_timeout: float,
        committed: int,
        hold_after_refusal: float = 0.0,
    ) -> None:
        self._link = link
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
        self._unsent: list[_Entry] = []
        self._counters: dict[str, int] = {}
        self._clock_us = 0
        self._seq = 0
        self.backlog = 0
        self.state = "up"  # up | retrying | down | fenced | failed
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
        self._high = False
        self._progress = trio.Event()
        self._last_ack = 0.0

    # -- the actor's side (no await) --------------------------------------------

    def full(self) -> bool:
        return (
            self.backlog >= self.max_backlog
            or self.state in ("fenced", "failed")
            or (self._refusing_until > 0.0 and self._still_refusing())
        )

    def _still_refusing(self) -> bool:
        if trio.current_time() < self._refusing_until:
            return True
        self._refusing_until = 0.0
        return False

    def refusal(self) -> str:
        """Why activations are refused now (for the error the actor answers)."""
        if self.state == "fenced":
            return "this process no longer owns the pool (fenced); restart it"
        if self.state == "failed":
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
        if self.state in ("fenced", "failed"):
            self.lost += len(records)
            return None
        self._seq += 1
        entry = _Entry(self._seq, records, trio.current_time(), last_rev)
        self._entries.append(entry)
        self._unsent.append(entry)
        self._counters = counters
        self._clock_us = max(self._clock_us, clock_us)
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

    def take_unsent(self) -> tuple[Any, ...] | None:
        """The frame for everything submitted since the last one, or ``None``."""
        if not self._unsent:
            return None
        entries, self._unsent = self._unsent, []
        return (
            "write",
            self.key,
            entries[-1].seq,
            [to_wire(e.records) for e in entries],
            self._counters,
            self._clock_us,
        )

    def acknowledged(self, seq: int, written: int) -> None:
        now = self._last_ack = trio.current_time()
        entries = self._entries
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
        if self.state in ("retrying", "down"):
            self.state = "up"
        self._drained()
        self._wake()

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

    def fail(self, state: str, message: str) -> None:
        """Fenced or failed for good: refuse what comes."""
        if self.state == state:
            return
        self.state = state
        log.error(f"store_{state}", pool=self.name, error=message, backlog=self.backlog)
        self._wake()

    def link_state(self, state: str) -> None:
        if self.state not in ("fenced", "failed"):
            self.state = state

    def check_stalled(self) -> None:
        """No acknowledgement for longer than a write may take: the store hangs (a
        paused server, a dead link not yet noticed). Say so; the next ack clears it."""
        if not self._entries or self.state != "up":
            return
        quiet = trio.current_time() - max(self._last_ack, self._entries[0].submitted)
        if quiet > self.write_timeout + 1:
            self.state = "retrying"
            log.warning(
                "store_link_stalled",
                pool=self.name,
                seconds=round(quiet, 3),
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
        with trio.move_on_after(timeout):
            while self.committed < revision and self._entries:
                if self.state in ("fenced", "failed"):
                    return False
                await self._progress.wait()
            return True
        return False

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed.

        Raises ``UnavailableError`` if the pool no longer owns the store.
        """
        target = self._seq
        while self._entries and self._entries[0].seq <= target:
            if self.state in ("fenced", "failed"):
                raise UnavailableError(self.refusal())
            await self._progress.wait()

    def give_up(self) -> int:
        """Shutdown ran out of time: count what was not written (and never will be)."""
        lost = sum(e.size for e in self._entries)
        self.gave_up = True
        self._entries.clear()
        self._unsent = []
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
            lost=self.lost,
        )


class StoreLink:
    """One store process and the tasks that talk to it. Run ``run`` in a nursery."""

    def __init__(
        self,
        url: str,
        *,
        durability: str,
        flush_interval: float,
        write_timeout: float,
        shutdown_timeout: float,
        now_us: Callable[[], int],
        lock_wait: float = 5.0,
    ) -> None:
        self.lock_wait = lock_wait
        self.url = url
        self.shown = redact(url)
        self.kind = "postgresql" if url.startswith("postgres") else "sqlite"
        self.durability = durability
        self.flush_interval = flush_interval
        self.write_timeout = write_timeout
        self.shutdown_timeout = shutdown_timeout
        self.now_us = now_us
        self.writers: dict[int, Writer] = {}
        self._next_key = 0
        self._next_request = 0
        self._replies: dict[int, list[Any]] = {}
        self._reply_events: dict[int, trio.Event] = {}
        self._outbox: deque[tuple[Any, ...]] = deque()
        self._wakeup = trio.Event()
        self._stream: trio.SocketStream | None = None
        self._process: trio.Process | None = None
        self._closing = False
        self._dead = False
        self.state = "up"

    # -- lifecycle ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the store process, then send and receive until ``close``."""
        ours, theirs = socket.socketpair()
        try:
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tokenpool._store.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        self._outbox.appendleft(
            (
                "hello",
                {
                    "url": self.url,
                    "durability": self.durability,
                    "flush_interval": self.flush_interval,
                    "write_timeout": self.write_timeout,
                    "shutdown_timeout": self.shutdown_timeout,
                    "lock_wait": self.lock_wait,
                },
            )
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive)
                nursery.start_soon(self._watch_deadlines)
                task_status.started()
                await self._send()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._reap()

    async def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        with trio.move_on_after(self.shutdown_timeout + 2):
            await process.wait()
        if process.returncode is None:
            log.error("store_process_killed", store=self.shown, pid=process.pid)
            process.kill()
            await process.wait()
        if self._stream is not None:
            await self._stream.aclose()

    async def close(self) -> int:
        """Write what is queued (at most ``shutdown_timeout``), then stop the process.

        Returns how many changes were not written (logged as ``changes_not_written``).
        """
        self._closing = True
        with trio.move_on_after(self.shutdown_timeout) as scope:
            for writer in list(self.writers.values()):
                with contextlib.suppress(TokenPoolError):
                    await writer.flush()
        lost = 0
        if scope.cancelled_caught:
            for writer in self.writers.values():
                lost += writer.give_up()
            log.error(
                "changes_not_written",
                store=self.shown,
                changes=lost,
                seconds=self.shutdown_timeout,
                note="the store did not take them before the shutdown timeout",
            )
            if self._process is not None and self._process.returncode is None:
                self._process.kill()  # what it still holds is counted above: do not wait on it
        self._outbox.append(("close",))
        self._wake()
        return lost

    def wake(self) -> None:
        if not self._wakeup.is_set():
            self._wakeup.set()

    _wake = wake

    # -- requests ---------------------------------------------------------------

    async def _request(self, kind: str, *args: object) -> Any:
        if self._dead:
            raise UnavailableError(f"the store process for {self.shown} is not running")
        self._next_request += 1
        request = self._next_request
        event = self._reply_events[request] = trio.Event()
        for writer in self.writers.values():  # what was submitted before goes first
            frame = writer.take_unsent()
            if frame is not None:
                self._outbox.append(frame)
        self._outbox.append((kind, request, *args))
        self._wake()
        await event.wait()
        (result,) = self._replies.pop(request)
        if isinstance(result, BaseException):
            raise result
        return result

    async def open_pool(
        self, name: str, settings: dict[str, Any], create: bool
    ) -> tuple[int, Snapshot]:
        """Take ownership of a pool in the store process and load it."""
        self._next_key += 1
        key = self._next_key
        snapshot: Snapshot = await self._request("open", key, name, settings, create)
        return key, snapshot

    async def list_pools(self) -> list[str]:
        """The names of the pools the store holds (not dropped), oldest first."""
        names: list[str] = await self._request("list", 0)
        return names

    def add_writer(self, writer: Writer) -> None:
        self.writers[writer.key] = writer

    async def save_settings(self, key: int, settings: dict[str, Any]) -> None:
        await self._request("settings", key, settings)

    async def drop_pool(self, key: int) -> None:
        await self._request("drop", key)
        self.writers.pop(key, None)

    # -- tasks ------------------------------------------------------------------

    async def _send(self) -> None:
        assert self._stream is not None
        stream = self._stream
        while True:
            frames: list[tuple[Any, ...]] = []
            while self._outbox:
                frames.append(self._outbox.popleft())
            for writer in self.writers.values():
                frame = writer.take_unsent()
                if frame is not None:
                    frames.append(frame)
            if frames:
                data = b"".join(
                    _LEN.pack(len(p)) + p
                    for p in (pickle.dumps(f, protocol=pickle.HIGHEST_PROTOCOL) for f in frames)
                )
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if frames[-1][0] == "close":
                    # Wait for the process to write what it has and exit.
                    assert self._process is not None
                    with trio.move_on_after(5):  # it has nothing left to write
                        await self._process.wait()
                    return
                continue
            if self._dead:
                return
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _receive(self) -> None:
        assert self._stream is not None
        buf = bytearray()
        while True:
            try:
                chunk = await self._stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                self._died()
                return
            buf += chunk
            pos = 0
            while len(buf) - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if len(buf) - pos - 4 < size:
                    break
                self._dispatch(pickle.loads(buf[pos + 4 : pos + 4 + size]))
                pos += 4 + size
            del buf[:pos]

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ack":
            writer = self.writers.get(message[1])
            if writer is not None:
                writer.acknowledged(message[2], message[3])
        elif kind == "reply":
            self._replies[message[1]] = [message[2]]
            self._reply_events.pop(message[1]).set()
        elif kind == "link":
            state, error = message[1], message[2]
            previous, self.state = self.state, state
            for writer in self.writers.values():
                writer.link_state(state)
            if state == "up":
                log.info("store_link_up", store=self.shown, was=previous)
            else:
                log.warning(f"store_link_{state}", store=self.shown, error=error)
        elif kind == "rejected":
            writer = self.writers.get(message[1])
            if writer is not None:
                writer.refused(message[2], message[3], message[4])
        elif kind == "fenced":
            writer = self.writers.get(message[1])
            if writer is not None:
                writer.fail("fenced", message[2])
        elif kind == "gave_up":
            log.error("changes_not_written", store=self.shown, changes=message[1], error=message[2])
        elif kind == "log":
            getattr(log, message[1])(message[2], store=self.shown, **message[3])

    def _died(self) -> None:
        if self._dead:
            return
        self._dead = True
        if not self._closing:
            code = self._process.returncode if self._process is not None else None
            for writer in self.writers.values():
                writer.fail("failed", f"the store process for {self.shown} exited (code {code})")
        for request, event in list(self._reply_events.items()):
            self._replies[request] = [
                UnavailableError(f"the store process for {self.shown} exited")
            ]
            event.set()
        self._reply_events.clear()
        self._wake()

    async def _watch_deadlines(self) -> None:
        while True:
            await trio.sleep(0.05)
            for writer in self.writers.values():
                writer.check_stalled()
