"""The parent's side of the HTTP workers (``tokenpool serve --http-workers N``).

The server binds the HTTP socket, and a private Unix socket (in a directory only its
user can enter) that it serves RESP on for its workers only (``_server/workers.py``);
``supervise_workers`` starts N worker processes (``worker.py``) that share the HTTP
socket, each with the socket's descriptor, the link's path and a per-run secret on
its standard input:

- a worker that dies is logged and started again, after a pause that doubles from
  0.1 s to 5 s while they keep dying (and starts over once one lives 10 s); one that
  stops reporting its figures (stopped, wedged) for ``HUNG_AFTER`` is killed and so
  replaced;
- shutdown closes each worker's standard input (its signal to stop: it finishes
  what it holds within the grace) and kills what is left after it;
- a worker whose parent dies sees its standard input end and stops as well.

``WorkerFigures`` keeps each worker's latest report: ``/metrics`` shows the sum (a
dead worker's counts are kept, so counters never go down).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._log import get_logger
from .._metrics import Latencies

if TYPE_CHECKING:
    from .._server import RespServer, RespSettings
    from .app import HttpApp

log = get_logger("tokenpool.http")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
HEALTHY_AFTER = 10.0  # seconds a worker lives before the backoff starts over
KILL_AFTER = 1.0  # seconds past the grace before a worker still running is killed
HUNG_AFTER = 10.0  # seconds without a report (one a second) before a worker is replaced
STARTUP_WAIT = 30.0  # seconds the server waits for its workers to accept, at start
READY_SPREAD = 5.0  # seconds the start waits for the other workers once one accepts
_COUNTERS = ("requests", "errors")
_GAUGES = ("in_flight", "streams")


class WorkerFigures:
    """The workers' latest reports, summed; a gone worker's counters folded in."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}  # a worker's latest report, trio time
        self.first_seen: float | None = None  # the first report of any worker: pools served
        self._gone: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._gone_latencies: dict[tuple[str, str], list[float]] = {}

    def report(self, worker: str, figures: dict[str, Any]) -> None:
        if len(self._latest) < 1024 or worker in self._latest:
            self._latest[worker] = figures
            self.seen[worker] = trio.current_time()
            if self.first_seen is None:
                self.first_seen = self.seen[worker]

    def retire(self, worker: str) -> None:
        self.seen.pop(worker, None)
        figures = self._latest.pop(worker, None)
        if figures is None:
            return
        for key in _COUNTERS:
            self._gone[key] += int(figures.get(key, 0))
        _add(self._gone_latencies, figures.get("latencies", {}))

    def totals(self) -> dict[str, int]:
        out = dict(self._gone)
        for key in _GAUGES:
            out[key] = 0
        for figures in self._latest.values():
            for key in (*_COUNTERS, *_GAUGES):
                out[key] += int(figures.get(key, 0))
        return out

    def latencies(self) -> dict[tuple[str, str], list[float]]:
        out = {k: list(v) for k, v in self._gone_latencies.items()}
        for figures in self._latest.values():
            _add(out, figures.get("latencies", {}))
        return out


def _add(into: dict[tuple[str, str], list[float]], series: dict[str, list[float]]) -> None:
    for command, counts in series.items():
        mine = into.setdefault(("http", str(command)[:64]), [0.0] * len(counts))
        for i, count in enumerate(counts[: len(mine)]):
            mine[i] += float(count)


