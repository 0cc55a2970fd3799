"""Issue 19's HTTP attacks, rerun against a real ``tokenpool serve`` (in-process HTTP or
``--http-workers``): one after another, then all together, then SIGTERM in the middle
of them, while a well-behaved RESP client in a process of its own times a ``PING`` every
20 ms (and a second one a ``PING`` on a fresh connection each time, which a server out
of file descriptors cannot accept), and the server's memory (its children's included:
the store process, the workers) is sampled.

The attacks, at the sizes issue 19 measured them (``Sizes.issue``):

- ``h2c``: cleartext HTTP/2 connections, each opening streams of ``GET /api/tokens``
  (a pool of 10,000 tokens, every one held) and never reading.
- ``unread listings``: connections that each ask ``GET /api/tokens`` and never read,
  held past ``--idle-timeout``.
- ``stalled bodies``: connections that send a request head and part of its body, then
  nothing.
- ``trickled bodies``: bodies sent one byte a second.
- ``stuck streams``: ``/api/events`` readers that stop reading while events pile up past
  the overflow bound; afterwards a new stream must be served (not 503).
- ``cross-site and rebinding``: what a page of another origin (a ``text/plain`` or form
  ``POST /api/tokens/clear``, a no-cors fetch) or a page at a rebinding name (a foreign
  ``Host``) can make a browser send. The real-browser version is
  ``tests/test_browser_safety.py``.

Checked per attack: the peak memory growth over what the server (and its children)
held before it, the worst PING, that the server stayed up (RESP and ``/healthz``
answer afterwards) and that the default pool's leases did not change. Last, SIGTERM
while every attack runs: the exit must come within ``--shutdown-timeout``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .checker import Anomaly
from .history import _Client, _pairs, call_many, pool_stats
from .runs import Summary, _summary, store
from .server import Process, free_port, rss_bytes, start

GOAL_GROWTH_MB = 100.0  # issue 19: the server's memory grows at most 100 MB
GOAL_PING = 0.050  # and another client's PING is never delayed more than 50 ms
SO_RCVBUF = 4096  # a non-reader's receive buffer: the server's writes back up at once
CHURN = 20_000
"""Activations of the ``churn`` pool while streams are stuck: 40,000 events, four times
a stream's overflow bound (10,000). A fixed count, not as many as the hold allows: the
pool's own event log and history grow with every activation (up to 20 MB and 9 MB a
pool, the README's rule 7), and a faster server would otherwise be charged for the
attacker's speed (17,000 to 45,000 activations in the same 4.5 s across versions)."""


@attrs.frozen
class Sizes:
    """How big each attack is."""

    h2c_connections: int
    h2c_streams: int
    listings: int
    stalled: int
    trickled: int
    streams: int
    cross_site_rounds: int

    @classmethod
    def issue(cls) -> Sizes:
        """The sizes issue 19 measured (one trickled body there; a hundred here)."""
        return cls(5, 100, 300, 1_100, 100, 300, 10)

    @classmethod
    def short(cls) -> Sizes:
        """For ``make test``: every attack, smaller."""
        return cls(2, 50, 100, 400, 20, 100, 2)

    def describe(self, attack: str) -> str:
        return {
            "h2c": f"{self.h2c_connections} connections x {self.h2c_streams} streams",
            "unread listings": f"{self.listings} connections",
            "stalled bodies": f"{self.stalled:,} connections",
            "trickled bodies": f"{self.trickled} connections, 1 byte/s",
            "stuck streams": f"{self.streams} streams",
            "cross-site and rebinding": f"{len(CROSS_SITE)} requests x {self.cross_site_rounds}",
        }.get(attack, "all of the above")


@attrs.define
class Measured:
    """One attack's row."""

    attack: str
    size: str
    growth_mb: float = 0.0
    worst_ping_ms: float = 0.0
    worst_fresh_ping_ms: float = 0.0
    up: bool = True
    state_changed: bool = False
    exit_s: float | None = None  # SIGTERM to exit, where the row sent one
    facts: str = ""
    anomalies: list[Anomaly] = attrs.Factory(list)

    @property
    def result(self) -> str:
        return "ok" if not self.anomalies else "; ".join(a.detail for a in self.anomalies)


