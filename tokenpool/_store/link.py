"""The link to one store process: it starts the process, ships the writers' backlogs
to it, and reports what comes back.

``StoreLink`` owns one store process (``child.py``) per store: a sender task
ships what the writers hold, as it is, in one frame per pool (pickle of lists
of tuples: C speed), and a receiver task reads the acknowledgements and hands
them to the writers' report methods (``acknowledged``, ``refused``, ``fail``,
``link_state``). It also carries the few requests the pools make of the store
(open, list, settings, drop) and answers them.

Rules it keeps:
- The store process lives inside the server's lifecycle: it is started in a
  session of its own and ignores SIGINT/SIGTERM, so a signal to the process
  group reaches only the server, which tells it to ``close``; it exits at end
  of file too, so it never outlives the server.
- A store process that exits is noticed at once (end of file on the socket):
  it is logged, every writer turns ``failed`` (the pools refuse changes) and
  pending requests are answered ``UnavailableError``. It is not restarted.
- Every request (open, list, settings, drop) has a deadline (``lock_wait`` +
  ``write_timeout``): a paused store process never holds a caller forever.
- Shutdown is bounded: ``close`` waits at most ``shutdown_timeout`` for the
  backlogs (``hurry`` shortens it), then counts every change not committed,
  whatever the cause (timeout, a dead store process, changes submitted after
  it died), logs ``changes_not_written`` and returns the count.
- Ownership is a lease the link keeps renewing: every ``OWNERSHIP_INTERVAL`` it asks
  the store process to prove it still owns the store, and ``owns()`` is true until
  ``OWNERSHIP_VALIDITY`` after the last proof that succeeded, counted from when that
  proof was sent (monotonic clock). A dead store process ends it at once.
"""

from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .. import _trace
from .._errors import TokenPoolError, UnavailableError
from .._log import get_logger
from . import OWNERSHIP_INTERVAL, OWNERSHIP_VALIDITY, LinkState, Snapshot, redact
from .frames import FrameDecoder, FrameError, encode

EXIT_GRACE = 0.5
"""Seconds the store process is given to exit after close, even at the shutdown's end:
it releases its pools, so the next owner need not wait out this one's validity."""
PROOFS_IN_FLIGHT = 3  # ownership proofs asked and not yet answered, at most

if TYPE_CHECKING:
    from .._writer import Writer