@attrs.frozen
class WorkerPlan:
    """What every worker is told (one JSON line on its standard input)."""

    count: int
    link: str  # the Unix socket of the server's worker listener
    secret: str
    settings: dict[str, Any]  # HttpSettings' fields
    default_pool: str
    auth_delay: float
    limit_concurrency: int
    grace: float
    log_level: str
    log_format: str
    otlp_endpoint: str | None = None  # the workers export their HTTP spans there too


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP socket the workers share, bound and listening (raises ``OSError``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def supervise_workers(
    plan: WorkerPlan,
    sock: socket.socket,
    figures: WorkerFigures,
    stop: trio.Event,
    ready: trio.Event | None = None,
) -> None:
    """Run ``plan.count`` workers on ``sock`` until ``stop``; then stop them within the
    grace (killing what is left). ``ready`` is set once every worker has started (or
    been given up on), or READY_SPREAD after the first did: a worker stopped or wedged
    at its start held the server's start for 30 s. Returns when every worker has exited."""
    started = [trio.Event() for _ in range(plan.count)]
    async with trio.open_nursery() as nursery:
        for slot in range(plan.count):
            nursery.start_soon(_keep_worker, plan, sock, figures, stop, slot, started[slot])
        if ready is not None:
            nursery.start_soon(_ready_when_started, started, ready)


async def _ready_when_started(started: list[trio.Event], ready: trio.Event) -> None:
    first = trio.Event()

    async def one(event: trio.Event) -> None:
        await event.wait()
        first.set()

    async with trio.open_nursery() as nursery:
        for event in started:
            nursery.start_soon(one, event)
        await first.wait()
        with trio.move_on_after(READY_SPREAD):  # the others, started together, soon after
            for event in started:
                await event.wait()
        nursery.cancel_scope.cancel()
    ready.set()


async def _keep_worker(
    plan: WorkerPlan,
    sock: socket.socket,
    figures: WorkerFigures,
    stop: trio.Event,
    slot: int,
    started_once: trio.Event,
) -> None:
    """One worker slot: a worker running, replaced when it dies, until ``stop``."""
    pause = BACKOFF_FIRST
    generation = 0
    while not stop.is_set():
        generation += 1
        name = f"{slot}.{generation}"
        started = trio.current_time()
        code = await _run_worker(plan, sock, figures, name, stop, started_once)
        figures.retire(name)
        if stop.is_set():
            return
        log.warning("http_worker_died", worker=name, exit=code, restart_in=round(pause, 2))
        if trio.current_time() - started > HEALTHY_AFTER:
            pause = BACKOFF_FIRST
        with trio.move_on_after(pause):
            await stop.wait()
        pause = min(pause * 2, BACKOFF_MAX)


async def _run_worker(
    plan: WorkerPlan,
    sock: socket.socket,
    figures: WorkerFigures,
    name: str,
    stop: trio.Event,
    started: trio.Event,
) -> int:
    """Start one worker and wait for it; at ``stop``, close its stdin and wait at most
    the grace (then kill it). Its exit status (negative: the signal that ended it)."""
    config = {
        "worker": name,
        "fd": sock.fileno(),
        "link": plan.link,
        "secret": plan.secret,
        "settings": plan.settings,
        "default_pool": plan.default_pool,
        "auth_delay": plan.auth_delay,
        "limit_concurrency": plan.limit_concurrency,
        "log_level": plan.log_level,
        "log_format": plan.log_format,
        "otlp_endpoint": plan.otlp_endpoint,
    }
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tokenpool._http.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(sock.fileno(),),
    )
    assert process.stdin is not None
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await process.stdin.send_all(json.dumps(config).encode() + b"\n")  # else: it died
    log.info("http_worker_started", worker=name, pid=process.pid)
    began = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:

            async def stop_it() -> None:
                await stop.wait()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await process.stdin.aclose()  # type: ignore[union-attr]
                with trio.move_on_after(plan.grace + KILL_AFTER):
                    await process.wait()
                    return
                log.warning("http_worker_killed", worker=name, note="past the grace")
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)

            async def wait_started() -> None:
                said = b""
                assert process.stdout is not None
                with trio.move_on_after(STARTUP_WAIT):
                    while b"\n" not in said:
                        chunk = await process.stdout.receive_some(64)
                        if not chunk:
                            break
                        said += chunk
                started.set()  # started, or given up on: either way not awaited longer
                await process.stdout.aclose()

            async def watch_hung() -> None:
                # a worker that reported once and then stopped reporting (stopped,
                # wedged) is replaced; so is one that never reported once the others
                # do (the pools are served): it was never noticed, and HTTP ran on
                # fewer workers without a word (outside probe)
                while True:
                    await trio.sleep(1.0)
                    seen = figures.seen.get(name)
                    if seen is None and figures.first_seen is not None:
                        seen = max(began, figures.first_seen)
                    if seen is not None and trio.current_time() - seen > HUNG_AFTER:
                        log.warning("http_worker_hung", worker=name, silent_for=HUNG_AFTER)
                        with contextlib.suppress(ProcessLookupError):
                            process.send_signal(signal.SIGKILL)
                        return

            nursery.start_soon(stop_it)
            nursery.start_soon(wait_started)
            nursery.start_soon(watch_hung)
            code = await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:  # cancelled: never leave a worker behind
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await process.wait()
        started.set()
        for pipe in (process.stdin, process.stdout):
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(pipe)  # type: ignore[arg-type]
    return code


