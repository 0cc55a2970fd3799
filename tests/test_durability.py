"""What survives crashes and database outages: real processes, real PostgreSQL."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import psycopg
import pytest
import trio
from hypothesis import given, settings

import tokenpool
from tests.chaos.cluster import Cluster
from tests.chaos.server import children
from tokenpool._model import (
    END,
    FENCE,
    GRANT,
    ID,
    KIND,
    RENEW,
    REV,
    SLOT,
    START,
    STOP,
    USER,
    LeaseRecord,
    Record,
)
from tokenpool._settings import PoolSettings
from tokenpool._state import PoolState
from tokenpool._store import (
    OWNERSHIP_INTERVAL,
    OWNERSHIP_VALIDITY,
    Batch,
    SlotTokens,
    open_store,
)
from tokenpool._store.link import PROOFS_IN_FLIGHT

from .dbutil import query
from .strategies import CountingIds

ROOT = Path(__file__).resolve().parent.parent


# -- coalescing: a batch writes what the changes one by one would have -------


def assignment(lease: LeaseRecord) -> tuple[object, ...]:
    """What a token's row holds of its lease."""
    return (lease[ID], lease[SLOT], lease[USER], lease[FENCE], lease[START], lease[STOP])


def apply_one_by_one(records: list[Record], db: dict[str, dict[Any, object]]) -> None:
    for record in records:
        if record[KIND] in (GRANT, RENEW):
            db["assignments"][record[SLOT]] = assignment(record)
        elif record[KIND] == END:
            db["assignments"].pop(record[SLOT], None)
            db["history"][record[REV]] = record


def apply_batch(batch: Batch, db: dict[str, dict[Any, object]]) -> None:
    for record in batch.history:
        db["history"].setdefault(record[REV], record)
    for slot, lease in batch.final.items():
        if lease is None:
            db["assignments"].pop(slot, None)
        else:
            db["assignments"][slot] = assignment(lease)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from("aarc"), st.integers(0, 6)), max_size=60),
    cuts=st.sets(st.integers(0, 60)),
)
def test_coalesced_batches_write_the_same_rows_as_each_change(
    ops: list[tuple[str, int]], cuts: set[int]
) -> None:
    now = 1_767_225_600_000_000
    state = PoolState(PoolSettings(size=3, ttl=10), ids=CountingIds())
    state.resize(3, now)
    for op, n in ops:
        now += n * 1_000_000
        state.advance(now)
        if op == "a":
            state.activate(f"u{n}", now)
        elif op == "r" and state.leases():
            lease = state.leases()[n % len(state.leases())]
            state.renew(state.token_text(lease[SLOT]), lease[ID], now)
        elif op == "c":
            state.clear(now)
    changes = state.changes
    expected: dict[str, dict[Any, object]] = {"assignments": {}, "history": {}}
    apply_one_by_one(changes, expected)
    actual: dict[str, dict[Any, object]] = {"assignments": {}, "history": {}}
    bounds = sorted({0, len(changes), *(c for c in cuts if c < len(changes))})
    for start, end in itertools.pairwise(bounds):
        batch = Batch()
        batch.add(changes[start:end], state.counters(), now)
        apply_batch(batch, actual)
        apply_batch(batch, actual)  # a retried batch changes nothing more
    assert expected == actual
    assert {lease[SLOT]: assignment(lease) for lease in state.leases()} == actual["assignments"]