# -- the attacks (each holds its abuse for ``hold`` seconds, then lets go) ---------------


def _request(path: str, host: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def _connect(port: int, rcvbuf: int | None = SO_RCVBUF) -> trio.SocketStream | None:
    """A TCP connection to ``port`` (``None`` if refused: a full server may refuse)."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return trio.SocketStream(sock)


async def _hold(stream: trio.SocketStream, payload: bytes, hold: float) -> None:
    """Send ``payload`` and read nothing for ``hold`` seconds."""
    with (
        trio.move_on_after(hold),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        async with stream:
            await stream.send_all(payload)
            await trio.sleep_forever()


async def _many(count: int, one: Callable[[int], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, n)


async def h2c(port: int, sizes: Sizes, hold: float) -> str:
    """HTTP/2 with prior knowledge (the preface), ``h2c_streams`` streams of
    ``GET /api/tokens`` per connection, never read; what the server first answered."""
    import h2.config
    import h2.connection

    answers: dict[str, int] = {}

    async def one(n: int) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for i in range(sizes.h2c_streams):
            headers = [
                (":method", "GET"),
                (":path", "/api/tokens"),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{port}"),
            ]
            conn.send_headers(1 + 2 * i, headers, end_stream=True)
        stream = await _connect(port)
        if stream is None:
            answers["refused"] = answers.get("refused", 0) + 1
            return
        # Read only the first bytes: the server's answer (an HTTP/2 SETTINGS frame
        # would start with a length and type 4), then nothing more.
        with (
            trio.move_on_after(hold),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            async with stream:
                await stream.send_all(conn.data_to_send())
                first = await stream.receive_some(16)
                kind = "http/2" if first[3:4] == b"\x04" else first[:12].decode("latin-1")
                answers[kind or "closed"] = answers.get(kind or "closed", 0) + 1
                await trio.sleep_forever()

    await _many(sizes.h2c_connections, one)
    return "answered " + ", ".join(f"{k.strip()!r} x{v}" for k, v in sorted(answers.items()))


async def unread_listings(port: int, sizes: Sizes, hold: float) -> str:
    """``GET /api/tokens`` on each connection, never read."""

    async def one(n: int) -> None:
        stream = await _connect(port)
        if stream is not None:
            await _hold(stream, _request("/api/tokens", "127.0.0.1"), hold)

    await _many(sizes.listings, one)
    return f"held {hold:g} s"


async def stalled_bodies(port: int, sizes: Sizes, hold: float) -> str:
    """A request head and 10 of its 100 body bytes, then nothing; how each ended."""
    head = _request(
        "/api/tokens/activate",
        "127.0.0.1",
        "Content-Type: application/json\r\nContent-Length: 100\r\n",
        method="POST",
    )
    outcomes: dict[str, int] = {}
    closed_after: list[float] = []

    async def one(n: int) -> None:
        stream = await _connect(port, rcvbuf=None)
        if stream is None:
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            return
        begun = trio.current_time()
        got = b""
        try:
            async with stream:
                await stream.send_all(head + b'{"user_id"')
                with trio.move_on_after(hold):
                    while chunk := await stream.receive_some(4096):
                        got += chunk
                    closed_after.append(trio.current_time() - begun)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            closed_after.append(trio.current_time() - begun)
        status = (
            got[9:12].decode()
            if got.startswith(b"HTTP/1.1")
            else ("cut" if closed_after else "open")
        )
        outcomes[status] = outcomes.get(status, 0) + 1

    await _many(sizes.stalled, one)
    spread = (
        f", closed after {min(closed_after):.1f}-{max(closed_after):.1f} s" if closed_after else ""
    )
    return "ended " + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())) + spread


async def trickled_bodies(port: int, sizes: Sizes, hold: float) -> tuple[str, float]:
    """A 100-byte body sent one byte a second; seconds until the server ended each
    (``inf``: still open after ``hold``). Returns the facts and the longest."""
    head = _request(
        "/api/tokens/activate",
        "127.0.0.1",
        "Content-Type: application/json\r\nContent-Length: 100\r\n",
        method="POST",
    )
    lived: list[float] = []

    async def one(n: int) -> None:
        stream = await _connect(port, rcvbuf=None)
        if stream is None:
            return
        begun = trio.current_time()
        try:
            async with stream:
                await stream.send_all(head)
                with trio.move_on_after(hold):
                    for _ in range(100):
                        await stream.send_all(b" ")
                        with trio.move_on_after(1.0):
                            if not await stream.receive_some(4096):
                                break
                            # An answer (408) comes before the close: wait for the close.
                            while await stream.receive_some(4096):
                                pass
                            break
                    else:
                        lived.append(float("inf"))
                        return
                    lived.append(trio.current_time() - begun)
                    return
                lived.append(float("inf"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            lived.append(trio.current_time() - begun)

    await _many(sizes.trickled, one)
    longest = max(lived, default=float("inf"))
    return f"dropped after {min(lived, default=0):.1f}-{longest:.1f} s", longest


async def stuck_streams(
    http_port: int, resp_port: int, sizes: Sizes, hold: float, stop: trio.Event | None = None
) -> tuple[str, str]:
    """``streams`` readers of ``/api/pools/churn/events`` that never read, while the
    ``churn`` pool (one token: each activation evicts, two events) changes past the
    overflow bound (``CHURN`` activations); then a new stream must be served. Returns
    the facts and the new stream's status line."""
    churned = 0

    async def one(n: int) -> None:
        stream = await _connect(http_port)
        if stream is not None:
            await _hold(stream, _request("/api/pools/churn/events", "127.0.0.1"), hold)

    async def churn() -> None:
        nonlocal churned
        try:
            client = await _Client.open(resp_port)
        except OSError:
            return  # refused: the run's own checks say so
        try:
            await trio.sleep(0.5)  # the streams subscribed
            with trio.move_on_after(hold - 0.5):
                while (stop is None or not stop.is_set()) and churned < CHURN:
                    batch = [("TP.ACTIVATE", "churn", f"c{churned + i}") for i in range(1_000)]
                    await call_many(client, batch)
                    churned += len(batch)
                    await trio.sleep(0.1)
        except (OSError, trio.BrokenResourceError):
            pass
        finally:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_many, sizes.streams, one)
        nursery.start_soon(churn)
    if stop is not None and stop.is_set():
        return f"{churned:,} activations ({2 * churned:,} events)", "-"
    status = await _status(http_port, _request("/api/pools/churn/events", "127.0.0.1"))
    return f"{churned:,} activations ({2 * churned:,} events); then a new stream: {status}", status


