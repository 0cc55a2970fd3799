"""The reliability runs: each starts real server processes, injects its fault, records
a history with many clients, checks it, and returns one summary row."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio

from .checker import Anomaly, Report, StoredLease, check
from .history import Operation, Workload, pool_revision, pool_stats, pool_tokens, record
from .server import (
    Process,
    free_port,
    open_fds,
    rss_bytes,
    running,
    start,
    stored_leases,
)

# The checkout this suite lives in: its processes import ``tests.chaos`` from there.
ROOT = Path(__file__).resolve().parents[2]
TTL = "3600"  # no lease expires during a run: the reference model has no clock


@attrs.define
class Summary:
    """One row of the reliability table."""

    run: str
    operations: int
    clients: int
    faults: str
    anomalies: int
    lost_acknowledged: int
    double_holders: int
    max_rss_mb: float
    detail: list[str] = attrs.Factory(list)
    worst_ping_ms: float | None = None  # another client's worst PING while the run went on
    p99_ping_ms: float | None = None

    @property
    def ok(self) -> bool:
        return not (self.anomalies or self.lost_acknowledged or self.double_holders)


@contextmanager
def store(dsn: str | None) -> Iterator[str]:
    """A fresh store: a schema of its own on ``dsn`` (PostgreSQL), else a SQLite file."""
    if dsn is None:
        with tempfile.TemporaryDirectory(prefix="tokenpool-chaos-") as tmp:
            yield f"sqlite:///{os.path.join(tmp, 'pool.db')}"
        return
    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    finally:
        with psycopg.connect(dsn.split("?")[0], autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


class _Memory:
    """Samples a process's resident memory in the background."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):  # the process is gone
                return
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def _summary(
    name: str, anomalies: list[Anomaly], *, operations: int, clients: int, faults: str, rss: float
) -> Summary:
    """One table row; a wrong grant (history check) and overlapping stored leases (crash
    check) are both a token with two holders."""
    return Summary(
        run=name,
        operations=operations,
        clients=clients,
        faults=faults,
        anomalies=len(anomalies),
        lost_acknowledged=sum(1 for a in anomalies if a.kind == "lost change"),
        double_holders=sum(1 for a in anomalies if a.kind in ("double holder", "wrong grant")),
        max_rss_mb=rss,
        detail=[f"{a.kind}: {a.detail}" for a in anomalies[:10]],
    )


def history_run(
    workload: Workload, *, dsn: str | None = None, size: int = 8, durability: str = "async"
) -> tuple[Summary, Report]:
    """Many clients against one server; the whole history checked against the model."""
    with store(dsn) as url:
        args = ("--dsn", url, "--size", str(size), "--ttl", TTL, "--durability", durability)
        with running(*args) as server:
            memory = _Memory(server.pid)
            tokens, start, end, history = trio.run(_record, server, workload)
            code = server.stop()
            rss = memory.stop()
        stored = stored_leases(url)
    report = check(history, tokens=tokens, start_revision=start, end_revision=end, stored=stored)
    faults = f"{report.lost} connections dropped mid-request"
    if code != 0:
        report.anomalies.append(_exit_anomaly(code))
    summary = _summary(
        f"history ({durability})",
        report.anomalies,
        operations=report.operations,
        clients=workload.clients,
        faults=faults,
        rss=rss,
    )
    return summary, report


async def _record(server: Process, workload: Workload) -> tuple[list[str], int, int, Any]:
    tokens = await pool_tokens(server.port)
    start = await pool_revision(server.port)
    history = await record(server.port, workload)
    await trio.sleep(0.5)  # requests sent on dropped connections may still be in flight
    end = await pool_revision(server.port)
    return tokens, start, end, history


def _exit_anomaly(code: int) -> Anomaly:
    return Anomaly("unclean exit", f"the server exited {code} on SIGTERM")