def test_a_retry_after_a_commit_whose_ack_was_lost_clears_what_it_ends(pg_url: str) -> None:
    """The first write commits but its acknowledgement is lost (the connection dropped
    after COMMIT). The retry carries it again with the release that came meanwhile: the
    token's row must end up free, and the history hold the lease once."""
    store = open_store(pg_url, write_timeout=5, durability="async")
    state = PoolState(PoolSettings(size=2, ttl=60))
    now = 1_767_225_600_000_000
    try:
        snapshot = store.open_pool("p", state.settings.as_dict(), True)
        state.resize(2, now)
        lease = state.activate("a", now)
        first = list(state.changes)
        state.changes = []
        tokens = SlotTokens(token for _, token, _ in sorted(state.slots()))
        batch = Batch()
        batch.add(first, state.counters(), now)
        store.write(snapshot.pool_id, batch, tokens, False)  # committed; the ack "lost"
        state.release(state.token_text(lease[SLOT]), None, now)
        retry = Batch()
        retry.add(first, state.counters(), now)
        retry.add(state.changes, state.counters(), now)
        store.write(snapshot.pool_id, retry, tokens, True)
    finally:
        store.close()
    assert [] == query(pg_url, "SELECT lease_id FROM lease_assignments WHERE lease_id IS NOT NULL")
    assert [(lease[ID], "released")] == query(
        pg_url, "SELECT lease_id, expiration_reason FROM usage_history"
    )


# -- database outages ---------------------------------------------------------


async def churn(pool: tokenpool.Pool, seconds: float, prefix: str, errors: list[str]) -> int:
    """Activations and releases from 8 tasks for ``seconds`` (a few thousand a second,
    a busy service rather than a saturated CPU); returns how many succeeded."""
    done = 0

    async def client(n: int) -> None:
        nonlocal done
        i = 0
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            i += 1
            try:
                lease = await pool.activate(f"{prefix}-{n}-{i % 50}")
                done += 1
                if i % 3 == 0:
                    await pool.release(lease.token_id)
            except (tokenpool.NotActiveError, tokenpool.NotHolderError):
                pass
            except tokenpool.UnavailableError as error:
                errors.append(str(error))
                await trio.sleep(0.01)
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(client, n)
    return done


async def settle(pool: tokenpool.Pool, seconds: float = 30) -> None:
    with trio.fail_after(seconds):
        while (await pool.stats()).backlog or (await pool.stats()).link != "up":
            await trio.sleep(0.02)


async def activate_once_served(
    pool: tokenpool.Pool, user: str, seconds: float, poll: float
) -> None:
    """Activate ``user`` as soon as the pool serves activations again (``Unavailable``
    until then), within ``seconds``."""
    with trio.fail_after(seconds):
        while True:
            try:
                await pool.activate(user)
                return
            except tokenpool.UnavailableError:
                await trio.sleep(poll)


async def assert_store_matches(pool: tokenpool.Pool, url: str) -> None:
    """The store holds every ended lease exactly once and exactly the active leases."""
    await settle(pool)
    stats = await pool.stats()
    ended = stats.evictions + stats.expirations + stats.releases + stats.clears
    history = query(url, "SELECT lease_id FROM usage_history")
    assert ended == len(history) == len({r[0] for r in history})
    with trio.fail_after(10):  # the next proof of ownership after an outage
        while True:
            try:
                tokens = await pool.tokens()
                break
            except tokenpool.UnavailableError:
                await trio.sleep(0.05)
    live = {t.id: t.lease_id for t in tokens if t.lease_id is not None}
    assert live == dict(
        query(url, "SELECT token_id, lease_id FROM lease_assignments WHERE lease_id IS NOT NULL")
    )


