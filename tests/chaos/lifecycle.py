"""Lifecycle runs: the store process killed or paused under load, clients that wait or
stop reading while the server shuts down, and a first server that loses ownership of
its store to a second.

Each run starts real ``tokenpool serve`` processes (``server.start``), loads them with
pipelined ``ACTIVATE`` of users never seen before (so every acknowledgement is one new
lease whose id the store must hold afterwards), reads the store afterwards
(``server.stored_leases``) and returns one row of the reliability table.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .checker import Anomaly
from .history import _Client, _pairs, call_many
from .runs import TTL, Summary, _Memory, _summary, store
from .server import Process, free_port, start, stored_leases


@attrs.define
class Load:
    """Clients pipelining activations of new users until ``stop`` is set, their quota is
    used or their connection ends; what was acknowledged (a lease id in a reply) is kept."""

    port: int
    clients: int
    quota: int  # activations per client at most
    pool: str | None = None  # None: the default pool (plain ACTIVATE)
    acked: set[str] = attrs.Factory(set)
    refused: int = 0
    sent: int = 0
    stop: trio.Event = attrs.Factory(trio.Event)
    finished: trio.Event = attrs.Factory(trio.Event)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for n in range(self.clients):
                nursery.start_soon(self._client, n)
        self.finished.set()

    async def acknowledged(self, share: float) -> None:
        """Return once ``share`` of the whole quota is acknowledged (or the load ended):
        the fault lands under load whatever the machine's speed."""
        # Polling: the load's clients have no event per reply to wait on.
        while len(self.acked) < share * self.quota * self.clients and not self.finished.is_set():
            await trio.sleep(0.01)

    async def _client(self, n: int) -> None:
        try:
            client = await _Client.open(self.port)
        except OSError:
            return
        try:
            i = 0
            while not self.stop.is_set() and i < self.quota:
                batch: list[tuple[str, ...]] = []
                for _ in range(min(50, self.quota - i)):
                    i += 1
                    user = f"c{n}-{i}"
                    args = (
                        ("ACTIVATE", user)
                        if self.pool is None
                        else ("TP.ACTIVATE", self.pool, user)
                    )
                    batch.append(args)
                self.sent += len(batch)
                replies = await call_many(client, batch)
                for reply in replies:
                    if isinstance(reply, list):
                        self.acked.add(str(_pairs(reply)["id"]))
                    else:
                        self.refused += 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await client.aclose()


def _reported(server: Process) -> int:
    """Changes the server said it could not write (its ``stopped`` line)."""
    for event in server.log:
        if event.get("event") == "stopped":
            return int(event.get("changes_not_written") or 0)
    return 0


def _row(name: str, anomalies: list[Anomaly], load: Load, faults: str, rss: float) -> Summary:
    return _summary(
        name, anomalies, operations=load.sent, clients=load.clients, faults=faults, rss=rss
    )