def wait_serving(port: int, seconds: float) -> float:
    """Seconds until the server on ``port`` answers PING (raises after ``seconds``)."""
    import socket

    begun = time.monotonic()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return time.monotonic() - begun
        except OSError:
            pass
        if time.monotonic() - begun > seconds:
            raise TimeoutError(f"nothing served on port {port} within {seconds} s")
        time.sleep(0.05)


def check_crash(
    history: list[Operation],
    stored: list[StoredLease],
    *,
    killed_at: float,
    durability: str,
    window: float,
) -> tuple[list[Anomaly], dict[str, float]]:
    """What a crash may and may not do, checked on the history and the store after it.

    - An acknowledged grant is in the store afterwards (active or ended); in
      ``async`` mode one acknowledged within ``window`` seconds before the kill
      may be missing (the stated loss window), never an older one.
    - No token ever had two holders: per token, the stored leases do not overlap.
    - Fences only grow: every grant acknowledged after the restart has a higher
      fence than every grant acknowledged before the kill.
    """
    anomalies: list[Anomaly] = []
    known = {s.id for s in stored}
    grants = [
        op
        for op in history
        if op.kind == "activate" and op.ok and int(op.value["fence"]) == op.revision
    ]
    lost_ages: list[float] = []
    for op in grants:
        if op.value["id"] in known:
            continue
        age = killed_at - (op.completed or 0.0)
        lost_ages.append(age)
        # (An acknowledgement can land a moment after the kill was sent: age < 0.)
        if durability == "sync" or age > window:
            anomalies.append(
                Anomaly(
                    "lost change",
                    f"grant of {op.value['token_id']} to {op.args[0]} (fence"
                    f" {op.value['fence']}), acknowledged {age:.3f} s before the kill, is gone",
                )
            )
    anomalies += _overlaps(stored)
    # Writes commit in order, so what a crash loses is a tail: every lost grant is newer
    # than every acknowledged grant that survived from before the kill.
    kept = [
        int(op.value["fence"])
        for op in grants
        if op.value["id"] in known and (op.completed or 0) < killed_at
    ]
    lost_fences = [int(op.value["fence"]) for op in grants if op.value["id"] not in known]
    if kept and lost_fences and min(lost_fences) < max(kept):
        anomalies.append(
            Anomaly(
                "lost change",
                f"grant with fence {min(lost_fences)} is gone while a later one"
                f" ({max(kept)}) survived: not a tail",
            )
        )
    before_kill = [int(op.value["fence"]) for op in grants if (op.completed or 0) < killed_at]
    after_kill = [int(op.value["fence"]) for op in grants if op.invoked > killed_at]
    if before_kill and after_kill and min(after_kill) <= max(before_kill):
        anomalies.append(
            Anomaly(
                "fence went back",
                f"a grant after the restart has fence {min(after_kill)}, not above"
                f" {max(before_kill)} from before the kill",
            )
        )
    figures = {
        "lost_in_window": float(len(lost_ages)),
        "max_lost_age_s": max(lost_ages, default=0.0),
        "grants": float(len(grants)),
    }
    return anomalies, figures