async def _status(port: int, request: bytes, seconds: float = 5.0) -> str:
    """The status line ``request`` is answered with (or why there is none)."""
    stream = await _connect(port, rcvbuf=None)
    if stream is None:
        return "refused"
    got = b""
    async with stream:
        try:
            await stream.send_all(request)
            with trio.move_on_after(seconds):
                while b"\r\n" not in got:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    got += chunk
        except (trio.BrokenResourceError, OSError):
            return "cut"
    return got.split(b"\r\n", 1)[0].decode("latin-1") or "no answer"


def _cross_site(port: int) -> list[tuple[str, bytes, tuple[int, ...]]]:
    """What a page of another origin, or at a name rebound to 127.0.0.1, can make a
    browser send; and the statuses that refuse it."""
    here = f"127.0.0.1:{port}"
    rebound = f"rebind.test:{port}"
    body = b'{"a":"="}'

    def post(path: str, host: str, headers: str, data: bytes = body) -> bytes:
        head = f"Content-Length: {len(data)}\r\n{headers}"
        return _request(path, host, head, method="POST") + data

    evil = "Origin: http://evil.test\r\nSec-Fetch-Site: cross-site\r\n"
    return [
        (
            "form text/plain",
            post("/api/tokens/clear", here, evil + "Content-Type: text/plain\r\n"),
            (403, 415),
        ),
        (
            "form urlencoded",
            post(
                "/api/tokens/clear",
                here,
                evil + "Content-Type: application/x-www-form-urlencoded\r\n",
                b"a=b",
            ),
            (403, 415),
        ),
        (
            "no-cors fetch",
            post("/api/tokens/clear", here, "Origin: http://evil.test\r\n", b""),
            (403,),
        ),
        (
            "cross-site activate",
            post(
                "/api/tokens/activate",
                here,
                evil + "Content-Type: text/plain\r\n",
                b'{"user_id":"x"}',
            ),
            (403, 415),
        ),
        ("rebinding read", _request("/api/tokens", rebound), (421,)),
        (
            "rebinding clear",
            post("/api/tokens/clear", rebound, "Content-Type: application/json\r\n", b"{}"),
            (421,),
        ),
        ("rebinding drop", _request("/api/pools/default", rebound, method="DELETE"), (421,)),
    ]


