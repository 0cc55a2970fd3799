"""The store process: the write-behind's database work, off the server's GIL.

The server starts one per store (``python -m tokenpool._store.child FD``)
and talks to it over a socketpair in length-prefixed pickle frames. This
process owns the store's connections and ownership locks, folds what
arrived into one batch per pool, writes each in one transaction, and
acknowledges what committed. It never calls back into the server: the server
learns what committed from the acknowledgements and answers its own callers.

Rules it keeps:
- Writes keep their order per pool; a batch is idempotent, so after an
  ambiguous failure it is retried whole, grown by whatever arrived meanwhile.
- Transient failures back off exponentially with jitter (capped); each
  change of the link's state is reported once.
- A write the database refuses for good (a constraint, a bad value) is split
  into the server's batches and retried one by one; a batch that is still
  refused is reported loudly and dropped, so it never blocks what follows.
- It lives inside the server's lifecycle: it ignores SIGINT, SIGTERM and SIGHUP (a
  Ctrl-C or a stop sent to the whole process group is the server's to act
  on; it is also started in a session of its own), and when the server says
  ``close`` or goes away (end of file on the socket) it writes what reached
  it, then exits, which frees the ownership locks; shutdown is bounded by
  ``shutdown_timeout``.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

from .._errors import TokenPoolError
from .._model import ADD, KIND, Record, added_tokens
from . import (
    MAX_BATCH_RECORDS,
    Batch,
    FencedError,
    LinkState,
    RejectedError,
    SlotTokens,
    Store,
    StoreError,
    open_store,
)
from .frames import FrameDecoder, encode


def _head(entries: list[Any], limit: int) -> list[Any]:
    """The oldest entries holding up to ``limit`` records (always at least one entry)."""
    total = 0
    for i, (_seq, chunks, _c, _t) in enumerate(entries):
        total += sum(len(r) for r in chunks)
        if total > limit and i:
            return entries[:i]
    return entries


def _timing(began: int, batch: Batch) -> tuple[int, int, int]:
    """What an acknowledgement tells of its transaction, for the server's store-batch
    span: when it began and committed (wall-clock nanoseconds) and the rows written."""
    rows = len(batch.history) + len(batch.final) + len(batch.tokens_added)
    return began, time.time_ns(), rows + len(batch.tokens_retired)


class Channel:
    """Frames (``frames.py``) over a blocking socket, read by a thread of their own.

    Why a thread: the process reads only between two transactions, and a socket buffer
    holds about 200 KB. Read from the writing loop, a busy store took in one buffer per
    transaction, so the server's frames (and an ownership proof behind them) waited in
    the server for as many transactions as they filled buffers: a proof came back after
    the server's validity ran out. The reader takes in whatever arrives as it arrives
    (how much can be in flight is bounded by the server's ``max_backlog``), so the loop
    finds every message that came, the proofs among them, after each transaction.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        self._inbox: list[Any] = []
        self._eof = False
        self._error: BaseException | None = None  # raised by ``receive``, in the loop's thread
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="store-channel", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        decoder = FrameDecoder()
        arrived = self._arrived
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                chunk = b""
            try:
                messages = decoder.feed(chunk) if chunk else []
            except BaseException as error:  # a corrupt frame, one that will not unpickle
                with arrived:
                    self._error = error
                    arrived.notify()
                return
            if messages or not chunk:
                with arrived:
                    self._inbox += messages
                    self._eof = not chunk
                    arrived.notify()
            if not chunk:
                return

    def send(self, message: object) -> None:
        try:
            self.sock.sendall(encode((message,)))
        except OSError:
            self.closed = True

    def receive(self, timeout: float | None) -> list[Any]:
        """Every whole message that arrived, waiting up to ``timeout`` for one (``None``:
        until one comes). Sets ``closed`` at end of file once every message before it
        was taken; raises what decoding raised (``FrameError`` on a corrupt stream, a
        pickle error on a frame that does not load) once the messages before it were
        taken, so the process exits as it did when it read the socket itself."""
        with self._arrived:
            self._arrived.wait_for(
                lambda: self._inbox or self._eof or self._error is not None, timeout
            )
            out, self._inbox = self._inbox, []
            if self._error is not None and not out:
                raise self._error
            if self._eof:
                self.closed = True
        return out


class PoolSink:
    """One pool's pending writes and its slot-to-token table."""

    def __init__(self, key: int, pool_id: int, tokens: SlotTokens) -> None:
        self.key = key
        self.pool_id = pool_id
        self.tokens = tokens
        self.pending: list[tuple[int, list[list[Record]], dict[str, int], int]] = []
        self.fenced = False


class StoreProcess:
    def __init__(self, channel: Channel, config: dict[str, Any]) -> None:
        self.channel = channel
        self.write_timeout = float(config["write_timeout"])
        self.shutdown_timeout = float(config["shutdown_timeout"])
        self.retry_cap = float(config.get("retry_cap", 5.0))
        self.store: Store = open_store(
            config["url"],
            write_timeout=self.write_timeout,
            durability=config["durability"],
            lock_wait=float(config.get("lock_wait", 5.0)),
            take_over=bool(config.get("take_over", False)),
        )
        self.sinks: dict[int, PoolSink] = {}
        self.link = LinkState.UP
        self.closing_since: float | None = None
        # Every message read and not yet handled, oldest first. ONE queue, whoever reads
        # (the loop, a back-off, between two transactions) and whoever handles (a
        # back-off handles what an outer caller had not reached yet): per pool, writes
        # are handled in the order they came.
        self.queue: deque[tuple[Any, ...]] = deque()

    def log(self, level: str, event: str, **fields: object) -> None:
        self.channel.send(("log", level, event, fields))

    def set_link(self, state: LinkState, error: BaseException | None) -> None:
        if state is not self.link:
            self.link = state
            self.channel.send(("link", state.value, "" if error is None else str(error)))

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        while True:
            pending = bool(self.queue) or any(s.pending for s in self.sinks.values())
            if self.channel.closed and self.closing_since is None:
                self.closing_since = time.monotonic()
            if self.closing_since is not None and not pending:
                return
            # Changes come already gathered (the server sends an async store's changes
            # once per ``flush_interval``, sooner only with a request, a flush or a
            # close): write what is here at once.
            self.queue.extend(self.channel.receive(0.0 if pending else None))
            self.handle_queued()
            self.write_all()

    def handle_queued(self) -> None:
        queue = self.queue
        while queue:
            self.handle(queue.popleft())

    def between_transactions(self) -> None:
        """Take in what arrived while a transaction ran, and answer an ownership proof
        at once; the rest waits in the queue, in order.

        Why: a backlog is written in several transactions (``MAX_BATCH_RECORDS`` each,
        up to half a second apiece on SQLite under a sustained load). A proof queued
        behind all of them came back after the server's ``OWNERSHIP_VALIDITY`` had run
        out, and the server refused every change (``UNAVAILABLE``) while its store was
        merely busy. A proof says who owns the store now, whatever is queued: it may
        pass anything (a pool opened, dropped or handed over later is not in it)."""
        for message in self.channel.receive(0):
            if message[0] == "prove":
                self.handle(message)
            else:
                self.queue.append(message)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "write":
            _, key, seq, chunks, counters, clock_us = message
            sink = self.sinks.get(key)
            if sink is not None and not sink.fenced:
                sink.pending.append((seq, chunks, counters, clock_us))
            return
        if kind == "close":
            self.closing_since = time.monotonic()
            return
        request, key = message[1], message[2]
        try:
            if kind == "open":
                _, _, _, name, settings, create = message
                snapshot = self.store.open_pool(name, settings, create)
                tokens = SlotTokens(t for t, _ in snapshot.tokens)
                self.sinks[key] = PoolSink(key, snapshot.pool_id, tokens)
                self.channel.send(("reply", request, snapshot))
                return
            if kind == "open_many":  # restore at start: many pools, one transaction
                keys, names = message[3], message[4]
                snapshots = self.store.open_pools(names)
                for key, snapshot in zip(keys, snapshots, strict=True):
                    tokens = SlotTokens(t for t, _ in snapshot.tokens)
                    self.sinks[key] = PoolSink(key, snapshot.pool_id, tokens)
                self.channel.send(("reply", request, snapshots))
                return
            if kind == "list":
                self.channel.send(("reply", request, self.store.list_pools()))
                return
            if kind == "prove":
                self.prove(request)
                return
            sink = self.sinks[key]
            self.write(sink)  # what came before the setting change goes first
            if kind == "settings":
                self.store.save_settings(sink.pool_id, message[3])
            elif kind == "drop":
                self.store.drop_pool(sink.pool_id)
                del self.sinks[key]
            elif kind == "release":
                self.store.release_pool(sink.pool_id)
                del self.sinks[key]
            self.channel.send(("reply", request, None))
        except TokenPoolError as error:
            self.channel.send(("reply", request, error))
        except Exception as error:  # a bug: say it, keep serving the other pools
            self.channel.send(("reply", request, StoreError(f"{type(error).__name__}: {error}")))

    def prove(self, request: int) -> None:
        """Show the server this process still owns its pools: a pool lost is fenced (for
        good); the reply is the proof (an error when none could be made)."""
        lost = self.store.prove()
        for sink in list(self.sinks.values()):
            if sink.pool_id in lost and not sink.fenced:
                sink.fenced = True
                sink.pending = []
                self.channel.send(("fenced", sink.key, lost[sink.pool_id]))
        self.channel.send(("reply", request, None))

    def write_all(self) -> None:
        for sink in list(self.sinks.values()):
            if sink.pending:
                self.write(sink)

    def write(self, sink: PoolSink) -> None:
        """Write everything pending for one pool: retry, isolate a refused batch, report."""
        attempt = 0
        retry = False
        while sink.pending and not sink.fenced:
            entries = _head(sink.pending, MAX_BATCH_RECORDS)
            batch = self._batch(sink, entries)
            began = time.time_ns()
            try:
                self._write(sink, batch, retry)
            except FencedError as error:
                sink.fenced = True
                sink.pending = []
                self.channel.send(("fenced", sink.key, str(error)))
                return
            except RejectedError as error:
                self.isolate(sink, entries, error)
                continue
            except StoreError as error:
                attempt += 1
                retry = True
                self.set_link(LinkState.RETRYING if attempt < 3 else LinkState.DOWN, error)
                if self.closing_since is not None and (
                    time.monotonic() - self.closing_since > self.shutdown_timeout
                ):
                    self.give_up(error)
                    return
                self.back_off(min(self.retry_cap, 0.05 * 2 ** min(attempt, 20)))
                continue
            sink.pending = sink.pending[len(entries) :]
            retry = False  # the next entries were never tried: no commit can have happened
            attempt = 0
            self.set_link(LinkState.UP, None)
            self.channel.send(
                ("ack", sink.key, entries[-1][0], batch.records, *_timing(began, batch))
            )
            self.between_transactions()

    def back_off(self, delay: float) -> None:
        """Wait ``delay`` (jittered) before a retry, taking in what arrives meanwhile: a
        busy server sends all the time, and that must not cut the wait short."""
        until = time.monotonic() + delay * random.uniform(0.5, 1.0)
        while (left := until - time.monotonic()) > 0 and not self.channel.closed:
            self.queue.extend(self.channel.receive(0.0 if self.queue else left))
            self.handle_queued()
        if self.channel.closed and self.closing_since is None:
            self.closing_since = time.monotonic()

    def _write(self, sink: PoolSink, batch: Batch, retry: bool) -> None:
        try:
            self.store.write(sink.pool_id, batch, sink.tokens, retry)
        except StoreError:
            raise
        except Exception as error:  # a bug here: no retry can fix it; report it, drop the batch
            self.log("error", "store_write_bug", error=traceback.format_exc(limit=8))
            raise RejectedError(f"internal error: {type(error).__name__}: {error}") from error

    def _batch(
        self, sink: PoolSink, entries: list[tuple[int, list[list[Record]], dict[str, int], int]]
    ) -> Batch:
        batch = Batch()
        for _seq, chunks, counters, clock_us in entries:
            for records in chunks:
                self._learn_tokens(sink, records)
                batch.add(records, counters, clock_us)
        return batch

    @staticmethod
    def _learn_tokens(sink: PoolSink, records: list[Record]) -> None:
        for record in records:
            if record[KIND] == ADD:  # the slots of new tokens
                for slot, raw in added_tokens(record):
                    sink.tokens.add(slot, raw)

    def isolate(
        self,
        sink: PoolSink,
        entries: list[tuple[int, list[list[Record]], dict[str, int], int]],
        error: RejectedError,
    ) -> None:
        """The database refused the batch for good: write the server's batches one by one,
        drop (and report) each one it still refuses, acknowledge the rest."""
        for entry in entries:
            batch = self._batch(sink, [entry])
            began = time.time_ns()
            try:
                self._write(sink, batch, True)
            except RejectedError as refused:
                self.channel.send(("rejected", sink.key, entry[0], batch.records, str(refused)))
            except StoreError:
                # Not a refusal after all: leave it and the rest for the normal retry.
                sink.pending = sink.pending[sink.pending.index(entry) :]
                return
            else:
                self.channel.send(
                    ("ack", sink.key, entry[0], batch.records, *_timing(began, batch))
                )
        sink.pending = sink.pending[len(entries) :]
        del error

    def give_up(self, error: BaseException) -> None:
        lost = 0
        for sink in self.sinks.values():
            for _seq, chunks, _c, _t in sink.pending:
                lost += sum(len(r) for r in chunks)
            sink.pending = []
        self.channel.send(("gave_up", lost, str(error)))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort: the process exits next
            self.store.close()


def main(argv: list[str]) -> int:
    # The signals meant for the group are the server's: it tells us when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    channel = Channel(sock)
    hello = channel.receive(None)
    if not hello or hello[0][0] != "hello":
        return 2
    process = StoreProcess(channel, hello[0][1])
    try:
        for message in hello[1:]:
            process.handle(message)
        process.run()
    except Exception:  # a bug: say it where the server's log shows it, then exit
        process.log("error", "store_process_crashed", error=traceback.format_exc(limit=12))
        raise
    finally:
        process.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