def crash_run(
    workload: Workload,
    *,
    dsn: str | None = None,
    durability: str = "sync",
    size: int = 8,
    kill_after: float = 1.5,
    window: float = 1.0,
    terminate: bool = False,
    group_signal: int | None = None,
    name: str | None = None,
    pid_signal: int = signal.SIGTERM,
) -> Summary:
    """SIGKILL the server under load, restart it, keep going; check what survived.

    With ``terminate``, ``pid_signal`` (SIGTERM, or SIGINT) to the pid instead: then
    nothing may be lost (no window), and the server must exit 0. With ``group_signal``,
    that signal to the whole process group (the store process too, as systemd or a
    Ctrl-C does): the same promise.
    """
    if group_signal is not None:
        terminate = True
    port = free_port()
    with store(dsn) as url:
        args = ("--dsn", url, "--size", str(size), "--ttl", TTL, "--durability", durability)
        grouped = group_signal is not None
        holder = {"server": start(*args, port=port, new_session=grouped)}
        memory = _Memory(holder["server"].pid)
        facts: dict[str, float] = {}

        async def fault() -> None:
            await trio.sleep(kill_after)
            facts["killed_at"] = trio.current_time()
            if group_signal is not None:
                holder["server"].signal_group(group_signal)
                facts["exit"] = await trio.to_thread.run_sync(holder["server"].wait)
            elif terminate:  # ``pid_signal`` to the server's pid alone
                holder["server"].proc.send_signal(pid_signal)
                facts["exit"] = await trio.to_thread.run_sync(holder["server"].wait)
            else:
                await trio.to_thread.run_sync(holder["server"].kill)
            begun = time.monotonic()
            holder["server"] = await trio.to_thread.run_sync(lambda: start(*args, port=port))
            await trio.to_thread.run_sync(wait_serving, port, 30.0)
            facts["restart_s"] = time.monotonic() - begun

        async def main() -> list[Operation]:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fault)
                history = await record(port, workload)
            return history

        try:
            history = trio.run(main)
        finally:
            rss = memory.stop()
            code = holder["server"].stop()
        stored = stored_leases(url)
    anomalies, figures = check_crash(
        history,
        stored,
        killed_at=facts["killed_at"],
        durability="sync" if terminate else durability,  # SIGTERM: nothing may be lost
        window=window,
    )
    if terminate and facts.get("exit") != 0:
        anomalies.append(_exit_anomaly(int(facts.get("exit", -1))))
    if code != 0:
        anomalies.append(_exit_anomaly(code))
    if facts["restart_s"] > 5.0:
        anomalies.append(
            Anomaly("slow restart", f"serving again took {facts['restart_s']:.1f} s (over 5 s)")
        )
    lost_ops = sum(1 for op in history if op.lost)
    signal_name = signal.Signals(pid_signal).name if terminate else "SIGKILL"
    if group_signal is not None:
        signal_name = f"{signal.Signals(group_signal).name} to the process group"
    faults = (
        f"{signal_name} under load,"
        f" restart in {facts['restart_s']:.2f} s;"
        f" {lost_ops} calls cut off; {figures['lost_in_window']:.0f} acknowledged grants"
        f" lost in the window (oldest {figures['max_lost_age_s'] * 1000:.0f} ms before the kill)"
    )
    return _summary(
        name or f"{'sigterm' if terminate else 'crash'} ({durability})",
        anomalies,
        operations=len(history),
        clients=workload.clients,
        faults=faults,
        rss=rss,
    )


FAKETIME_PATHS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def libfaketime() -> str | None:
    """The libfaketime library (Debian's ``faketime`` package), if installed."""
    return next((p for p in FAKETIME_PATHS if os.path.exists(p)), None)


def _overlaps(stored: list[StoredLease]) -> list[Anomaly]:
    """Per token, in fence order (a later grant has a higher fence), each stored lease
    ended no later than the next one began: no token ever had two holders."""
    anomalies: list[Anomaly] = []
    by_token: dict[str, list[StoredLease]] = {}
    for s in stored:
        by_token.setdefault(s.token_id, []).append(s)
    for token, leases in by_token.items():
        leases.sort(key=lambda s: s.fence or 0)
        for before, after in itertools.pairwise(leases):
            if before.ended_at is None or (
                after.started_at is not None and before.ended_at > after.started_at
            ):
                anomalies.append(
                    Anomaly(
                        "double holder",
                        f"token {token}: lease {before.id} ({before.user_id}) still held"
                        f" when lease {after.id} ({after.user_id}) began",
                    )
                )
    return anomalies


def _offset_hours(offset: str) -> float:
    """A libfaketime relative offset (``+0``, ``-1h``, ``+90m``) in hours."""
    units = {"h": 1.0, "m": 1 / 60, "s": 1 / 3600, "d": 24.0}
    if offset[-1] in units:
        return float(offset[:-1]) * units[offset[-1]]
    return float(offset) / 3600