CROSS_SITE = _cross_site(0)


async def cross_site(port: int, sizes: Sizes) -> tuple[str, list[str]]:
    """Each of ``_cross_site``'s requests, ``cross_site_rounds`` times; the facts and any
    that was not refused."""
    wrong: list[str] = []
    seen: dict[str, set[str]] = {}
    for _ in range(sizes.cross_site_rounds):
        for name, request, refused in _cross_site(port):
            line = await _status(port, request)
            seen.setdefault(name, set()).add(line[9:12])
            # 503: a worker at its connection cap (the other attacks fill it) refuses too
            if not any(line.startswith(f"HTTP/1.1 {code}") for code in (*refused, 503)):
                wrong.append(f"{name} answered {line!r}")
    facts = ", ".join(f"{name} {'/'.join(sorted(codes))}" for name, codes in seen.items())
    return facts, wrong


# -- the run ----------------------------------------------------------------------------


class TreeMemory:
    """Samples the resident memory of a process and its descendants (the store process,
    the HTTP workers) every 0.1 s: ``(time.time(), bytes)``, and by role, to say which
    process grew."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.roles: list[dict[str, int]] = []  # beside each sample
        # The server's own CPU time and time spent runnable but waiting for a core (ns),
        # beside each sample: a late PING on 2 shared cores is often the second.
        self.sched: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, frontier = [self.pid], [self.pid]
        while frontier:
            frontier = [p for p, parent in parents.items() if parent in frontier]
            tree += frontier
        return tree

    def _role(self, pid: int) -> str:
        if pid == self.pid:
            return "server"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return "store" if b"_store" in f.read() else "workers"
        except OSError:
            return "workers"

    def _run(self) -> None:
        roles: dict[int, str] = {}
        rescan = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= rescan:  # workers are replaced: look again each second
                roles = {pid: self._role(pid) for pid in self._tree()}
                rescan = time.monotonic() + 1.0
            by_role: dict[str, int] = {}
            for pid, role in roles.items():
                with contextlib.suppress(OSError, RuntimeError):
                    by_role[role] = by_role.get(role, 0) + rss_bytes(pid)
            try:
                with open(f"/proc/{self.pid}/schedstat") as f:
                    ran, waited = (int(n) for n in f.read().split()[:2])
            except (OSError, ValueError):
                ran = waited = 0
            if by_role:
                self.samples.append((time.time(), sum(by_role.values())))
                self.roles.append(by_role)
                self.sched.append((ran, waited))
            self._stop.wait(0.1)

    def at(self, moment: float) -> int:
        """The last sample at or before ``moment``."""
        before = [b for t, b in self.samples if t <= moment]
        return before[-1] if before else self.samples[0][1]

    def peak(self, begun: float, ended: float) -> int:
        return max((b for t, b in self.samples if begun <= t <= ended), default=0)

    def cpu(self, begun: float, ended: float) -> str:
        """The server's CPU time and its wait for a core within the window."""
        inside = [i for i, (t, _) in enumerate(self.samples) if begun <= t <= ended]
        if len(inside) < 2:
            return ""
        (ran0, wait0), (ran1, wait1) = self.sched[inside[0]], self.sched[inside[-1]]
        seconds = self.samples[inside[-1]][0] - self.samples[inside[0]][0]
        return (
            f"server on a core {(ran1 - ran0) / 1e6:.0f} ms and waiting for one"
            f" {(wait1 - wait0) / 1e6:.0f} ms of {seconds * 1000:.0f} ms"
        )

    def grew(self, begun: float, ended: float, baseline: dict[str, int]) -> str:
        """Which processes grew, at the window's peak, over ``baseline``."""
        inside = [i for i, (t, _) in enumerate(self.samples) if begun <= t <= ended]
        if not inside:
            return ""
        at = self.roles[max(inside, key=lambda i: self.samples[i][1])]
        return ", ".join(
            f"{role} {(at[role] - baseline.get(role, 0)) / 2**20:+.0f} MB" for role in sorted(at)
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Probe:
    """``tests.chaos.probe``: PING every 20 ms from a process of its own."""

    def __init__(self, port: int, *, fresh: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.probe", str(port), *(["fresh"] if fresh else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def timings(self) -> list[tuple[float, float]]:
        out, _ = self.proc.communicate("stop\n", timeout=30)
        return [(float(at), float(rtt)) for at, rtt in json.loads(out)]


def _worst(timed: list[tuple[float, float]], begun: float, ended: float) -> float:
    return max((rtt for at, rtt in timed if begun <= at <= ended), default=0.0)


async def _fingerprint(port: int) -> tuple[int, list[tuple[str, str]]]:
    """The default pool's revision and who holds each token."""
    client = await _Client.open(port)
    try:
        tokens = _pairs(await client.call("TOKENS"))
        revision = int((await pool_stats(port))["revision"])
    finally:
        await client.aclose()
    return revision, sorted((t["id"], t.get("current_user_id") or "") for t in tokens)


async def fill(port: int, size: int) -> None:
    """Every token of the default pool held (long user ids: a large listing), and the
    ``churn`` pool of one token the event streams follow."""
    client = await _Client.open(port)
    try:
        for first in range(0, size, 1_000):
            batch = [
                ("ACTIVATE", f"user-{n:06d}-{'x' * 24}")
                for n in range(first, min(size, first + 1_000))
            ]
            await call_many(client, batch)
        await client.call("POOL", "CREATE", "churn", "SIZE", "1", "TTL", "600")
    finally:
        await client.aclose()


async def _up(server: Process, seconds: float = 10.0) -> bool:
    """RESP answers a PING on a fresh connection and HTTP answers ``/healthz``, within
    ``seconds`` of the attack's end (the attacker's connections may still be closing)."""
    with trio.move_on_after(seconds):
        while server.proc.poll() is None:
            if await _resp_ping(server.port) and (
                await _status(server.http_port or 0, _request("/healthz", "127.0.0.1"))
            ).startswith("HTTP/1.1 200"):
                return True
            await trio.sleep(0.5)
    return False


async def _resp_ping(port: int) -> bool:
    try:
        with trio.fail_after(5):
            client = await _Client.open(port)
            try:
                return bool(await client.call("PING") == "PONG")
            finally:
                await client.aclose()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False


def attacks_run(
    *,
    dsn: str | None,
    workers: int = 0,
    sizes: Sizes | None = None,
    size: int = 10_000,
    idle_timeout: float = 2.0,
    shutdown_timeout: float = 3.0,
    max_clients: int = 300,
    open_files: int | None = 1024,
    together: bool = True,
) -> tuple[Summary, list[Measured]]:
    """The attacks one after another, then (``together``) all at once with SIGTERM in
    their midst. Returns the summary row and a row per attack.

    ``max_clients`` 300: the event streams' cap is what 300 stuck streams filled in
    issue 19. ``open_files``: the server starts with that ``ulimit -n`` (soft and hard),
    as on the machine issue 19 measured (1,024), so the stalled bodies can reach it.
    """
    sizes = sizes or Sizes.issue()
    hold = idle_timeout + 3
    rows: list[Measured] = []
    with store(dsn) as url:
        args = (
            *("--dsn", url, "--size", str(size), "--ttl", "3600"),
            *("--idle-timeout", f"{idle_timeout:g}", "--shutdown-timeout", f"{shutdown_timeout:g}"),
            *("--max-clients", str(max_clients), "--http-port", str(free_port())),
            *("--http-workers", str(workers)),
        )
        server = start(*args, open_files=open_files)
        try:
            summary, rows = _attack(server, sizes, size, hold, shutdown_timeout, together)
        except BaseException:
            print(f"  the server's last log lines: {server.log[-8:]}", flush=True)
            raise
        finally:
            if server.proc.poll() is None:
                server.kill()
    name = f"HTTP attacks ({f'--http-workers {workers}' if workers else 'in-process HTTP'})"
    anomalies = [a for r in rows for a in r.anomalies]
    out: Summary = _summary(
        name,
        anomalies,
        operations=summary["pings"],
        clients=summary["clients"],
        faults=summary["faults"],
        rss=summary["peak_mb"],
    )
    out.worst_ping_ms = summary["worst_ping_ms"]
    out.p99_ping_ms = summary["p99_ping_ms"]
    print(attack_table(rows), flush=True)
    return out, rows


class _Attacker:
    """The attacks against one server, each measured: its window (for the PINGs and the
    memory samples), the server's pauses (``INFO pauses``) across it, and whether the
    server was up and the default pool unchanged after it."""

    def __init__(self, server: Process, sizes: Sizes, hold: float) -> None:
        self.server, self.sizes, self.hold = server, sizes, hold
        self.port, self.http_port = server.port, server.http_port or 0
        self.rows: list[Measured] = []
        self.windows: list[tuple[Measured, float, float, float]] = []  # pings until, memory until
        self.memory = TreeMemory(server.pid)
        time.sleep(1)
        self.baseline = self.memory.samples[-1][1]  # what the server holds before any attack
        self.baseline_roles = self.memory.roles[-1]

    async def settle(self) -> None:
        """Until the memory the last attack took is given back, or has stopped growing
        for 2 s (at most 15 s)."""
        peak, since = 0, time.monotonic()
        with trio.move_on_after(15):
            while self.memory.samples[-1][1] > self.baseline + 10 * 2**20:
                if self.memory.samples[-1][1] > peak:
                    peak, since = self.memory.samples[-1][1], time.monotonic()
                elif time.monotonic() - since > 2:
                    return
                await trio.sleep(0.2)

    async def state(self, row: Measured) -> Any:
        """The default pool's leases (``_fingerprint``), asked over RESP for up to 10 s; a
        refusal all that time is an anomaly of the row (and the state counts as unknown)."""
        refused: BaseException | None = None
        with trio.move_on_after(10):
            while True:
                try:
                    return await _fingerprint(self.port)
                except (OSError, trio.BrokenResourceError) as error:
                    refused = error
                await trio.sleep(0.5)
        row.anomalies.append(Anomaly("refused", f"RESP refused a new client: {refused}"))
        return None

    async def pauses(self) -> dict[str, float]:
        """The server's own pauses so far (``INFO pauses``): count, total, longest."""
        try:
            with trio.fail_after(10):
                client = await _Client.open(self.port)
                try:
                    text = await client.call("INFO", "pauses")
                finally:
                    await client.aclose()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return {}
        fields = dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)
        return {k: float(v) for k, v in fields.items() if not k.endswith("histogram_ms")}

    async def measure(self, name: str, attack: Callable[[Measured], Awaitable[str]]) -> None:
        print(f"  attack: {name}", flush=True)
        row = Measured(name, self.sizes.describe(name))
        before, paused = await self.state(row), await self.pauses()
        begun = time.time()
        row.facts = await attack(row)
        row.up = await _up(self.server)
        # What the attack left the server doing (requests it still answers, memory it
        # gives back) counts too: the window ends once the memory settled (at most 10 s).
        await self.settle()
        ended = time.time()
        self.windows.append((row, begun, ended, ended))
        if not row.up:
            row.anomalies.append(Anomaly("crash", f"{name}: the server stopped serving"))
        else:
            if before != await self.state(row):
                row.state_changed = True
                row.anomalies.append(Anomaly("state changed", f"{name}: the default pool changed"))
            row.facts += "; " + _pauses_between(paused, await self.pauses())
        self.rows.append(row)

    # -- each attack, as a measured step --

    async def h2c(self, row: Measured) -> str:
        return await h2c(self.http_port, self.sizes, self.hold)

    async def unread_listings(self, row: Measured) -> str:
        return await unread_listings(self.http_port, self.sizes, self.hold)

    async def stalled_bodies(self, row: Measured) -> str:
        return await stalled_bodies(self.http_port, self.sizes, self.hold)

    async def trickled_bodies(self, row: Measured) -> str:
        facts, longest = await trickled_bodies(self.http_port, self.sizes, self.hold + 3)
        if longest > self.hold:
            row.anomalies.append(Anomaly("slow body", f"a trickled body lived {longest:.1f} s"))
        return facts

    async def stuck_streams(self, row: Measured) -> str:
        facts, status = await stuck_streams(self.http_port, self.port, self.sizes, self.hold + 2)
        if not status.startswith("HTTP/1.1 200"):
            row.anomalies.append(Anomaly("stream slots", f"a new stream after them: {status!r}"))
        return facts

    async def cross_site(self, row: Measured) -> str:
        facts, wrong = await cross_site(self.http_port, self.sizes)
        row.anomalies.extend(Anomaly("cross-site", w) for w in wrong)
        return facts

    def steps(self) -> list[tuple[str, Callable[[Measured], Awaitable[str]]]]:
        return [
            ("h2c", self.h2c),
            ("unread listings", self.unread_listings),
            ("stalled bodies", self.stalled_bodies),
            ("trickled bodies", self.trickled_bodies),
            ("stuck streams", self.stuck_streams),
            ("cross-site and rebinding", self.cross_site),
        ]

    async def together(self, shutdown_timeout: float) -> None:
        """Every attack at once; once all are under way (and the cross-site requests
        answered), SIGTERM, timed to the exit."""
        print("  attack: all together, then SIGTERM", flush=True)
        row = Measured("all together, then SIGTERM", "all of the above")
        await self.settle()
        before = await self.state(row)
        begun = time.time()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for attack in (h2c, unread_listings, stalled_bodies, trickled_bodies):
                nursery.start_soon(attack, self.http_port, self.sizes, self.hold)
            nursery.start_soon(
                stuck_streams, self.http_port, self.port, self.sizes, self.hold, stop
            )
            crossed = trio.Event()

            async def cross() -> None:
                await self.cross_site(row)
                crossed.set()

            nursery.start_soon(cross)
            await trio.sleep(min(self.hold - 1, 3.0))  # every attack under way, streams stuck
            await crossed.wait()  # answered before the SIGTERM
            if before != await self.state(row):
                row.state_changed = True
                row.anomalies.append(Anomaly("state changed", "the default pool changed"))
            stop.set()
            # The PINGs judged are those sent before this moment; the ones in flight get
            # a second to be answered before the SIGTERM closes the port (a fresh
            # connection refused by a server shutting down is not a delayed PING; one
            # still unanswered after a second was delayed anyway, and still counts).
            pings_until = time.time()
            await trio.sleep(1.0)
            signalled = time.monotonic()
            self.server.proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(lambda: self.server.wait(timeout=60))
            took = time.monotonic() - signalled
            nursery.cancel_scope.cancel()
        self.windows.append((row, begun, pings_until, time.time()))
        row.facts = f"SIGTERM: exit {code} after {took:.2f} s"
        row.exit_s = took
        if took > shutdown_timeout:
            row.anomalies.append(
                Anomaly(
                    "slow shutdown",
                    f"SIGTERM took {took:.2f} s, {took - shutdown_timeout:.2f} s past"
                    f" --shutdown-timeout {shutdown_timeout:g}",
                )
            )
        if code != 0:
            print(f"  the server's last log lines: {self.server.log[-25:]}", flush=True)
            errors = [e for e in self.server.log if e.get("level") in ("error", "critical")]
            row.anomalies.append(Anomaly("unclean exit", f"exit {code} on SIGTERM: {errors[-3:]}"))
        self.rows.append(row)

    def judge(self, timed: list[tuple[float, float]], fresh: list[tuple[float, float]]) -> None:
        """Each row's memory growth (its peak over what the server held before any
        attack) and worst PINGs, against the goals."""
        for row, begun, pings_until, memory_until in self.windows:
            peak = self.memory.peak(begun, memory_until)
            row.growth_mb = (peak - self.baseline) / 2**20
            if row.growth_mb > 10:
                row.facts += (
                    f"; at the peak: {self.memory.grew(begun, memory_until, self.baseline_roles)}"
                )
            carried = (self.memory.at(begun) - self.baseline) / 2**20
            if carried > 10:
                row.facts += f"; {carried:.0f} MB still held from before it"
            row.facts += f"; {self.memory.cpu(begun, pings_until)}"
            row.worst_ping_ms = _worst(timed, begun, pings_until) * 1000
            row.worst_fresh_ping_ms = _worst(fresh, begun, pings_until) * 1000
            if row.growth_mb > GOAL_GROWTH_MB:
                row.anomalies.append(Anomaly("memory", f"grew {row.growth_mb:.0f} MB"))
            worst = max(row.worst_ping_ms, row.worst_fresh_ping_ms)
            if worst > GOAL_PING * 1000:
                row.anomalies.append(Anomaly("delayed", f"a PING waited {worst:.0f} ms"))


def _pauses_between(before: dict[str, float], after: dict[str, float]) -> str:
    """What held the server's event loop meanwhile: each cause's pauses, their total,
    and the longest (when it is new)."""
    parts = []
    if not before or not after:
        return "server pauses: not known (RESP refused INFO)"
    for cause in ("gc", "actor", "loop"):
        count = after[f"{cause}_pauses"] - before[f"{cause}_pauses"]
        total = after[f"{cause}_pause_total_ms"] - before[f"{cause}_pause_total_ms"]
        longest = after[f"{cause}_pause_max_ms"]
        new = f", longest {longest:.0f} ms" if longest > before[f"{cause}_pause_max_ms"] else ""
        parts.append(f"{cause} {count:.0f} in {total:.0f} ms{new}")
    return "server pauses: " + ", ".join(parts)


def _attack(
    server: Process, sizes: Sizes, size: int, hold: float, shutdown_timeout: float, together: bool
) -> tuple[dict[str, Any], list[Measured]]:
    trio.run(fill, server.port, size)
    attacker = _Attacker(server, sizes, hold)
    probe, fresh = _Probe(server.port), _Probe(server.port, fresh=True)

    async def main() -> None:
        for name, step in attacker.steps():
            await attacker.measure(name, step)
        if together:
            await attacker.together(shutdown_timeout)

    started = time.time()
    try:
        trio.run(main)
    finally:
        timed, timed_fresh = probe.timings(), fresh.timings()
        attacker.memory.stop()
    attacker.judge(timed, timed_fresh)
    rows = attacker.rows
    rtts = sorted(rtt for _, rtt in timed if rtt != float("inf"))
    peak = attacker.memory.peak(started, time.time())
    clients = (
        sizes.h2c_connections + sizes.listings + sizes.stalled + sizes.trickled + sizes.streams + 2
    )
    faults = (
        f"h2c {sizes.describe('h2c')}, {sizes.listings} unread listings, {sizes.stalled:,} stalled"
        f" bodies, {sizes.trickled} trickled bodies, {sizes.streams} stuck streams, cross-site and"
        f" rebinding requests; one after another, then together with SIGTERM; memory before"
        f" {attacker.baseline / 2**20:.0f} MB, grew at most {max(r.growth_mb for r in rows):.0f} MB"
    )
    return (
        {
            "pings": len(timed),
            "clients": clients,
            "faults": faults,
            "peak_mb": peak / 2**20,
            "worst_ping_ms": max(max(r.worst_ping_ms, r.worst_fresh_ping_ms) for r in rows),
            "p99_ping_ms": rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))] * 1000 if rtts else None,
        },
        rows,
    )


def attack_table(rows: list[Measured]) -> str:
    lines = [
        "| attack | size | memory growth | worst PING (fresh connection) | stayed up"
        " | state changed | result |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.attack} | {r.size} | {r.growth_mb:.0f} MB | {r.worst_ping_ms:.0f} ms"
            f" ({r.worst_fresh_ping_ms:.0f} ms) | {'yes' if r.up else 'no'}"
            f" | {'yes' if r.state_changed else 'no'} | {r.result}; {r.facts} |"
        )
    return "\n".join(lines)