def store_killed_run(
    clients: int, operations: int, *, dsn: str | None = None, after: float = 0.3
) -> Summary:
    """SIGKILL the store process under ``async`` load, then SIGTERM the server.

    Promised: the death is noticed (changes refused from then on), shutdown counts what
    was acknowledged and never written (``changes_not_written``) and exits non-zero.
    Checked: every acknowledged lease missing from the store was reported; only
    unreported ones count as acknowledged changes lost. The server may report more than
    are missing: a batch committed just before the kill whose confirmation never came
    back is in doubt, and counted as unwritten (the row says how many).
    """
    anomalies: list[Anomaly] = []
    quota = max(1, operations // clients)
    with store(dsn) as url:
        args = ("--dsn", url, "--durability", "async", "--ttl", TTL)
        server = start(*args, "--size", str(quota * clients + 8))
        memory = _Memory(server.pid)
        store_pid = server.store_pid
        load = Load(server.port, clients, quota)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.acknowledged(after)
                assert store_pid is not None
                os.kill(store_pid, signal.SIGKILL)
                await trio.sleep(0.5)
                load.stop.set()

        try:
            trio.run(main)
        finally:
            rss = memory.stop()
            code = server.stop()
        stored = {s.id for s in stored_leases(url)}
    lost = len(load.acked - stored)
    reported = _reported(server)
    if code == 0:
        anomalies.append(Anomaly("clean exit", "exit 0 although the store process died"))
    if lost > reported:
        anomalies += [
            Anomaly("lost change", f"{lost} acknowledged leases not stored, {reported} reported")
        ] * (lost - reported)
    # More reported than missing is no loss: a batch the database committed just before
    # the kill, whose confirmation never came back, is in doubt and counted as unwritten.
    doubt = max(0, reported - lost)
    faults = (
        f"store process SIGKILLed under load ({after:.0%} of it done), then SIGTERM:"
        f" {len(load.acked):,} acknowledged, {lost} of them not stored,"
        f" {reported} reported (changes_not_written; {doubt} of them stored after all),"
        f" {load.refused:,} refused; exit {code}"
    )
    return _row("store process killed (async)", anomalies, load, faults, rss)


def store_paused_run(
    clients: int,
    operations: int,
    *,
    dsn: str | None = None,
    after: float = 0.3,
    pause: float = 3.0,
) -> Summary:
    """SIGSTOP the store process under ``async`` load for ``pause`` seconds, SIGCONT,
    load on, SIGTERM: every acknowledged lease is in the store, exit 0."""
    anomalies: list[Anomaly] = []
    quota = max(1, operations // clients)
    with store(dsn) as url:
        args = ("--dsn", url, "--durability", "async", "--ttl", TTL)
        server = start(*args, "--size", str(quota * clients + 8))
        memory = _Memory(server.pid)
        store_pid = server.store_pid
        load = Load(server.port, clients, quota)
        facts: dict[str, int] = {}

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.acknowledged(after)
                assert store_pid is not None
                before = len(load.acked)
                os.kill(store_pid, signal.SIGSTOP)
                try:
                    await trio.sleep(pause)
                finally:
                    os.kill(store_pid, signal.SIGCONT)
                facts["during"] = len(load.acked) - before
                await load.finished.wait()

        try:
            trio.run(main)
        finally:
            rss = memory.stop()
            code = server.stop()
        stored = {s.id for s in stored_leases(url)}
    lost = load.acked - stored
    anomalies += [Anomaly("lost change", f"lease {i} acknowledged, not stored") for i in lost]
    if code != 0:
        anomalies.append(Anomaly("unclean exit", f"the server exited {code} on SIGTERM"))
    faults = (
        f"store process stopped {pause:.0f} s under load (SIGSTOP, SIGCONT), then SIGTERM:"
        f" {facts.get('during', 0):,} acknowledged meanwhile, {load.refused:,} refused;"
        f" {len(load.acked):,} acknowledged in all; exit {code}"
    )
    return _row("store process paused (async)", anomalies, load, faults, rss)


def shutdown_waiters_run(
    clients: int,
    operations: int,
    *,
    dsn: str | None = None,
    waiters: int = 50,
    shutdown_timeout: float = 3.0,
    slack: float = 2.0,
) -> Summary:
    """SIGTERM while ``waiters`` clients wait in ``TP.ACTIVATE waitq wN WAIT 300`` on a full
    pool, an SSE client has stopped reading (events piled up) and ``async`` load runs.

    Checked: every waiter is answered ``-UNAVAILABLE`` within 1 s; the server exits 0
    within ``--shutdown-timeout`` plus ``slack``; every acknowledged lease is stored."""
    anomalies: list[Anomaly] = []
    quota = max(1, operations // clients)
    http_port = free_port()
    with store(dsn) as url:
        args = ("--dsn", url, "--durability", "async", "--ttl", TTL)
        server = start(
            *args,
            *("--size", str(quota * clients + 8), "--http-port", str(http_port)),
            *("--shutdown-timeout", str(shutdown_timeout), "--idle-timeout", "30"),
        )
        memory = _Memory(server.pid)
        load = Load(server.port, clients, quota)
        answers: list[tuple[float, bytes]] = []
        facts: dict[str, float] = {}

        async def waiter(n: int, ready: trio.Semaphore) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"TP.ACTIVATE waitq w%d WAIT 300\r\n" % n)
                ready.release()
                data = b""
                with trio.move_on_after(shutdown_timeout + 30):
                    while not data.endswith(b"\r\n"):
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        data += chunk
                answers.append((trio.current_time(), data))

        async def main() -> None:
            admin = await _Client.open(server.port)
            await admin.call(
                "POOL", "CREATE", "waitq", "SIZE", "1", "TTL", TTL, "WHEN-FULL", "wait"
            )
            await admin.call("TP.ACTIVATE", "waitq", "holder")
            await admin.aclose()
            sse = socket.socket()
            sse.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sse.connect(("127.0.0.1", http_port))
            sse.sendall(
                b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
            )
            ready = trio.Semaphore(0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                for n in range(waiters):
                    nursery.start_soon(waiter, n, ready)
                for _ in range(waiters):
                    await ready.acquire()
                await load.acknowledged(0.5)  # events pile up in the stream nobody reads
                facts["signalled"] = trio.current_time()
                server.proc.send_signal(signal.SIGTERM)
                facts["exit"] = await trio.to_thread.run_sync(server.wait, 60.0)
                facts["exited"] = trio.current_time()
                load.stop.set()
            sse.close()

        try:
            trio.run(main)
        finally:
            rss = memory.stop()
            if server.proc.poll() is None:
                server.kill()
        stored = {s.id for s in stored_leases(url)}
    lost = load.acked - stored
    anomalies += [Anomaly("lost change", f"lease {i} acknowledged, not stored") for i in lost]
    took = facts["exited"] - facts["signalled"]
    late = [a for a in answers if not a[1].startswith(b"-UNAVAILABLE")]
    slow = [t - facts["signalled"] for t, _ in answers if t - facts["signalled"] > 1.0]
    if late or len(answers) != waiters:
        anomalies.append(
            Anomaly(
                "waiter",
                f"{len(late)} waiters answered otherwise, {waiters - len(answers)} not at all",
            )
        )
    if slow:
        anomalies.append(Anomaly("waiter", f"{len(slow)} waiters answered after {max(slow):.1f} s"))
    if took > shutdown_timeout + slack:
        anomalies.append(Anomaly("slow shutdown", f"exit {took:.1f} s after SIGTERM"))
    if facts["exit"] != 0:
        anomalies.append(Anomaly("unclean exit", f"the server exited {facts['exit']:.0f}"))
    faults = (
        f"SIGTERM with {waiters} clients in ACTIVATE ... WAIT 300, an SSE client not reading,"
        f" async load: waiters answered UNAVAILABLE within"
        f" {max((t - facts['signalled'] for t, _ in answers), default=0) * 1000:.0f} ms,"
        f" exit {facts['exit']:.0f} after {took:.2f} s (--shutdown-timeout {shutdown_timeout:.0f})"
    )
    return _row("shutdown with waiters and a non-reader", anomalies, load, faults, rss)


VOUCHING = ("VALIDATE", "TOKEN", "LEASE")


@attrs.define
class Ask:
    """One vouching question to the first server, and whether its answer vouched."""

    kind: str
    token_id: str
    invoked: float
    vouched: bool


def ownership_run(
    *, dsn: str | None = None, size: int = 8, probes: int = 4, after_grants: float = 1.0
) -> Summary:
    """Two servers over one store; the first loses ownership (its store process killed;
    or paused past the ownership validity, then killed so the second can take over);
    the second grants every token of the first's leases (evicting them).

    Counted: answers from the first to VALIDATE, TOKEN and LEASE, asked after the
    second granted that token, that still vouch for the first's lease (must be 0)."""
    from tokenpool._store import OWNERSHIP_VALIDITY

    anomalies: list[Anomaly] = []
    asked = 0
    granted = 0
    peak = 0.0
    modes: list[tuple[str, Callable[[int], None]]] = [
        ("killed", lambda pid: os.kill(pid, signal.SIGKILL)),
        ("paused then killed", _pause_then_kill(OWNERSHIP_VALIDITY + 0.5)),
    ]
    for mode, lose in modes:
        with store(dsn) as url:
            asks, grants, rss = _ownership_phase(url, size, probes, lose, after_grants)
        peak = max(peak, rss)
        late = [a for a in asks if a.token_id in grants and a.invoked > grants[a.token_id]]
        asked += len(late)
        granted += len(grants)
        if len(grants) < size:
            anomalies.append(Anomaly("short run", f"{mode}: the second granted {len(grants)}"))
        for a in late:
            if a.vouched:
                anomalies.append(
                    Anomaly("double holder", f"{mode}: {a.kind} vouched for {a.token_id}")
                )
    vouched = sum(1 for a in anomalies if a.kind == "double holder")
    faults = (
        f"first server's store process killed; paused {OWNERSHIP_VALIDITY + 0.5:.1f} s then"
        f" killed; the second granted {granted} tokens: {asked:,} VALIDATE/TOKEN/LEASE"
        f" asked of the first after that, {vouched} vouched"
    )
    return _summary(
        "ownership lost to a second server",
        anomalies,
        operations=asked,
        clients=2 + probes,
        faults=faults,
        rss=peak,
    )


def _ownership_phase(
    url: str, size: int, probes: int, lose: Callable[[int], None], after_grants: float
) -> tuple[list[Ask], dict[str, float], float]:
    """One loss of ownership: what was asked of the first server, when the second granted
    each token, and the first's peak memory."""
    args = ("--dsn", url, "--size", str(size), "--ttl", TTL, "--when-full", "evict")
    first = start(*args)
    memory = _Memory(first.pid)
    servers = [first]
    asks: list[Ask] = []
    grants: dict[str, float] = {}

    async def main() -> None:
        client = await _Client.open(first.port)
        leases = [_pairs(await client.call("ACTIVATE", f"a{i}")) for i in range(size)]
        await client.aclose()
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            for n in range(probes):
                nursery.start_soon(_probe, first.port, leases, n, asks, done)
            store_pid = first.store_pid
            assert store_pid is not None
            await trio.to_thread.run_sync(lose, store_pid)
            second = await trio.to_thread.run_sync(lambda: start(*args))
            servers.append(second)
            await _grant_all(second.port, size, grants)
            await trio.sleep(after_grants)
            done.set()

    try:
        trio.run(main)
    finally:
        rss = memory.stop()
        for server in reversed(servers):
            if server.proc.poll() is None:
                server.stop()
    return asks, grants, rss


def _pause_then_kill(seconds: float) -> Callable[[int], None]:
    def lose(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(pid, signal.SIGKILL)

    return lose


async def _probe(
    port: int, leases: list[dict[str, Any]], n: int, asks: list[Ask], done: trio.Event
) -> None:
    """Ask the first server, round and round, whether it vouches for its leases."""
    client = await _Client.open(port)
    try:
        i = n
        while not done.is_set():
            lease = leases[i % len(leases)]
            kind = VOUCHING[i % len(VOUCHING)]
            i += 1
            invoked = trio.current_time()
            if kind == "VALIDATE":
                reply = await client.call("VALIDATE", lease["token_id"], lease["id"])
                vouched = reply == 1
            elif kind == "TOKEN":
                reply = await client.call("TOKEN", lease["token_id"])
                vouched = not isinstance(reply, Exception) and lease["id"] in str(reply)
            else:
                reply = await client.call("LEASE", lease["user_id"])
                vouched = not isinstance(reply, Exception) and lease["id"] in str(reply)
            asks.append(Ask(kind, lease["token_id"], invoked, vouched))
            await trio.sleep(0.002)
    except (OSError, trio.BrokenResourceError):
        return
    finally:
        await client.aclose()


async def _grant_all(port: int, size: int, grants: dict[str, float]) -> None:
    """The second server grants every token (new users evict the first's leases),
    retrying while it cannot vouch yet; ``grants``: token -> when the grant was answered."""
    client = await _Client.open(port)
    try:
        with trio.fail_after(60):
            i = 0
            while len(grants) < size:
                reply = await client.call("ACTIVATE", f"b{i}")
                if isinstance(reply, list):
                    i += 1
                    grants.setdefault(str(_pairs(reply)["token_id"]), trio.current_time())
                else:
                    await trio.sleep(0.1)
    finally:
        await client.aclose()