def clock_run(
    workload: Workload,
    *,
    dsn: str | None = None,
    offsets: tuple[str, ...] = ("+0", "-1h", "+1h", "-3h", "+0"),
    size: int = 8,
) -> Summary:
    """Restarts with the wall clock set back and forward (libfaketime), under load.

    Checked like the crash runs (``sync`` durability, SIGTERM between phases): every
    acknowledged grant is in the store; no token had two holders; fences grow across
    every restart; time never runs backwards (no lease starts before the previous
    phase's newest time); the store refused nothing; every stop exits 0.
    """
    library = libfaketime()
    if library is None:
        raise RuntimeError("libfaketime is not installed (apt-get install faketime)")
    anomalies: list[Anomaly] = []
    port = free_port()
    phases: list[list[Operation]] = []
    peak = 0.0
    refused = 0
    with store(dsn) as url:
        args = ("--dsn", url, "--size", str(size), "--ttl", TTL, "--durability", "sync")
        for offset in offsets:
            env = {
                "LD_PRELOAD": library,
                "FAKETIME": offset,
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            }
            server = start(*args, port=port, env=env)
            memory = _Memory(server.pid)
            phase = Workload(
                clients=workload.clients,
                operations=max(200, min(workload.operations // len(offsets), 10_000)),
                users=workload.users,
                lose=0.0,
                seed=workload.seed + len(phases),
            )

            phases.append(trio.run(record, port, phase))
            code = server.stop()
            peak = max(peak, memory.stop())
            refused += sum(1 for e in server.log if e.get("event") == "store_refused_changes")
            if code != 0:
                anomalies.append(_exit_anomaly(code))
            hours = [_offset_hours(o) for o in offsets[: len(phases)]]
            behind = any(e.get("event") == "wall_clock_behind_store" for e in server.log)
            if len(hours) > 1 and hours[-1] < max(hours[:-1]) and not behind:
                # The run proves nothing if the fake clock did not take effect.
                anomalies.append(
                    Anomaly("clock not faked", f"clock {offset}: no wall_clock_behind_store")
                )
        stored = stored_leases(url)
    known = {s.id for s in stored}
    previous_fence = 0
    previous_time = ""
    for offset, history in zip(offsets, phases, strict=True):
        grants = [
            op
            for op in history
            if op.kind == "activate" and op.ok and int(op.value["fence"]) == op.revision
        ]
        for op in grants:
            if op.value["id"] not in known:
                anomalies.append(
                    Anomaly("lost change", f"grant {op.value['id']} (clock {offset}) is gone")
                )
        if grants:
            low = min(int(op.value["fence"]) for op in grants)
            if low <= previous_fence:
                anomalies.append(
                    Anomaly("fence order", f"clock {offset}: fence {low} after {previous_fence}")
                )
            previous_fence = max(int(op.value["fence"]) for op in grants)
            first = min(op.value["activated_at"] for op in grants)
            if previous_time and first < previous_time:
                anomalies.append(
                    Anomaly(
                        "time ran backwards",
                        f"clock {offset}: a lease starts at {first}, before {previous_time}",
                    )
                )
            previous_time = max(op.value["activated_at"] for op in grants)
    for s in stored:
        if s.started_at and s.ended_at and s.ended_at < s.started_at:
            anomalies.append(Anomaly("time ran backwards", f"{s} ended before it started"))
    anomalies += _overlaps(stored)
    if refused:
        anomalies.append(Anomaly("refused", f"the store refused {refused} batches"))
    operations = sum(len(h) for h in phases)
    faults = f"{len(offsets)} restarts with the wall clock at {', '.join(offsets)}"
    return _summary(
        "clock set back and forward",
        anomalies,
        operations=operations,
        clients=workload.clients,
        faults=faults,
        rss=peak,
    )


def hostile_run(
    *,
    slowloris_connections: int = 1000,
    garbage_connections: int = 200,
    flood_connections: int = 200,
    idle_timeout: float = 2,
    size: int = 10_000,
    grace: float = 1.5,
    pools: int = 300,
    clear: int = 5_000,
    channels: int = 1_200,
    patterns: int = 300,
    waiters: int = 200,
) -> Summary:
    """Negative protocol cases, random bytes, slowloris and floods of the largest replies
    against one server at once, while a well-behaved client's PING is timed.

    ``grace``: how long after its deadline a slowloris connection may still be seen
    open (the clients measure from their own process, which shares the cores).

    Then, one after another while the PING is still timed: ``pools`` pools created and a
    ``/metrics`` scrape; one connection with ``patterns`` PSUBSCRIBE patterns over them;
    ``waiters`` clients waiting on a full pool that give up (a WAIT that runs out, or a
    hang-up); a ``CLEAR`` of ``clear`` leases; one connection subscribing to ``channels``
    replaying channels of that pool (refused past 1,000)."""
    from . import hostile

    anomalies: list[Anomaly] = []
    http_port = free_port()
    args: tuple[str, ...] = (
        "--dsn",
        "memory",
        "--size",
        str(size),
        "--idle-timeout",
        str(idle_timeout),
    )
    args += ("--http-port", str(http_port))
    with running(*args) as server:
        memory = _Memory(server.pid)
        fds_before = open_fds(server.pid)
        facts: dict[str, Any] = {}

        probe = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.probe", str(server.port)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        async def main() -> None:
            async with trio.open_nursery():
                facts["negative"] = await hostile.negative(server.port)
                facts["garbage_closed"] = await hostile.random_bytes(
                    server.port, garbage_connections, rounds=20
                )
                async with trio.open_nursery() as abuse:

                    async def run_slowloris() -> None:
                        facts["slowloris"] = await hostile.slowloris(
                            server.port, slowloris_connections, idle_timeout
                        )

                    async def flood() -> None:
                        facts["flood_read"] = await hostile.large_replies(
                            server.port, flood_connections, 1024, idle_timeout + 4
                        )

                    abuse.start_soon(run_slowloris)
                    abuse.start_soon(flood)
                await second_round()

        phases: list[tuple[float, str]] = [(time.time(), "first round")]

        async def second_round() -> None:
            port = server.port
            phases.append((time.time(), "creating pools"))
            facts["pools"] = await hostile.many_pools(port, pools)
            phases.append((time.time(), "/metrics"))
            facts["metrics"] = await hostile.scrape_metrics(http_port)
            phases.append((time.time(), "patterns"))
            facts["patterns"] = await hostile.patterns(port, patterns, pools)
            phases.append((time.time(), "waiters"))
            facts["waiters"] = await hostile.waiters_giving_up(port, waiters)
            phases.append((time.time(), "leasing and clearing the big pool"))
            facts["clear"] = await hostile.big_clear(port, clear)
            phases.append((time.time(), "subscriptions"))
            revision = int((await pool_stats(port, "big"))["revision"])
            facts["channels"] = await hostile.subscriptions(port, channels, "big", revision)
            phases.append((time.time(), "after"))

        trio.run(main)
        out, _ = probe.communicate("stop\n", timeout=30)
        timed = [(float(at), float(rtt)) for at, rtt in json.loads(out)]
        facts["pings"] = [rtt for _, rtt in timed]
        facts["served"] = len(facts["pings"])
        for (name, _payload, expected), outcome in zip(
            hostile.NEGATIVE, facts["negative"], strict=True
        ):
            if expected is not None and not outcome.reply.startswith(expected):
                anomalies.append(
                    Anomaly("negative case", f"{name}: answered {outcome.reply[:80]!r}")
                )
            if not outcome.closed:
                anomalies.append(Anomaly("negative case", f"{name}: connection left open"))
        slow = facts["slowloris"]
        late = [t for t in slow if t > idle_timeout + grace]
        if late:
            anomalies.append(
                Anomaly(
                    "slowloris",
                    f"{len(late)} of {len(slow)} connections lived past the"
                    f" {idle_timeout} s deadline (longest {max(late):.1f} s)",
                )
            )
        pings = facts["pings"]
        worst = max(pings) if pings else float("inf")
        # The worst PING of each phase: which abuse made the well-behaved client wait.
        by_phase: dict[str, float] = {}
        for at, rtt in timed:
            phase = max((p for p in phases if p[0] <= at), default=phases[0])[1]
            by_phase[phase] = max(by_phase.get(phase, 0.0), rtt)
        facts["by_phase"] = by_phase
        if worst > WORST_PING:
            anomalies.append(
                Anomaly("starved", f"a well-behaved PING waited {worst * 1000:.0f} ms")
            )
        if not facts.get("flood_read"):
            anomalies.append(Anomaly("starved", "the slowly reading client got nothing"))
        if server.proc.poll() is not None:
            anomalies.append(Anomaly("crash", f"the server exited {server.proc.returncode}"))
        time.sleep(0.5)
        fds_after = open_fds(server.pid)
        if fds_after > fds_before + 5:
            anomalies.append(
                Anomaly("fd leak", f"{fds_before} file descriptors before, {fds_after} after")
            )
        rss = memory.stop()
    if rss > MAX_HOSTILE_RSS_MB:
        anomalies.append(Anomaly("memory", f"the server grew to {rss:.0f} MB"))
    taken, refusal = facts["channels"]
    if channels > MAX_CHANNELS and (taken > MAX_CHANNELS or not refusal):
        anomalies.append(
            Anomaly("subscriptions", f"{taken} channels taken on one connection ({refusal!r})")
        )
    if facts["clear"][0] != clear:
        anomalies.append(Anomaly("clear", f"CLEAR ended {facts['clear'][0]} of {clear} leases"))
    metrics_bytes, metrics_s = facts["metrics"]
    patterns_taken, _ = facts["patterns"]
    faults = (
        f"{len(hostile.NEGATIVE)} negative protocol cases, {garbage_connections} random-byte"
        f" clients ({facts['garbage_closed']} closed by the server), {len(slow)} slowloris"
        f" connections (closed after {min(slow):.1f} to {max(slow):.1f} s),"
        f" {flood_connections} never-reading clients each asking 1,024 of the largest"
        f" replies (pool of {size:,}); {facts['pools']:,} pools then /metrics"
        f" ({metrics_bytes / 1024:.0f} KB in {metrics_s * 1000:.0f} ms); {patterns_taken}"
        f" PSUBSCRIBE patterns over them; {waiters} waiters giving up ({facts['waiters']}"
        f" WAITs ran out, the rest hung up); CLEAR of {facts['clear'][0]:,} leases"
        f" (answered in {facts['clear'][1] * 1000:.0f} ms); {channels:,} replaying channels"
        f" on one connection ({taken} taken, then {refusal.split(' ')[0] or 'not refused'});"
        f" worst PING while {max(by_phase.items(), key=lambda kv: kv[1])[0]}"
        f" (by phase: {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in by_phase.items())})"
    )
    summary = _summary(
        "hostile clients",
        anomalies,
        operations=facts["served"],
        clients=2 + garbage_connections + len(slow) + flood_connections + waiters + 3,
        faults=faults,
        rss=rss,
    )
    summary.worst_ping_ms = worst * 1000
    ordered = sorted(pings)
    summary.p99_ping_ms = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
    return summary


WORST_PING = 0.5  # seconds a well-behaved PING may wait while the abuse goes on (2 cores,
# shared with the abusers' own process: one garbage collection or one descheduling of
# the server shows in the worst; the p99 is in the table too)
MAX_HOSTILE_RSS_MB = 400
MAX_CHANNELS = 1_000  # channels and patterns one connection may hold (README)


def outage_run(
    workload: Workload, *, durability: str = "async", down: float = 30.0, after: float = 1.0
) -> Summary:
    """PostgreSQL stopped (``pg_ctl stop -m immediate``) under load for ``down`` seconds,
    then started again, on a throwaway cluster of this run's own.

    ``async``: the whole history is checked against the model, the backlog drains, every
    ended lease is in the tables exactly once, and p99 latency while the database is
    down stays under 10 ms. ``sync``: every call answers (UNAVAILABLE within the write
    timeout) instead of hanging, no confirmed grant is lost, no token has two holders,
    and the service recovers by itself.
    """
    from .cluster import Cluster

    cluster = Cluster()
    anomalies: list[Anomaly] = []
    facts: dict[str, float] = {}
    try:
        with store(cluster.dsn) as url:
            args = ("--dsn", url, "--size", "8", "--ttl", TTL, "--durability", durability)
            with running(*args) as server:
                memory = _Memory(server.pid)

                async def fault() -> None:
                    await trio.sleep(after)
                    facts["down_at"] = trio.current_time()
                    await trio.to_thread.run_sync(cluster.stop, "immediate")
                    await trio.sleep(down)
                    await trio.to_thread.run_sync(cluster.start)
                    facts["up_at"] = trio.current_time()

                async def main() -> tuple[list[str], int, int, list[Operation]]:
                    tokens = await pool_tokens(server.port)
                    start_rev = await pool_revision(server.port)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(fault)
                        history = await record(server.port, workload)
                    with trio.fail_after(120):  # the backlog drains by itself
                        # Polling another process: there is no event to wait on.
                        while int((await pool_stats(server.port))["backlog"]):
                            await trio.sleep(0.1)
                    return tokens, start_rev, await pool_revision(server.port), history

                tokens, start_rev, end_rev, history = trio.run(main)
                code = server.stop()
                rss = memory.stop()
            stored = stored_leases(url)
    finally:
        cluster.destroy()
    if "up_at" not in facts:
        anomalies.append(Anomaly("short run", "the load ended before the database came back"))
        facts.setdefault("down_at", 0.0)
        facts["up_at"] = facts["down_at"] + down

    def latencies(lo: float, hi: float) -> list[float]:
        return sorted(
            (op.completed or 0.0) - op.invoked
            for op in history
            if not op.lost and op.completed is not None and lo <= op.invoked < hi
        )

    def p99_of(values: list[float]) -> float:
        return values[min(len(values) - 1, int(0.99 * len(values)))] if values else 0.0

    during = latencies(facts["down_at"], facts["up_at"])
    before = latencies(0.0, facts["down_at"])
    p99, p99_before = p99_of(during), p99_of(before)
    longest = during[-1] if during else 0.0
    refused = sum(1 for op in history if not op.ok and op.value == "UNAVAILABLE")
    if durability == "async":
        report = check(
            history, tokens=tokens, start_revision=start_rev, end_revision=end_rev, stored=stored
        )
        anomalies += report.anomalies
        # 64 closed-loop clients saturate the server, so latency is mostly queueing:
        # the outage must not make it worse (and p99 under 10 ms is met where it was).
        if p99 > 0.010 and p99 > 1.5 * p99_before:
            anomalies.append(
                Anomaly(
                    "slow while down",
                    f"p99 {p99 * 1000:.1f} ms while the database was down, against"
                    f" {p99_before * 1000:.1f} ms before",
                )
            )
    else:
        found, _ = check_crash(
            history, stored, killed_at=float("inf"), durability="sync", window=0.0
        )
        anomalies += found
        if longest > 5.0 + 1.5:  # write_timeout + client slack
            anomalies.append(
                Anomaly("hang", f"a call took {longest:.1f} s while the database was down")
            )
    if code != 0:
        anomalies.append(_exit_anomaly(code))
    faults = (
        f"PostgreSQL down {down:.0f} s under load: {len(during)} calls meanwhile, p99"
        f" {p99 * 1000:.1f} ms (before: {p99_before * 1000:.1f} ms), longest"
        f" {longest * 1000:.0f} ms, {refused} answered UNAVAILABLE"
    )
    return _summary(
        f"database outage ({durability})",
        anomalies,
        operations=len(history),
        clients=workload.clients,
        faults=faults,
        rss=rss,
    )