def _sweep_stale_dirs() -> None:
    """Remove the private directories of servers of this user that are gone (killed
    with SIGKILL: an outside probe found one left in /tmp after each unclean death, and
    a crash loop without PrivateTmp would fill it). Only ``tokenpool-<pid>-*`` holding
    nothing but the workers' socket, of a process that no longer exists."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "tokenpool" or not parts[1].isdigit():
            continue
        path = os.path.join(root, name)
        try:
            found = os.lstat(path)  # never a link: what it points at is not ours to remove
            if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
                continue
            if set(os.listdir(path)) - {"workers.sock"}:
                continue
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                for entry in os.listdir(path):
                    os.unlink(os.path.join(path, entry))
                os.rmdir(path)
                log.info("stale_directory_removed", path=path)
        except (OSError, ValueError, OverflowError):
            continue


class HttpWorkers:
    """The HTTP port served by worker processes: the socket (bound at once, so a port in
    use is told at start), the private link, the supervisor, the figures."""

    def __init__(
        self,
        app: HttpApp,
        count: int,
        *,
        grace: float,
        default_pool: str,
        max_clients: int,
        log_level: str,
        log_format: str,
        otlp_endpoint: str | None = None,
    ) -> None:
        s = app.settings
        self.sock = bind_http(s.host, s.port)
        self.port = self.sock.getsockname()[1]
        _sweep_stale_dirs()
        # 0700: this user's only; named by this process, so a later start can tell one
        # left by a server killed with SIGKILL (no cleanup runs then) from a live one's
        self._dir = tempfile.mkdtemp(prefix=f"tokenpool-{os.getpid()}-")
        self.figures = WorkerFigures()
        app.remote_figures = self.figures.totals
        app.latencies.remote = self.figures.latencies
        self.app = app
        settings = attrs.asdict(s)
        allowed = settings["allowed_hosts"]
        settings["allowed_hosts"] = None if allowed is None else sorted(allowed)
        settings["max_streams"] = max(1, s.max_streams // count)
        self.plan = WorkerPlan(
            count=count,
            link=os.path.join(self._dir, "workers.sock"),
            secret=secrets.token_urlsafe(32),
            settings=settings,
            default_pool=default_pool,
            auth_delay=0.1,
            # connections and requests at once per worker (503 past it): the workers'
            # share of the descriptors HTTP may use, so RESP always has its own
            limit_concurrency=max(16, min(max_clients, 10_000) // count),
            grace=grace,
            log_level=log_level,
            log_format=log_format,
            otlp_endpoint=otlp_endpoint,
        )
        self.ready = trio.Event()  # the workers accept connections (see supervise_workers)
        log.info("http_listening", host=s.host, port=self.port, workers=count)

    def link_server(self, server: RespServer, settings: RespSettings) -> RespServer:
        """The RESP listener of the workers (on the private socket), sharing the server's
        command layer: one gate, one set of budgets."""
        from .._server import RespServer
        from .._server.workers import WorkerLink

        app = self.app

        async def metrics(fresh: bool) -> bytes:
            from .._metrics import METRICS_CACHE, METRICS_FRESH, render

            return render(app.registry, METRICS_FRESH if fresh else METRICS_CACHE)

        async def readiness() -> tuple[bool, dict[str, str]]:
            return await app.readiness()

        link = WorkerLink(self.plan.secret, readiness, metrics, self.figures.report)
        unix = attrs.evolve(settings, unix=self.plan.link, max_clients=100_000)
        linked = RespServer(
            server.pools,
            unix,
            commands=server.commands,
            latencies=Latencies(),
            worker=link,
            cluster=server.planner.cluster,
        )
        linked.planner.peers = server.planner.peers  # a cluster: other nodes' pools too
        return linked

    async def run(self, stop: trio.Event) -> None:
        """Supervise the workers until ``stop``; then clean up."""
        try:
            await supervise_workers(self.plan, self.sock, self.figures, stop, self.ready)
        finally:
            self.sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)