log = get_logger("tokenpool.store")


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
        take_over: bool = False,
    ) -> None:
        self.take_over = take_over
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
        self._unawaited: set[int] = set()  # requests whose reply nobody waits for
        self._outbox: deque[tuple[Any, ...]] = deque()
        self._wakeup = trio.Event()
        self._urgent = trio.Event()  # a request, a close or a death: send without gathering
        self._stall_wakeup = trio.Event()
        self._stall_idle = False  # the stall watcher has no deadline: wake it on news
        self._stream: trio.SocketStream | None = None
        self._process: trio.Process | None = None
        self._closing = False
        self._dead = False
        self.died = False  # it exited before the server told it to: shutdown exits non-zero
        self._close_scope: trio.CancelScope | None = None
        self._exit_by = math.inf  # closing: the moment the store process must have exited by
        self._exit_scope: trio.CancelScope | None = None  # the wait for it to exit
        self._hurry_at = math.inf  # a second signal: the latest moment close may wait to
        self._lost_dropped = 0  # changes lost by writers of pools dropped since
        self.state = LinkState.UP
        self.valid_until = 0.0  # time.monotonic() up to which the last proof vouches
        self.proof_error = ""  # why the last proof failed, for the refusal's message

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
                # Not in the server's process group: a Ctrl-C or a stop sent to the
                # group is the server's to act on (the process also ignores both).
                start_new_session=True,
            )
        finally:
            theirs.close()
        log.info("store_process_started", store=self.shown, pid=self._process.pid)
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        self._outbox.appendleft(
            (
                "hello",
                {
                    "url": self.url,
                    "durability": self.durability,
                    "write_timeout": self.write_timeout,
                    "shutdown_timeout": self.shutdown_timeout,
                    "lock_wait": self.lock_wait,
                    "take_over": self.take_over,
                },
            )
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive)
                nursery.start_soon(self._watch_stalls)
                nursery.start_soon(self._keep_proving)
                task_status.started()
                await self._send()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._reap()

    async def _wait_exit(self, deadline: float) -> None:
        """Wait for the store process to exit, until ``deadline`` (which a second signal
        brings closer: ``hurry``)."""
        assert self._process is not None
        with trio.CancelScope(deadline=min(deadline, self._hurry_at)) as scope:
            self._exit_scope = scope
            await self._process.wait()
        self._exit_scope = None

    async def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        await self._wait_exit(min(self._exit_by, trio.current_time() + self.shutdown_timeout + 2))
        if process.returncode is None:
            log.error("store_process_killed", store=self.shown, pid=process.pid)
            process.kill()
            await process.wait()
        if self._stream is not None:
            await self._stream.aclose()

    async def close(self) -> int:
        """Write what is queued (at most ``shutdown_timeout``), then stop the process.

        Returns how many changes were not written, whatever the cause: the timeout ran
        out, the store process died with changes unacknowledged, or changes were
        submitted after it died (logged once as ``changes_not_written``).
        """
        self._closing = True
        self._urgent.set()
        began = trio.current_time()
        deadline = min(began + self.shutdown_timeout, self._hurry_at)
        with trio.CancelScope(deadline=deadline) as scope:
            self._close_scope = scope
            for writer in list(self.writers.values()):
                with contextlib.suppress(TokenPoolError):
                    await writer.flush()
        self._close_scope = None
        # Whatever was written, the process is given no longer than the shutdown to exit
        # (it waited up to 12 s for a stopped one with nothing to write, and a second
        # signal did not shorten that)
        self._exit_by = max(deadline, trio.current_time() + EXIT_GRACE)
        for writer in self.writers.values():
            if writer.backlog:
                writer.give_up()
        lost = self._lost_dropped + sum(writer.lost for writer in self.writers.values())
        if lost:
            if self._dead:
                note = "the store process exited before it wrote them"
            elif scope.cancelled_caught and self._hurry_at <= scope.deadline:
                note = "the store did not take them before a second signal cut shutdown short"
            elif scope.cancelled_caught:
                note = "the store did not take them before the shutdown timeout"
            else:
                note = "the store refused them or lost ownership"
            log.error(
                "changes_not_written",
                store=self.shown,
                changes=lost,
                seconds=round(trio.current_time() - began, 3),  # waited for the store
                shutdown_timeout=self.shutdown_timeout,
                note=note,
            )
        process = self._process
        if scope.cancelled_caught and process is not None and process.returncode is None:
            process.kill()  # what it still holds is counted above: do not wait on it
        self._outbox.append(("close",))
        self.wake()
        return lost

    def hurry(self, seconds: float) -> None:
        """Shorten shutdown (a second signal): ``close`` waits at most ``seconds`` more."""
        self._hurry_at = min(self._hurry_at, trio.current_time() + seconds)
        for scope in (self._close_scope, self._exit_scope):
            if scope is not None:
                scope.deadline = min(scope.deadline, self._hurry_at)

    def wake(self, now: bool = False) -> None:
        """Something is queued to send: let the sender run (cheap when already woken).
        A request, a close, a death or a flush (``now``) is sent without waiting for
        the changes after it to gather."""
        if not self._wakeup.is_set():
            self._wakeup.set()
        if (now or self._outbox or self._dead) and not self._urgent.is_set():
            self._urgent.set()
        if self._stall_idle:  # changes submitted to an empty backlog: they may stall
            self._rewatch()

    def _rewatch(self) -> None:
        """Have the stall watcher recompute its deadline: a writer may stall sooner now."""
        self._stall_idle = False
        self._stall_wakeup.set()

    # -- requests ---------------------------------------------------------------

    async def _request(self, kind: str, *args: object) -> Any:
        """Ask the store process; raises ``UnavailableError`` when it is not running or
        does not answer within ``lock_wait + write_timeout`` (a paused process)."""
        if self._dead:
            raise UnavailableError(f"the store process for {self.shown} is not running")
        self._next_request += 1
        request = self._next_request
        event = self._reply_events[request] = trio.Event()
        for writer in self.writers.values():  # what was submitted before goes first
            self._outbox.extend(writer.take_all_unsent())
        self._outbox.append((kind, request, *args))
        self.wake()
        seconds = self.lock_wait + self.write_timeout
        with trio.move_on_after(seconds):
            await event.wait()
        if not event.is_set():
            del self._reply_events[request]  # a late reply is dropped (``_dispatch``)
            log.error("store_request_timeout", store=self.shown, request=kind, seconds=seconds)
            raise UnavailableError(
                f"the store process for {self.shown} did not answer {kind!r} within"
                f" {seconds:g} s (lock_wait + write_timeout); see the server log"
            )
        (result,) = self._replies.pop(request)
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def requests(self) -> int:
        """How many requests (open, list, settings, drop, proofs) were sent to the store
        process so far: recovery's stay bounded whatever the number of pools."""
        return self._next_request

    def owns(self) -> bool:
        """Whether a proof that this process owns the store still vouches (it is never
        true once the store process has died)."""
        return not self._dead and time.monotonic() <= self.valid_until

    def disowned(self) -> str:
        """Why ``owns()`` is false, for the ``UnavailableError`` a vouching request gets."""
        if self._dead:
            why = "its store process exited"
        elif self.proof_error:
            why = self.proof_error[:200]
        else:
            why = (
                f"no proof within {OWNERSHIP_VALIDITY:g} s (the store process is stopped,"
                " or the store blocks it: another process's lock, a stalled connection)"
            )
        return f"cannot show it still owns the store {self.shown}: {why}"

    def _proved(self, sent: float) -> None:
        self.valid_until = max(self.valid_until, sent + OWNERSHIP_VALIDITY)
        self.proof_error = ""

    async def prove(self) -> None:
        """Ask the store process to show it still owns the store; renew ``owns()``.

        A proof answered too late to vouch (the store process was stopped, or busy) is
        asked again at once, so ownership comes back as soon as the store process
        answers, not a beat later while a backlog it could vouch beside drains."""
        while True:
            sent = time.monotonic()  # the proof vouches from when it was asked, not answered
            try:
                await self._request("prove", 0)
            except TokenPoolError as error:
                self.proof_error = str(error)
                return
            self._proved(sent)
            if self.owns() or self._closing or self._dead:
                return

    async def _keep_proving(self) -> None:
        """Ask for a proof every ``OWNERSHIP_INTERVAL``, on a fixed beat: a proof slow
        to come back (the store process busy with a long transaction) must not push the
        next one later. Asked one after another, two answers of half a second each let
        ``OWNERSHIP_VALIDITY`` run out between them, and the server refused changes while
        its store was only busy. At most ``PROOFS_IN_FLIGHT`` wait at once (a stopped
        store process answers none; each gives up after ``lock_wait + write_timeout``)."""
        in_flight = 0

        async def one() -> None:
            nonlocal in_flight
            try:
                await self.prove()
            finally:
                in_flight -= 1

        async with trio.open_nursery() as nursery:
            beat = trio.current_time()
            while not self._dead:
                beat = max(beat + OWNERSHIP_INTERVAL, trio.current_time())
                await trio.sleep_until(beat)
                if self.writers and not self._closing and in_flight < PROOFS_IN_FLIGHT:
                    in_flight += 1
                    nursery.start_soon(one)

    async def open_pool(
        self, name: str, settings: dict[str, Any], create: bool
    ) -> tuple[int, Snapshot]:
        """Take ownership of a pool in the store process and load it."""
        self._next_key += 1
        key = self._next_key
        sent = time.monotonic()
        snapshot: Snapshot = await self._request("open", key, name, settings, create)
        self._proved(sent)  # it took (or holds) the lock just now
        return key, snapshot

    async def open_pools(self, names: list[str]) -> list[tuple[int, Snapshot]]:
        """Take ownership of many stored pools and load them: ONE request, whatever
        their number (restore at start)."""
        keys = list(range(self._next_key + 1, self._next_key + 1 + len(names)))
        self._next_key += len(names)
        sent = time.monotonic()
        snapshots: list[Snapshot] = await self._request("open_many", 0, keys, names)
        self._proved(sent)
        return list(zip(keys, snapshots, strict=True))

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
        writer = self.writers.pop(key, None)
        if writer is not None:
            self._lost_dropped += writer.lost

    async def release_pool(self, key: int) -> None:
        """Write what the pool has pending, then stop owning it (cluster mode: its slot
        moves). The writer is forgotten even if the store process does not answer."""
        try:
            await self._request("release", key)
        finally:
            writer = self.writers.pop(key, None)
            if writer is not None:
                self._lost_dropped += writer.lost

    def forget_pool(self, key: int) -> None:
        """``release_pool`` without waiting (cluster mode, the node's lease ran out and
        the store may be down): the store process writes what it holds for the pool,
        then releases it, whenever it can; nothing here waits for it."""
        writer = self.writers.pop(key, None)
        if writer is not None:
            self._lost_dropped += writer.lost
        if self._dead:
            return
        if writer is not None:
            self._outbox.extend(writer.take_all_unsent())  # what it submitted goes first
        self._next_request += 1
        self._unawaited.add(self._next_request)
        self._outbox.append(("release", self._next_request, key))
        self.wake()

    # -- tasks ------------------------------------------------------------------

    async def _send(self) -> None:
        assert self._stream is not None
        stream = self._stream
        while True:
            if self._urgent.is_set():  # what set it is in this frame: only later news counts
                self._urgent = trio.Event()
            frames: list[tuple[Any, ...]] = []
            while self._outbox:
                frames.append(self._outbox.popleft())
            more = False  # a writer has more than one frame's worth: send it without a pause
            for writer in self.writers.values():
                frame = writer.take_unsent()
                if frame is not None:
                    frames.append(frame)
                    more = more or writer.has_unsent
                    if _trace.on:  # the bytes of the frame, for the store batch's span
                        writer.sent(frame[2], len(encode((frame,))))
            if frames:
                try:
                    await stream.send_all(encode(frames))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if frames[-1][0] == "close":
                    await self._wait_exit(self._exit_by)  # it writes what it has, and exits
                    return
                if self.flush_interval and not self._closing and not more:
                    # async: let the next changes gather for ``flush_interval`` and go
                    # as one frame (one wakeup of the store process, one transaction)
                    # rather than one frame per actor turn. A request, a close or a
                    # death cuts the wait short.
                    with trio.move_on_after(self.flush_interval):
                        await self._urgent.wait()
                continue
            if self._dead:
                return
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _receive(self) -> None:
        assert self._stream is not None
        decoder = FrameDecoder()
        while True:
            try:
                chunk = await self._stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                self._died()
                return
            try:
                messages = decoder.feed(chunk)
            except FrameError as error:  # the stream is lost: end the process, as if it died
                log.error("store_link_corrupt", store=self.shown, error=str(error))
                if self._process is not None and self._process.returncode is None:
                    self._process.kill()
                self._died()
                return
            for message in messages:
                self._dispatch(message)
            if self._stall_idle:  # an acknowledgement may have left a writer up and waiting
                self._rewatch()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ack":
            writer = self.writers.get(message[1])
            if writer is not None:
                writer.acknowledged(message[2], message[3], message[4:])
        elif kind == "reply":
            event = self._reply_events.pop(message[1], None)
            if event is None and message[1] in self._unawaited:
                self._unawaited.discard(message[1])
                return
            if event is None:  # its caller gave up waiting (deadline): nobody to answer
                log.warning("store_reply_late", store=self.shown, request=message[1])
                return
            self._replies[message[1]] = [message[2]]
            event.set()
        elif kind == "link":
            state, error = LinkState(message[1]), message[2]
            previous, self.state = self.state, state
            for writer in self.writers.values():
                writer.link_state(state)
            self._rewatch()  # a writer back up may stall sooner than the watcher expects
            if state is LinkState.UP:
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
                writer.fail(LinkState.FENCED, message[2])
        elif kind == "gave_up":
            log.error("changes_not_written", store=self.shown, changes=message[1], error=message[2])
        elif kind == "log":
            getattr(log, message[1])(message[2], store=self.shown, **message[3])

    def _died(self) -> None:
        if self._dead:
            return
        self._dead = True
        self.valid_until = 0.0
        if not self._closing or any(w.backlog for w in self.writers.values()):
            code = self._process.returncode if self._process is not None else None
            self.died = True
            log.error(
                "store_process_exited",
                store=self.shown,
                code=code,
                unwritten=sum(w.backlog for w in self.writers.values()),
                note="changes are refused until the server restarts; what was not"
                " written is counted at shutdown",
            )
            for writer in self.writers.values():
                writer.fail(
                    LinkState.FAILED, f"the store process for {self.shown} exited (code {code})"
                )
        for request, event in list(self._reply_events.items()):
            self._replies[request] = [
                UnavailableError(f"the store process for {self.shown} exited")
            ]
            event.set()
        self._reply_events.clear()
        self.wake()

    async def _watch_stalls(self) -> None:
        """Mark a writer stalled once no acknowledgement came for a second past
        ``write_timeout`` while its changes wait. Sleeps until the earliest moment one
        could stall; while none could, until ``wake`` or an acknowledgement."""
        while True:
            deadlines = [d for w in self.writers.values() if (d := w.stall_deadline()) is not None]
            self._stall_wakeup = trio.Event()
            if deadlines:
                self._stall_idle = False
                with trio.move_on_at(min(deadlines)):
                    await self._stall_wakeup.wait()
            else:
                self._stall_idle = True
                await self._stall_wakeup.wait()
            for writer in self.writers.values():
                writer.check_stalled()