async def test_killed_database_connections_lose_nothing(pg_url: str) -> None:
    async with tokenpool.open_pool(size=20, store=pg_url) as pool:
        errors: list[str] = []

        async def killer() -> None:
            for _ in range(5):
                await trio.sleep(0.2)
                query(
                    pg_url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'tokenpool writer' AND datname = current_database()",
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            done = await churn(pool, 1.5, "k", errors)
        assert done > 300
        assert [] == errors  # async mode keeps serving through it
        assert (await pool.stats()).activations >= done
        await assert_store_matches(pool, pg_url)


async def test_async_mode_serves_through_a_stopped_database(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    async with tokenpool.open_pool(size=20, store=cluster_url, write_timeout=1) as pool:
        errors: list[str] = []
        await churn(pool, 0.3, "before", errors)
        await trio.to_thread.run_sync(pg_cluster.stop, "immediate")
        during = await churn(pool, 1.5, "during", errors)
        stats = await pool.stats()
        assert stats.link in ("retrying", "down")
        assert stats.backlog > 0
        assert during > 300
        # Served until the last proof of ownership ran out (2 s), then refused, never worse.
        assert [] == [e for e in errors if "cannot show it still owns the store" not in e]
        await trio.to_thread.run_sync(pg_cluster.start)
        await assert_store_matches(pool, cluster_url)


async def test_sync_mode_answers_unavailable_in_time_and_recovers(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    async with tokenpool.open_pool(
        size=5, store=cluster_url, durability="sync", write_timeout=1
    ) as pool:
        before = await pool.activate("before")
        await trio.to_thread.run_sync(pg_cluster.stop, "immediate")
        started = trio.current_time()
        # The write misses its deadline ("in time"), or, when stopping the database took
        # long enough on a loaded machine, the last proof of ownership ran out first:
        # both are the truthful refusal, and neither may take longer than the deadline.
        with pytest.raises(tokenpool.UnavailableError, match=r"in time|still owns"):
            await pool.activate("during")
        assert trio.current_time() - started < 1 + 1 + 0.5  # write_timeout + client slack
        await trio.to_thread.run_sync(pg_cluster.start)
        # Back once a change and a read both succeed: a read is refused while the last
        # proof of ownership (renewed every second) is older than its validity, which
        # may outlast the first write after the restart.
        with trio.fail_after(20):
            while True:
                try:
                    await pool.activate("after")
                    kept = await pool.lease_of("before")
                    during = await pool.lease_of("during")
                    break
                except tokenpool.UnavailableError:
                    await trio.sleep(0.1)
        assert before == kept  # kept through the outage
        assert during is None  # the unconfirmed grant was released
        await assert_store_matches(pool, cluster_url)


async def test_a_hung_database_never_blocks_the_actor(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    """SIGSTOP on every PostgreSQL process (connections open, nothing answers): every
    write hits its deadline, async mode keeps serving, and after SIGCONT the backlog
    drains with every ended lease written exactly once."""
    async with tokenpool.open_pool(size=20, store=cluster_url, write_timeout=1) as pool:
        errors: list[str] = []
        await churn(pool, 0.3, "before", errors)
        await trio.to_thread.run_sync(pg_cluster.pause)
        try:
            during = await churn(pool, 2.5, "during", errors)
            stats = await pool.stats()
        finally:
            await trio.to_thread.run_sync(pg_cluster.resume)
        assert stats.link in ("retrying", "down")
        assert stats.backlog > 0
        assert during > 300
        # Served until the last proof of ownership ran out (2 s), then refused, never worse.
        assert [] == [e for e in errors if "cannot show it still owns the store" not in e]
        await assert_store_matches(pool, cluster_url)


async def test_sync_mode_answers_unavailable_while_the_database_hangs(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    async with tokenpool.open_pool(
        size=5, store=cluster_url, durability="sync", write_timeout=1
    ) as pool:
        await pool.activate("before")
        await trio.to_thread.run_sync(pg_cluster.pause)
        try:
            started = trio.current_time()
            with pytest.raises(tokenpool.UnavailableError, match="in time"):
                await pool.activate("during")
            waited = trio.current_time() - started
        finally:
            await trio.to_thread.run_sync(pg_cluster.resume)
        assert waited < 1 + 1 + 0.5  # write_timeout + client slack: never a hang
        await activate_once_served(pool, "after", seconds=30, poll=0.1)
        await assert_store_matches(pool, cluster_url)


async def test_sync_callers_time_out_on_time_while_retries_back_off(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    """The writer's retry backoff grows toward 5 s while the database is down; a sync
    caller must still be answered within write_timeout (+ slack), not after a backoff."""
    async with tokenpool.open_pool(
        size=5, store=cluster_url, durability="sync", write_timeout=1
    ) as pool:
        await pool.activate("before")
        await trio.to_thread.run_sync(pg_cluster.stop, "immediate")
        try:
            for i in range(4):  # let the backoff grow
                with pytest.raises(tokenpool.UnavailableError):
                    await pool.activate(f"early-{i}")
            waits = []
            for i in range(3):
                started = trio.current_time()
                with pytest.raises(tokenpool.UnavailableError):
                    await pool.activate(f"late-{i}")
                waits.append(trio.current_time() - started)
        finally:
            await trio.to_thread.run_sync(pg_cluster.start)
        assert max(waits) < 1 + 1 + 0.5  # write_timeout + client slack


async def test_full_backlog_refuses_activations_keeps_reads_and_drains(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    async with tokenpool.open_pool(
        size=5, store=cluster_url, max_backlog=50, write_timeout=1
    ) as pool:
        lease = await pool.activate("first")
        await trio.to_thread.run_sync(pg_cluster.stop, "immediate")
        with pytest.raises(tokenpool.UnavailableError, match="backlog"):
            for i in range(200):
                await pool.activate(f"user-{i}")
        assert (await pool.stats()).backlog >= 50
        await pool.tokens()  # reads keep working
        await pool.history(lease.token_id)
        await trio.to_thread.run_sync(pg_cluster.start)
        await settle(pool)
        await pool.activate("after")
        await assert_store_matches(pool, cluster_url)


# -- crashes ------------------------------------------------------------------


def run_and_kill(url: str, durability: str, seconds: float) -> tuple[list[list[str]], float]:
    """Run the crash worker for ``seconds`` of load, SIGKILL it; return its acks and the kill time.

    Its output goes to a file, not a pipe: a full pipe would stall the worker. The worker
    appends through a file of its own (O_APPEND) and we read through another, so our
    reads never move the offset its writes go to.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        with open(out_path, "a") as out_w, open(err_path, "a") as err_w:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.crash_worker", url, durability],
                cwd=ROOT,
                stdout=out_w,
                stderr=err_w,
                text=True,
            )

        def read(path: str) -> str:
            with open(path) as f:
                return f.read()

        deadline = time.monotonic() + 90
        try:
            while "READY" not in read(out_path)[:4096]:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"the crash worker died before it was ready:\n{read(err_path)}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"the crash worker never got ready:\n{read(err_path)}")
                time.sleep(0.02)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        time.sleep(seconds)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        lines = read(out_path).splitlines()
    # The last line may be cut in the middle of a write: keep only whole acks.
    acks = [line.split() for line in lines if line.startswith("ACK ") and len(line.split()) == 5]
    return acks, killed_at


def stored_lease_ids(url: str) -> set[str]:
    rows = query(
        url,
        "SELECT lease_id FROM lease_assignments WHERE lease_id IS NOT NULL"
        " UNION ALL SELECT lease_id FROM usage_history",
    )
    return {r[0] for r in rows}


def assert_one_holder_per_token(url: str) -> None:
    """A row per token makes one holder per token structural; one token per user is the
    actor's rule, so check it here."""
    rows = query(
        url,
        "SELECT user_id, count(*) FROM lease_assignments WHERE lease_id IS NOT NULL"
        " GROUP BY pool_id, user_id",
    )
    assert all(count == 1 for _, count in rows)


async def test_sigkill_in_sync_mode_loses_no_acknowledged_lease(store_url: str) -> None:
    acks, _ = await trio.to_thread.run_sync(run_and_kill, store_url, "sync", 1.0)
    assert len(acks) > 50
    missing = {a[2] for a in acks} - stored_lease_ids(store_url)
    assert set() == missing
    assert_one_holder_per_token(store_url)
    async with tokenpool.open_pool(size=20, ttl=600, store=store_url) as pool:
        lease = await pool.activate("after-crash")
        assert lease.fence > max(int(a[4]) for a in acks)


async def test_sigkill_in_async_mode_loses_only_the_last_moments(store_url: str) -> None:
    acks, killed_at = await trio.to_thread.run_sync(run_and_kill, store_url, "async", 1.0)
    assert len(acks) > 50
    stored = stored_lease_ids(store_url)
    lost = [a for a in acks if a[2] not in stored]
    kept = [a for a in acks if a[2] in stored]
    # Writes commit in order: what is lost is a tail, newer than everything kept...
    if lost and kept:
        assert min(int(a[4]) for a in lost) > max(int(a[4]) for a in kept)
    # ...and a short one: a flush (2 ms) plus one write when the writer keeps up; allow
    # 2 s for a loaded machine, where the writer may run behind (the backlog).
    assert [] == [a for a in lost if float(a[1]) < killed_at - 2.0]
    assert_one_holder_per_token(store_url)
    async with tokenpool.open_pool(size=20, ttl=600, store=store_url) as pool:
        lease = await pool.activate("after-crash")
        assert lease.fence > max(int(a[4]) for a in acks)  # even past the lost tail
        users = [t.current_user_id for t in await pool.tokens() if t.current_user_id]
        assert len(set(users)) == len(users)


def test_sigterm_during_a_database_outage_is_bounded_and_says_what_was_lost(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    """The hardening issue's defect 8: shutdown waits at most --shutdown-timeout for the
    store, then exits, naming how many changes it could not write."""
    from tests.chaos import server as chaos_server

    server = chaos_server.start(
        "--dsn", cluster_url, "--shutdown-timeout", "2", "--write-timeout", "1"
    )
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"ACTIVATE before\r\n")
            assert b"before" in sock.recv(4096)
            pg_cluster.stop("immediate")
            sock.sendall(b"".join(b"ACTIVATE during-%d\r\n" % i for i in range(50)))
            time.sleep(0.5)
        started = time.monotonic()
        code = server.stop()
        took = time.monotonic() - started
    finally:
        if server.proc.poll() is None:
            server.kill()
        pg_cluster.start()
    assert took < 2 + 5, f"shutdown took {took:.1f} s"
    assert 1 == code
    lost = [e for e in server.log if e.get("event") == "changes_not_written"]
    assert lost and lost[0]["changes"] > 0


def test_a_backlog_larger_than_one_transaction_drains_in_bounded_writes(pg_url: str) -> None:
    """After an outage the backlog is written in transactions of bounded size: one that
    grew with every retry would outgrow the write timeout and never commit."""
    from tokenpool._store import MAX_BATCH_RECORDS
    from tokenpool._store.child import _head

    entries = [(i, [[("r",)] * 1000], {}, 0) for i in range(100)]
    head = _head(entries, MAX_BATCH_RECORDS)
    assert 0 < len(head) <= MAX_BATCH_RECORDS // 1000
    assert [entries[0]] == _head([entries[0]], 10)  # one oversized entry still goes alone


async def test_a_big_backlog_drains_after_an_outage(pg_cluster: Cluster, cluster_url: str) -> None:
    async with tokenpool.open_pool(
        size=10, store=cluster_url, write_timeout=1, max_backlog=1_000_000
    ) as pool:
        await pool.activate("before")
        await trio.to_thread.run_sync(pg_cluster.stop, "immediate")
        for start in range(0, 60_000, 1000):  # 60,000 evicting activations: 120,000 changes
            await pool.activate_many([f"u{i}" for i in range(start, start + 1000)])
        assert (await pool.stats()).backlog > 100_000
        await trio.to_thread.run_sync(pg_cluster.start)
        await settle(pool, seconds=60)
        await assert_store_matches(pool, cluster_url)


def _store_process(db: Path, **config: float) -> tuple[Any, socket.socket, socket.socket]:
    """A store process's loop in this process, on a SQLite file, and both ends of its
    socket (write to the first)."""
    from tokenpool._store.child import Channel, StoreProcess

    ours, theirs = socket.socketpair()
    settings = {"url": f"sqlite:///{db}", "durability": "async", "shutdown_timeout": 1.0}
    return StoreProcess(Channel(theirs), {**settings, **config}), ours, theirs


def test_the_store_process_backs_off_fully_while_the_server_keeps_sending(tmp_path: Path) -> None:
    """A busy server sends all the time: the retry backoff must not end at every message
    (the outage run found retries counted in thousands, and 2**attempt overflowing)."""
    import pickle
    import struct
    import threading

    process, ours, theirs = _store_process(tmp_path / "p.db", write_timeout=1.0)
    stop = threading.Event()

    def chatter() -> None:
        frame = pickle.dumps(("write", 99, 1, [], {}, 0))
        while not stop.is_set():
            ours.sendall(struct.pack(">I", len(frame)) + frame)
            time.sleep(0.001)

    talker = threading.Thread(target=chatter)
    talker.start()
    try:
        started = time.monotonic()
        process.back_off(0.4)
        waited = time.monotonic() - started
    finally:
        stop.set()
        talker.join()
        process.close()
        ours.close()
        theirs.close()
    assert waited >= 0.2  # the jitter takes at most half off


def _store_processes() -> list[int]:
    """This test process's store processes (``python -m tokenpool._store.child``)."""
    return [
        pid
        for pid in children(os.getpid())
        if b"tokenpool._store.child" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


async def test_ownership_is_proved_again_long_before_a_backlog_drains(tmp_path: Path) -> None:
    """A store process working through a backlog of many transactions answers the
    server's ownership proofs between two of them, not after the last: the 60 s
    sustained run was refused (``UNAVAILABLE``: no proof within 2 s) while its store was
    only busy. Here the store process is stopped until every proof asked is stale, with
    about six transactions' worth of changes waiting; once it runs again, the pool must
    vouch again while most of that backlog still waits.

    What gathered while it was stopped must also go as several frames: sent as one, it
    was one transaction of 120,000 changes, and the first fresh proof waited for all of
    it (CI: 96,000 of 120,000 written before the pool vouched again)."""
    async with tokenpool.open_pool(
        size=10, store=f"sqlite:///{tmp_path}/p.db", max_backlog=1_000_000, write_timeout=60
    ) as pool:
        await pool.activate("before")
        await settle(pool)
        (child,) = _store_processes()
        os.kill(child, signal.SIGSTOP)
        stopped = trio.current_time()
        try:
            for start in range(0, 60_000, 1000):  # evicting: 120,000 changes
                await pool.activate_many([f"u{i}" for i in range(start, start + 1000)])
            with trio.fail_after(10):  # the last proof runs out
                while True:
                    try:
                        await pool.activate("probe")
                    except tokenpool.UnavailableError:
                        break
                    await trio.sleep(0.05)
            # At most PROOFS_IN_FLIGHT proofs are asked while none is answered (a beat
            # apart; none times out before lock_wait + write_timeout): once the last of
            # them is OWNERSHIP_VALIDITY old, none can vouch when it is answered.
            stale = PROOFS_IN_FLIGHT * OWNERSHIP_INTERVAL + OWNERSHIP_VALIDITY + 0.5
            await trio.sleep_until(stopped + stale)
            waiting = (await pool.stats()).backlog
            assert waiting > 100_000
        finally:
            os.kill(child, signal.SIGCONT)
        await activate_once_served(pool, "probe", seconds=60, poll=0.01)
        assert (await pool.stats()).backlog > waiting // 2  # (without the fix: 0 to 24,000)
        await settle(pool, seconds=60)


def test_a_frame_that_does_not_load_ends_the_store_process(tmp_path: Path) -> None:
    """The store process reads its socket from a thread: a frame that will not unpickle
    must still reach the loop as an error (the process logs it and exits, and the server
    sees it die), never leave the loop waiting for messages that will not come."""
    import pickle
    import struct

    from tokenpool._store.child import Channel

    ours, theirs = socket.socketpair()
    channel = Channel(theirs)
    try:
        ours.sendall(struct.pack(">I", 5) + b"junk!")
        with pytest.raises(pickle.UnpicklingError):
            channel.receive(5)
    finally:
        ours.close()
        theirs.close()


def test_one_pools_writes_are_handled_in_the_order_they_came(tmp_path: Path) -> None:
    """A retry's back-off handles what arrives meanwhile; it must first handle what had
    arrived before (still waiting behind the message whose write is retried), or a
    pool's later changes go before its earlier ones: the acknowledgement then names
    the earlier sequence number and the final lease written is the older one."""
    import sqlite3
    import threading

    from tokenpool._store.frames import encode

    db = tmp_path / "p.db"
    process, ours, theirs = _store_process(db, write_timeout=0.2, retry_cap=0.1)
    settings = PoolSettings(size=1, ttl=60).as_dict()
    try:
        process.handle(("open", 1, 1, "a", settings, True))
        process.handle(("open", 2, 2, "b", settings, True))
        lock = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        lock.execute("BEGIN EXCLUSIVE")  # pool a's write fails (locked) and is retried
        threading.Timer(0.8, lock.rollback).start()
        process.queue.extend(
            [
                ("write", 1, 1, [[]], {}, 0),
                ("settings", 3, 1, settings),
                ("write", 2, 11, [[]], {}, 0),
            ]
        )
        ours.sendall(encode([("write", 2, 12, [[]], {}, 0)]))  # arrives during the back-off
        process.handle_queued()
        assert [11, 12] == [seq for seq, *_ in process.sinks[2].pending]
        lock.close()
    finally:
        process.close()
        ours.close()
        theirs.close()


def test_a_pool_taken_again_after_it_was_lost_is_owned_again(pg_url: str) -> None:
    """Cluster mode: node A's session is cut while another node takes pool p over, so A
    counts p as lost. Once the other releases it and A takes p again (a new epoch), p
    is A's again: proved, and written. (The loss was kept: A's new ownership was fenced
    at once, for good, and the node, renewing its lease, served nothing; found by an
    outside probe.)"""
    a = open_store(pg_url, write_timeout=5, durability="async", take_over=True)
    b = open_store(pg_url, write_timeout=5, durability="async", take_over=True)
    state = PoolState(PoolSettings(size=2, ttl=60))
    now = 1_767_225_600_000_000
    try:
        first = a.open_pool("p", state.settings.as_dict(), True)
        assert {} == a.prove()
        backend = a._connection().info.backend_pid  # type: ignore[attr-defined]
        with psycopg.connect(pg_url.split("?")[0], autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        b.open_pools(["p"])  # the other node takes p while A is cut off
        from tokenpool._store import StoreError

        with pytest.raises(StoreError):
            a.prove()  # the cut is found
        assert first.pool_id in a.prove()  # A reconnects: p's lock is B's now
        b.release_pool(first.pool_id)
        (again,) = a.open_pools(["p"])  # A takes p once more
        assert again.epoch > first.epoch
        assert {} == a.prove()
        state.resize(2, now)
        state.activate("ann", now)
        batch = Batch()
        batch.add(state.changes, state.counters(), now)
        tokens = SlotTokens(token for _, token, _ in sorted(state.slots()))
        a.write(again.pool_id, batch, tokens, False)  # not FencedError
    finally:
        a.close()
        b.close()


async def test_a_library_pool_says_at_close_how_many_acknowledged_changes_were_lost(
    tmp_path: Path,
) -> None:
    """The server's exit status tells the truth; the library's ``Pool.lost`` does: the
    async changes a killed store process never wrote, counted at close (the library
    prints nothing, and a caller had no way to learn of them; outside probe)."""
    async with tokenpool.open_pool(size=100, store=f"sqlite:///{tmp_path}/p.db") as pool:
        await pool.activate("written")
        await settle(pool)
        (child,) = _store_processes()
        os.kill(child, signal.SIGSTOP)
        for n in range(20):
            await pool.activate(f"u{n}")  # acknowledged, never written
        os.kill(child, signal.SIGKILL)
        assert 0 == pool.lost  # counted at close
    assert pool.lost >= 20
    async with tokenpool.open_pool(size=100, store=f"sqlite:///{tmp_path}/p.db") as pool:
        assert 0 == pool.lost
    assert 0 == pool.lost  # nothing lost this time
